"""Streaming `find` over a corpus: sharded, batched, resumable, on one or many processes.

The corpus is cut into shards (tar files, or runs of `shard_size` images). Rank r of N takes
shards r, r + N, ...; each shard is read in order (decoded in DataLoader workers) and batched
within itself, so a batch, and hence every result line, is the same whatever the number of
processes or restarts. Each shard's result lines go to `DIR/parts/shard-XXXXX.jsonl`.

Every `checkpoint_every` images or `checkpoint_seconds` the rank fsyncs its part files and writes
its aggregates and a state file (how far each shard got, and the part files' byte lengths)
atomically; never inside a streak of batches the model failed on, so that a run stopped by a
model-wide error (MAX_FAILED_BATCHES) redoes the whole streak when rerun. A rank killed at any
moment restarts from its last state: part files are cut back to the recorded lengths and reading
resumes at the recorded positions, so no image is lost or counted twice. When every rank is
done, rank 0 concatenates the parts in shard order into `results.jsonl` / `skipped.jsonl`, merges
the aggregates, and writes `concepts.json` and, last, `run.json`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .aggregate import NeuronStats
from ..find.engine import Engine, FindOptions
from ..errors import MMNError
from ..io import atomic_open, write_json

STATE_VERSION = 1
MAX_FAILED_BATCHES = 8  # this many batches in a row with no usable image: a model-wide error, not bad images


def _dist_info(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


class _Rank:
    """One rank's progress: open part files, per-shard positions, aggregates, checkpoints."""

    def __init__(self, parts: Path, rank: int, world: int, stats: NeuronStats):
        self.parts, self.rank = parts, rank
        self.state_path = parts / f"rank-{rank:03d}-of-{world:03d}.state.json"
        self.stats = stats
        self.shards: dict[int, dict] = {}  # shard -> {"done", "results", "skipped", "complete"}
        self.counts = {"images": 0, "skipped": 0, "concepts": 0, "neurons_scored": 0}
        self.files: dict[tuple[int, str], object] = {}
        self.seq = 0

    def info(self, shard: int) -> dict:
        """The shard's progress: samples done, part-file lengths, complete."""
        return self.shards.setdefault(shard, {"done": 0, "results": 0, "skipped": 0, "complete": False})

    def part(self, shard: int, kind: str) -> Path:
        suffix = ".jsonl" if kind == "results" else ".skipped.jsonl"
        return self.parts / f"shard-{shard:05d}{suffix}"

    def restore(self) -> None:
        """Load the last checkpoint and cut every part file of this rank back to it."""
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if state.get("version") != STATE_VERSION:
                raise MMNError(f"{self.state_path} was written by another mmn_fast version; rerun with --overwrite")
            self.shards = {int(k): v for k, v in state["shards"].items()}
            self.counts = state["counts"]
            self.seq = state["seq"]
            self.stats = NeuronStats.load(self.parts / f"rank-{self.rank:03d}.agg-{self.seq}")
        for shard, info in self.shards.items():
            for kind in ("results", "skipped"):
                path = self.part(shard, kind)
                if path.exists():
                    with open(path, "r+b") as f:
                        f.truncate(info[kind])
        self._cleanup(keep=self.seq)

    def forget_unrecorded(self, shards: list[int]) -> None:
        """Part files of shards the checkpoint never saw were written after it: drop them."""
        for shard in shards:
            if shard not in self.shards:
                for kind in ("results", "skipped"):
                    self.part(shard, kind).unlink(missing_ok=True)

    def write(self, shard: int, kind: str, lines: list[str]) -> None:
        key = (shard, kind)
        if key not in self.files:
            self.files[key] = open(self.part(shard, kind), "ab")
        f = self.files[key]
        f.write("".join(lines).encode())
        info = self.info(shard)
        info[kind] = f.tell()

    def close_shard(self, shard: int) -> None:
        info = self.info(shard)
        info["complete"] = True
        for kind in ("results", "skipped"):
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
        self.stats.save(self.parts / f"rank-{self.rank:03d}.agg-{self.seq}")
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


RUN_FORMAT_VERSION = 2  # run.json's format_version, written by _merge
# How sample keys are formed (2: tar keys prefixed by their shard, parquet fallbacks by the file's
# relative path): a run started under another scheme is not resumed into mixed keys.
KEY_FORMAT = 2
# What a finished run leaves in DIR besides parts/: --overwrite removes these (and only these).
_RUN_FILES = ("results.jsonl", "skipped.jsonl", "concepts.json", "run.json", "aggregates.json",
              "aggregates.safetensors", "metrics.json", "report.html")
_RUN_DIRS = ("heatmaps",)


def _config(fingerprint: str | None, corpus, opts: FindOptions, teacher_forced, aggregate, shard_size, world,
            heatmaps=None) -> dict:
    """What a resumed run must share with the run it resumes, as its JSON copy (tuples become lists).
    corpus: the absolute spec (Corpus.identity), so the same corpus typed another way, or from
    another working directory, is recognised, and another corpus under the same relative path is not."""
    config = {"corpus": corpus.identity, "kind": corpus.kind, "n_shards": corpus.n_shards,
              "corpus_size": corpus.size(), "shard_size": shard_size,
              "options": dataclasses.asdict(opts), "teacher_forced": teacher_forced, "aggregate": aggregate,
              "world_size": world, "weight_fingerprint": fingerprint,
              "key_format": KEY_FORMAT}
    if heatmaps:
        config["heatmaps"] = heatmaps
    return json.loads(json.dumps(config))


def _out_dir(out_dir: str | os.PathLike, create: bool) -> Path:
    """--out as a Path; an MMNError, not an OSError, when it (or a folder above it) is a file."""
    out = Path(out_dir)
    bad = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if bad is not None:
        where = "is a file" if bad == out else f"is under '{bad}', which is a file"
        raise MMNError(f"--out must be a directory: '{out}' {where}")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # made a file meanwhile
            raise MMNError(f"--out must be a directory: '{out}' is a file or is under one") from None
    return out


def _finished_without_parts(out: Path) -> str | None:
    """Why `out` cannot be resumed when it holds run.json but no parts/config.json, else None."""
    if not (out / "run.json").is_file():
        return None
    try:
        version = json.loads((out / "run.json").read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        version = None
    if version == RUN_FORMAT_VERSION:
        return (f"'{out}' holds a finished run without parts/ (nothing to resume); use --overwrite or "
                "another --out")
    return (f"'{out}' holds a finished run from an older layout (run.json format_version {version!r}); use "
            "--overwrite or another --out")


def _compare(out: Path, old: dict, config: dict, ignore: tuple = ()) -> None:
    diff = sorted(k for k in set(old) | set(config) if k not in ignore and old.get(k) != config.get(k))
    if "key_format" in diff and "key_format" not in old:
        raise MMNError(f"'{out}' holds a run started by an older mmn_fast, which named samples another way: "
                       "finish it with that version, or add --overwrite to start again")
    if diff:
        raise MMNError(f"'{out}' holds a run with different settings ({', '.join(diff)}); rerun with the same "
                       "command to resume, or add --overwrite to start again")


def _remove_run(out: Path) -> None:
    """--overwrite: the previous run's parts/ and the files it wrote (known names only), and only
    when the folder holds a run: a heatmaps/ or report.html of the user's own stays."""
    if not ((out / "parts" / "config.json").is_file() or (out / "run.json").is_file()):
        return
    shutil.rmtree(out / "parts", ignore_errors=True)
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def _prepare(out: Path, config: dict, overwrite: bool, rank: int, world: int) -> Path:
    """Create DIR/parts with the run's config; refuse to mix results of different options."""
    parts = out / "parts"
    cfg_path = parts / "config.json"
    if rank == 0:
        if overwrite:
            _remove_run(out)
        if not cfg_path.is_file():
            why = _finished_without_parts(out)
            if why:
                raise MMNError(why)
            parts.mkdir(parents=True, exist_ok=True)
            write_json(cfg_path, config)
    _barrier(world)
    _compare(out, json.loads(cfg_path.read_text()), config)
    return parts


def _check_settings(aggregate: str, max_failed_batches: int) -> None:
    if aggregate not in ("dense", "sparse"):
        raise MMNError(f"--aggregate must be 'dense' or 'sparse', got {aggregate!r}")
    if max_failed_batches < 0:
        raise MMNError(f"--max-failed-batches must be 0 (never stop) or more, got {max_failed_batches}")


def check_run(images: str | Path, out_dir: str | Path, *, teacher_forced: bool = False, shard_size: int = 1000,
              overwrite: bool = False, aggregate: str = "dense", world: int = 1, heatmaps: str | None = None,
              max_failed_batches: int = MAX_FAILED_BATCHES, **options) -> None:
    """The checks of `run_corpus` that need no model: option values, --out, the corpus, and an
    existing run's settings (all but the weights). `mmn find --nproc N` runs them before it starts
    N processes, so that bad input is one line, not N failing processes. Writes nothing."""
    from ..find.concepts import resolve_mode
    from .corpus import open_corpus

    opts = FindOptions(**options)
    opts.validate()
    if isinstance(opts.concepts, (list, tuple)):
        resolve_mode(opts.concepts)  # an empty word list; the words themselves need the tokenizer
    _check_settings(aggregate, max_failed_batches)
    out = _out_dir(out_dir, create=False)
    corpus = open_corpus(images, shard_size=shard_size)
    if overwrite:
        return
    cfg_path = out / "parts" / "config.json"
    if cfg_path.is_file():
        config = _config(None, corpus, opts, teacher_forced, aggregate, shard_size, world, heatmaps)
        _compare(out, json.loads(cfg_path.read_text()), config, ignore=("weight_fingerprint",))
    else:
        why = _finished_without_parts(out)
        if why:
            raise MMNError(why)


def run_corpus(engine: Engine, images: str | Path, out_dir: str | Path, *, teacher_forced: bool = False,
               progress: bool = True, num_workers: int = 0, shard_size: int = 1000, checkpoint_every: int = 256,
               checkpoint_seconds: float = 60.0, overwrite: bool = False, aggregate: str = "dense",
               rank: int | None = None, world: int | None = None, heatmaps: str | None = None,
               max_failed_batches: int = MAX_FAILED_BATCHES, **options) -> dict:
    """Score a corpus into `out_dir`, resuming a killed run with the same settings. Returns the run
    summary (images, skipped, concepts, neurons scored, seconds, and concepts.json's content on rank 0).

    heatmaps: None, "activation" or "occlusion": also write each concept's heatmap and mask per image
    into DIR/heatmaps/<id>/ (see mmn_fast.explain.write_heatmaps).
    max_failed_batches: stop after this many batches in a row in which no image could be scored (a
    model-wide error; the rerun redoes them); 0: never stop, skip them all (images the model truly
    rejects, many in a row)."""
    from .corpus import ShardEnd, iter_samples, open_corpus

    opts = FindOptions(**options)
    engine.check_options(opts)  # a bad option or word is one error now, not a skip per sample
    _check_settings(aggregate, max_failed_batches)
    rank, world = _dist_info(rank, world)
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MMNError(f"rank {rank} of {world}: no torch.distributed process group; run through `mmn find "
                           "--nproc N` or torchrun `-m mmn_fast find`, or call init_process_group() first")
    corpus = open_corpus(images, shard_size=shard_size)
    out = _out_dir(out_dir, create=rank == 0)
    config = _config(engine.fingerprint, corpus, opts, teacher_forced, aggregate, shard_size, world, heatmaps)
    parts = _prepare(out, config, overwrite, rank, world)
    ad = engine.adapter
    state = _Rank(parts, rank, world, NeuronStats(aggregate, ad.n_layers, ad.d_mlp))
    state.restore()
    mine = list(range(rank, corpus.n_shards, world))
    state.forget_unrecorded(mine)
    todo = [s for s in mine if not state.shards.get(s, {}).get("complete")]
    starts = {s: state.shards[s]["done"] for s in todo if s in state.shards}
    t0, done_before = time.perf_counter(), state.counts["images"] + state.counts["skipped"]
    bar = _progress_bar(corpus, world, done_before, progress and rank == 0)
    runner = _BatchRunner(engine, opts, teacher_forced, aggregate == "dense", state, bar,
                          (out / "heatmaps", heatmaps) if heatmaps else None, max_failed_batches)
    last_ckpt, since_ckpt = time.monotonic(), 0
    pending: dict[int, list] = {}
    try:
        for item in iter_samples(corpus, todo, starts, num_workers, shard_ends=True):
            if isinstance(item, ShardEnd):
                since_ckpt += runner.flush(item.shard, pending.pop(item.shard, []))
                state.close_shard(item.shard)
            else:
                batch = pending.setdefault(item.shard, [])
                batch.append(item)
                if sum(s.error is None for s in batch) >= opts.batch_size:
                    since_ckpt += runner.flush(item.shard, pending.pop(item.shard))
            # No checkpoint inside a streak of batches the model failed on: if it turns out to be a
            # model-wide error (the run stops after MAX_FAILED_BATCHES), the rerun must redo the whole
            # streak rather than keep its images as skipped.
            if runner.failed_batches == 0 and (since_ckpt >= checkpoint_every
                                               or time.monotonic() - last_ckpt >= checkpoint_seconds):
                state.checkpoint()
                last_ckpt, since_ckpt = time.monotonic(), 0
        state.checkpoint()
    finally:
        state.close()
        bar.close()
    _barrier(world)
    summary = dict(state.counts, seconds=round(time.perf_counter() - t0, 3))
    if rank == 0:
        summary["concepts_json"] = _merge(engine, out, parts, corpus, config, world, opts,
                                          seconds=time.perf_counter() - t0)
        totals = json.loads((out / "run.json").read_text())["totals"]
        summary.update(totals)
    _barrier(world)
    if summary["images"] == 0 and summary["skipped"] > 0 and rank == 0:
        first = json.loads((out / "skipped.jsonl").read_text().splitlines()[0])
        raise MMNError(f"none of the {summary['skipped']} images could be used (first, '{first['key']}': "
                       f"{first['reason']}); every reason is in {out / 'skipped.jsonl'}")
    return summary


def _progress_bar(corpus, world, initial, enabled):
    from tqdm.auto import tqdm

    total = corpus.size()
    total = -(-total // world) if total is not None else None
    return tqdm(total=total, initial=initial, desc="find", unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


class _BatchRunner:
    """Runs one shard's batch through the engine and records lines, skips and aggregates."""

    def __init__(self, engine, opts, teacher_forced, keep_scores, state: _Rank, bar, heatmaps=None,
                 max_failed_batches: int = MAX_FAILED_BATCHES):
        self.engine, self.opts, self.teacher_forced, self.keep_scores = engine, opts, teacher_forced, keep_scores
        self.state, self.bar, self.heatmaps = state, bar, heatmaps  # heatmaps: (dir, method) or None
        self.kwargs = dict(dataclasses.asdict(opts), batch_size=max(1, opts.batch_size))
        self.t0 = time.perf_counter()
        self.failed_batches = 0  # consecutive batches in which no image could be scored
        self.max_failed_batches = max_failed_batches  # 0: never stop

    def flush(self, shard: int, samples: list) -> int:
        """Process `samples` (one shard, in order); returns the number of samples consumed."""
        if not samples:
            return 0
        skipped, good = [], []
        for s in samples:
            reason = s.error or (None if not self.teacher_forced or s.caption else
                                 "no caption (teacher-forced mode needs one)")
            (skipped if reason else good).append((s, reason))
        results = self._score([s for s, _ in good], top=True)
        lines, scored = [], []
        for s, res in zip([s for s, _ in good], results):
            if isinstance(res, str):
                skipped.append((s, res))
                continue
            res.image = s.source
            lines.append(json.dumps(res.to_dict()) + "\n")
            self._aggregate(res)
            scored.append((s.image, res))
        if self.heatmaps and scored:  # rewritten identically if a restart redoes this batch
            from ..explain import write_heatmaps

            write_heatmaps(self.engine, [im for im, _ in scored], [r for _, r in scored], self.heatmaps[0],
                           method=self.heatmaps[1], prompt=self.opts.prompt, prefix=self.opts.prefix,
                           activation=self.opts.activation)
        skipped.sort(key=lambda x: x[0].position)
        st = self.state
        if lines:
            st.write(shard, "results", lines)
        if skipped:
            st.write(shard, "skipped", [json.dumps({"key": s.key, "source": s.source, "shard": s.shard,
                                                    "position": s.position, "reason": r}) + "\n" for s, r in skipped])
        info = st.info(shard)
        info["done"] = samples[-1].position + 1
        st.counts["images"] += len(lines)
        st.counts["skipped"] += len(skipped)
        self.bar.update(len(samples))
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"neurons/s={st.counts['neurons_scored'] / elapsed:.3g}", refresh=False)
        return len(samples)

    def _score(self, samples: list, top: bool = False) -> list:
        """ImageResults in order; a sample the engine cannot take alone becomes its error string.
        An error every sample of a batch hits alone is not the samples' fault: it is raised."""
        if not samples:
            return []
        caps = [s.caption for s in samples] if self.teacher_forced else None
        try:
            results = list(self.engine.iter_find([s.image for s in samples], captions=caps,
                                                 ids=[s.key for s in samples], keep_scores=self.keep_scores,
                                                 **self.kwargs))
        except Exception as e:  # noqa: BLE001 - one odd image must not stop a corpus run
            if len(samples) == 1:
                results = [f"the model could not take it: {type(e).__name__}: {e}"]
            else:
                results = [r for s in samples for r in self._score([s])]  # find the bad ones, keep the rest
        if top:
            self.failed_batches = self.failed_batches + 1 if all(isinstance(r, str) for r in results) else 0
            if self.max_failed_batches and self.failed_batches >= self.max_failed_batches:  # not the images'
                # fault, most likely: stop, a restart redoes the streak
                raise MMNError(f"{self.failed_batches} batches in a row failed on every image (last: {results[0]}); "
                               "fix the cause and rerun the same command to resume (if these images are truly "
                               "ones the model cannot take, rerun with --max-failed-batches 0 to skip them)")
        return results

    def _aggregate(self, res) -> None:
        st, seen = self.state, set()
        for c in res.concepts:
            word = c.word.lower()
            if word in seen:  # each (image, word) counts once: its first occurrence
                continue
            seen.add(word)
            st.stats.add(word, c.scores, c.neurons)
            st.counts["concepts"] += 1
        st.counts["neurons_scored"] += len(res.concepts) * self.engine.adapter.n_layers * self.engine.adapter.d_mlp


def _merge(engine, out: Path, parts: Path, corpus, config: dict, world: int, opts: FindOptions,
           seconds: float) -> dict:
    """Rank 0, after every rank finished: the final files, run.json last."""
    from .runinfo import library_versions

    for kind, name in (("results", "results.jsonl"), ("skipped", "skipped.jsonl")):
        with atomic_open(out / name, "wb") as dst:
            for shard in range(corpus.n_shards):
                suffix = ".jsonl" if kind == "results" else ".skipped.jsonl"
                part = parts / f"shard-{shard:05d}{suffix}"
                if part.is_file():
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst)
    stats, totals = None, {"images": 0, "skipped": 0, "concepts": 0, "neurons_scored": 0}
    for r in range(world):
        state = json.loads((parts / f"rank-{r:03d}-of-{world:03d}.state.json").read_text())
        part = NeuronStats.load(parts / f"rank-{r:03d}.agg-{state['seq']}")
        if stats is None:
            stats = part
        else:
            stats.merge(part)
        for k in totals:
            totals[k] += state["counts"][k]
    stats.save(out / "aggregates")
    summary = stats.summary(top_n=opts.top_k)
    write_json(out / "concepts.json", summary)
    write_json(out / "run.json", {
        "format_version": RUN_FORMAT_VERSION,
        "model": engine.source or type(engine.model).__name__,
        "adapter": engine.adapter.describe(),
        **config,
        "totals": totals,
        "seconds": round(seconds, 3),  # this (last) session's reading and scoring, model load excluded
        "device": str(engine.device),
        "backend": engine.backend,
        "dtype": str(next(engine.model.parameters()).dtype).replace("torch.", ""),
        "versions": library_versions(),
    })
    return summary


def run_find(engine: Engine, images: str | Path, out_dir: str | Path, teacher_forced: bool = False,
             progress: bool = True, **options) -> dict:
    """Score every image of a folder, manifest, WebDataset or Parquet corpus into `out_dir`
    (results.jsonl, skipped.jsonl, concepts.json, aggregates, run.json); a killed run resumes when
    called again with the same arguments. Returns concepts.json's content (on rank 0).

    options: the fields of `FindOptions`, plus the scheduler's `num_workers`, `shard_size`,
    `checkpoint_every`, `checkpoint_seconds`, `overwrite`, `aggregate` (see `run_corpus`).
    """
    summary = run_corpus(engine, images, out_dir, teacher_forced=teacher_forced, progress=progress, **options)
    return summary.get("concepts_json", {})


def summary_table(summary: dict, max_rows: int = 20, neurons: int = 3) -> str:
    """A short text table: concept, images, its most frequent top neurons (layer:index)."""
    lines = [f"{'concept':<16} {'images':>6}  top neurons (layer:index x count)"]
    for word, info in list(summary.items())[:max_rows]:
        top = ", ".join(f"{n['layer']}:{n['index']} x{n['count']}" for n in info["neurons"][:neurons])
        lines.append(f"{word:<16} {info['images']:>6}  {top}")
    if len(summary) > max_rows:
        lines.append(f"... {len(summary) - max_rows} more concepts in concepts.json")
    return "\n".join(lines)

