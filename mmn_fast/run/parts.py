"""`DIR/parts/` of a corpus run: each rank's part files, aggregates and checkpoint state.

A rank appends each shard's result lines to `shard-XXXXX.jsonl` (skips to `shard-XXXXX.skipped.jsonl`)
and checkpoints by fsyncing them, saving its aggregates as `rank-RRR.agg-SEQ` and then writing
`rank-RRR-of-WWW.state.json` (how far each shard got, the part files' byte lengths, counts, SEQ).
A rank restarted after a kill trusts only that state: part files are cut back to the recorded
lengths. When every rank is done, rank 0 joins the parts in shard order and merges the aggregates.

Before a restart touches anything it checks the state against the files (`check_parts`): every field
of the state, part files that are regular files inside the run (never a link: cutting one back would
write to its target), at least as long as recorded, ending a line there, with as many lines as the
state counts samples, and the aggregates it names. A mismatch is one MMNError; nothing is changed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import MMNError
from ..io import atomic_open, write_json
from .aggregate import NeuronStats, outside_run, run_file

STATE_VERSION = 1
KINDS = {"results": ".jsonl", "skipped": ".skipped.jsonl"}  # part kind -> file suffix
COUNTS = ("images", "skipped", "concepts", "neurons_scored")
RESTART = "rerun with --overwrite to start the run again"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a part file is never opened through a link


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

    def restore(self, mine: list[int] | None = None) -> None:
        """Load the last checkpoint and cut every part file of this rank back to it, after checking
        all it records against the files (nothing is touched on a mismatch). mine: this rank's shards
        (a state naming others is refused)."""
        shards, counts, seq, stats = {}, dict.fromkeys(COUNTS, 0), 0, self.stats
        if os.path.lexists(self.state_path):
            state = read_state(run_file(self.parts.parent, self.state_path))
            shards, counts, seq = state["shards"], state["counts"], state["seq"]
            stats = self._checkpoint_stats(seq, counts)
            extra = sorted(set(shards) - set(mine)) if mine is not None else []
            if extra:
                raise MMNError(f"'{self.state_path}' records shard {extra[0]}, which is not this rank's: "
                               f"the checkpoint was changed since; {RESTART}")
        check_parts(self.parts, shards, counts, self.state_path)
        self.shards, self.counts, self.seq, self.stats = shards, counts, seq, stats
        for shard, info in self.shards.items():
            for kind in KINDS:
                path = part_path(self.parts, shard, kind)
                if path.exists():
                    fd = os.open(path, os.O_RDWR | NOFOLLOW)
                    try:
                        os.ftruncate(fd, info[kind])
                    finally:
                        os.close(fd)
        self._cleanup(keep=self.seq)

    def _checkpoint_stats(self, seq: int, counts: dict) -> NeuronStats:
        """The aggregates the state names, checked against this run's model and the state's counts."""
        stem = aggregates_path(self.parts, self.rank, seq)
        stats = _load_aggregates(self.parts, stem)
        mine = (self.stats.mode, self.stats.n_layers, self.stats.d_mlp)
        if (stats.mode, stats.n_layers, stats.d_mlp) != mine or sum(stats.images.values()) != counts["concepts"]:
            raise MMNError(f"'{stem}.json' does not match the checkpoint '{self.state_path}' (mode, model sizes "
                           f"or concept count): the run folder was changed since; {RESTART}")
        return stats

    def forget_unrecorded(self, shards: list[int]) -> None:
        """Part files of shards the checkpoint never saw were written after it: drop them (a link
        is removed, never its target)."""
        for shard in shards:
            if shard not in self.shards:
                for kind in KINDS:
                    path = part_path(self.parts, shard, kind)
                    if path.is_dir() and not path.is_symlink():
                        raise MMNError(f"'{path}' is a folder where a part file goes; remove it, or {RESTART}")
                    path.unlink(missing_ok=True)

    def write(self, shard: int, kind: str, lines: list[str]) -> None:
        key = (shard, kind)
        if key not in self.files:
            self.files[key] = open(part_path(self.parts, shard, kind), "ab", opener=_no_follow)
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


def _load_aggregates(parts: Path, stem: Path) -> NeuronStats:
    for suffix in (".json", ".safetensors"):
        run_file(parts.parent, f"{stem}{suffix}")
    return NeuronStats.load(stem)


def _no_follow(path, flags: int) -> int:
    return os.open(path, flags | NOFOLLOW, 0o666)


def read_state(path: Path) -> dict:
    """A rank's state file with every field checked: {"seq", "counts", "shards": {shard: info}}."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MMNError(f"cannot read the checkpoint '{path}' ({e}); {RESTART}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise MMNError(f"{path} was written by another mmn_fast version; rerun with --overwrite")

    def bad(field, want, got):
        raise MMNError(f"'{path}': field '{field}' must be {want}, got {got!r:.80}: the checkpoint was changed "
                       f"or damaged; {RESTART}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count(state.get("seq")):
        bad("seq", "an integer >= 0", state.get("seq"))
    counts, shards = state.get("counts"), state.get("shards")
    if not isinstance(counts, dict) or not all(count(counts.get(k)) for k in COUNTS):
        bad("counts", f"an object of {', '.join(COUNTS)} (integers >= 0)", counts)
    if not isinstance(shards, dict):
        bad("shards", "an object", shards)
    out = {}
    for key, info in shards.items():
        ok = key.isascii() and key.isdigit() and isinstance(info, dict) and isinstance(info.get("complete"), bool)
        if not ok or not all(count(info.get(k)) for k in ("done", *KINDS)):
            bad(f"shards.{key}", "a shard number's {done, results, skipped: integers >= 0, complete: bool}", info)
        out[int(key)] = {k: info[k] for k in ("done", *KINDS, "complete")}
    return {"seq": state["seq"], "counts": {k: counts[k] for k in COUNTS}, "shards": out}


def check_parts(parts: Path, shards: dict, counts: dict, state: Path) -> None:
    """Each recorded part file is a regular file inside the run (not a link), at least as long as
    recorded and ending a line there; its lines (results + skipped) are the samples the state counts
    done per shard, and they sum to the state's image and skip counts. MMNError on the first mismatch."""
    def mismatch(what):
        return MMNError(f"{what}: the run folder does not match its checkpoint '{state}' (changed or damaged "
                        f"since); nothing was changed; {RESTART}")

    lines = dict.fromkeys(KINDS, 0)
    for shard, info in sorted(shards.items()):
        done = 0
        for kind in KINDS:
            path, want = part_path(parts, shard, kind), info[kind]
            if not os.path.lexists(path):
                if want:
                    raise mismatch(f"'{path}' is missing, where {want} bytes are recorded")
                continue
            why = "is a link" if path.is_symlink() else outside_run(parts.parent, path)
            if why:
                raise mismatch(f"'{path}' {why}; a part file must be a regular file inside the run")
            size = path.stat().st_size
            if size < want:
                raise mismatch(f"'{path}' holds {size} bytes, fewer than the {want} recorded")
            n, last = _lines(path, want)
            if want and last != b"\n":
                raise mismatch(f"'{path}' does not end a line at the recorded length {want}")
            done += n
            lines[kind] += n
        if done != info["done"]:
            raise mismatch(f"shard {shard}: {info['done']} samples recorded done, but its part files hold {done} lines")
    if (lines["results"], lines["skipped"]) != (counts["images"], counts["skipped"]):
        raise mismatch(f"the part files hold {lines['results']} results and {lines['skipped']} skips, the state "
                       f"counts {counts['images']} and {counts['skipped']}")


def _lines(path: Path, length: int, chunk: int = 1 << 24) -> tuple[int, bytes]:
    """(newlines in the first `length` bytes of `path`, the byte at length - 1)."""
    n, last = 0, b""
    with open(path, "rb", opener=_no_follow) as f:
        while length > 0:
            block = f.read(min(chunk, length))
            if not block:
                break
            n, last, length = n + block.count(b"\n"), block[-1:], length - len(block)
    return n, last


def join_parts(parts: Path, n_shards: int, out: Path) -> None:
    """`out/results.jsonl` and `out/skipped.jsonl`: every shard's part file, in shard order (a part
    that is not a regular file inside the run is refused, never copied)."""
    for kind in KINDS:
        with atomic_open(out / f"{kind}.jsonl", "wb") as dst:
            for shard in range(n_shards):
                part = part_path(parts, shard, kind)
                if os.path.lexists(part):
                    if part.is_symlink():
                        raise MMNError(f"'{part}' is a link; a part file must be a regular file; {RESTART}")
                    with open(run_file(out, part), "rb", opener=_no_follow) as src:
                        shutil.copyfileobj(src, dst)


def merge_ranks(parts: Path, world: int) -> tuple[NeuronStats, dict]:
    """Every rank's last checkpoint: (the merged aggregates, the summed counts)."""
    stats, totals = None, dict.fromkeys(COUNTS, 0)
    for r in range(world):
        state = read_state(run_file(parts.parent, state_path(parts, r, world)))
        part = _load_aggregates(parts, aggregates_path(parts, r, state["seq"]))
        if stats is None:
            stats = part
        else:
            stats.merge(part)
        for k in totals:
            totals[k] += state["counts"][k]
    return stats, totals
