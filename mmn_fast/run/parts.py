"""`DIR/parts/` of a corpus run: each rank's part files, aggregates and checkpoint state.

A rank appends each shard's result lines to `shard-XXXXX.jsonl` (skips to `shard-XXXXX.skipped.jsonl`)
and checkpoints by fsyncing them, saving its aggregates as `rank-RRR.agg-SEQ` and then writing
`rank-RRR-of-WWW.state.json` (how far each shard got, the part files' byte lengths, counts, SEQ).
A rank restarted after a kill trusts only that state: part files are cut back to the recorded
lengths. When every rank is done, rank 0 joins the parts in shard order and merges the aggregates.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import MMNError
from ..io import atomic_open, write_json
from .aggregate import NeuronStats

STATE_VERSION = 1
KINDS = {"results": ".jsonl", "skipped": ".skipped.jsonl"}  # part kind -> file suffix
COUNTS = ("images", "skipped", "concepts", "neurons_scored")


def part_path(parts: Path, shard: int, kind: str) -> Path:
    return parts / f"shard-{shard:05d}{KINDS[kind]}"


def state_path(parts: Path, rank: int, world: int) -> Path:
    return parts / f"rank-{rank:03d}-of-{world:03d}.state.json"


def aggregates_path(parts: Path, rank: int, seq: int) -> Path:
    return parts / f"rank-{rank:03d}.agg-{seq}"


class RankState:
    """One rank's progress: open part files, per-shard positions, aggregates, checkpoints."""

    def __init__(self, parts: Path, rank: int, world: int, stats: NeuronStats):
        self.parts, self.rank = parts, rank
        self.state_path = state_path(parts, rank, world)
        self.stats = stats
        self.shards: dict[int, dict] = {}  # shard -> {"done", "results", "skipped", "complete"}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.files: dict[tuple[int, str], object] = {}
        self.seq = 0

    def info(self, shard: int) -> dict:
        """The shard's progress: samples done, part-file lengths, complete."""
        return self.shards.setdefault(shard, {"done": 0, "results": 0, "skipped": 0, "complete": False})

    def restore(self) -> None:
        """Load the last checkpoint and cut every part file of this rank back to it."""
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if state.get("version") != STATE_VERSION:
                raise MMNError(f"{self.state_path} was written by another mmn_fast version; rerun with --overwrite")
            self.shards = {int(k): v for k, v in state["shards"].items()}
            self.counts = state["counts"]
            self.seq = state["seq"]
            self.stats = NeuronStats.load(aggregates_path(self.parts, self.rank, self.seq))
        for shard, info in self.shards.items():
            for kind in KINDS:
                path = part_path(self.parts, shard, kind)
                if path.exists():
                    with open(path, "r+b") as f:
                        f.truncate(info[kind])
        self._cleanup(keep=self.seq)

    def forget_unrecorded(self, shards: list[int]) -> None:
        """Part files of shards the checkpoint never saw were written after it: drop them."""
        for shard in shards:
            if shard not in self.shards:
                for kind in KINDS:
                    part_path(self.parts, shard, kind).unlink(missing_ok=True)

    def write(self, shard: int, kind: str, lines: list[str]) -> None:
        key = (shard, kind)
        if key not in self.files:
            self.files[key] = open(part_path(self.parts, shard, kind), "ab")
        f = self.files[key]
        f.write("".join(lines).encode())
        self.info(shard)[kind] = f.tell()

    def close_shard(self, shard: int) -> None:
        self.info(shard)["complete"] = True
        for kind in KINDS:
            f = self.files.pop((shard, kind), None)
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def checkpoint(self) -> None:
        """Part files to disk, then the aggregates under a new name, then the state naming them:
        a kill between any two steps leaves the previous checkpoint intact."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.seq += 1
        self.stats.save(aggregates_path(self.parts, self.rank, self.seq))
        write_json(self.state_path, {"version": STATE_VERSION, "seq": self.seq, "counts": self.counts,
                                     "shards": {str(k): v for k, v in sorted(self.shards.items())}})
        self._cleanup(keep=self.seq)

    def _cleanup(self, keep: int) -> None:
        for p in self.parts.glob(f"rank-{self.rank:03d}.agg-*"):
            if p.name.split(".agg-")[1].split(".")[0] != str(keep):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        files, self.files = list(self.files.values()), {}
        for f in files:
            try:
                f.close()
            except OSError:
                pass  # the last checkpoint is what a restart trusts


def join_parts(parts: Path, n_shards: int, out: Path) -> None:
    """`out/results.jsonl` and `out/skipped.jsonl`: every shard's part file, in shard order."""
    for kind in KINDS:
        with atomic_open(out / f"{kind}.jsonl", "wb") as dst:
            for shard in range(n_shards):
                part = part_path(parts, shard, kind)
                if part.is_file():
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst)


def merge_ranks(parts: Path, world: int) -> tuple[NeuronStats, dict]:
    """Every rank's last checkpoint: (the merged aggregates, the summed counts)."""
    stats, totals = None, dict.fromkeys(COUNTS, 0)
    for r in range(world):
        state = json.loads(state_path(parts, r, world).read_text())
        part = NeuronStats.load(aggregates_path(parts, r, state["seq"]))
        if stats is None:
            stats = part
        else:
            stats.merge(part)
        for k in totals:
            totals[k] += state["counts"][k]
    return stats, totals
