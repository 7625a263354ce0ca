"""Streaming `find` over a corpus: sharded, batched, resumable, on one or many processes.

The corpus is cut into shards (tar files, or runs of `shard_size` images). Rank r of N takes
shards r, r + N, ...; each shard is read in order (decoded in DataLoader workers) and batched
within itself, so a batch, and hence every result line, is the same whatever the number of
processes or restarts. Each shard's result lines go to `DIR/parts/shard-XXXXX.jsonl`.

Every `checkpoint_every` images or `checkpoint_seconds` the rank fsyncs its part files and writes
its aggregates and a state file (how far each shard got, and the part files' byte lengths)
atomically (see mmn_fast.run.parts); never inside a streak of batches the model failed on, so that
a run stopped by a model-wide error (MAX_FAILED_BATCHES) redoes the whole streak when rerun. A rank
killed at any moment restarts from its last state: part files are cut back to the recorded
lengths (after checking the state against them; a mismatch changes nothing) and reading resumes at
the recorded positions, so no image is lost or counted twice. Nothing is written outside DIR. When
every rank is done, rank 0 concatenates the parts in shard order into `results.jsonl` /
`skipped.jsonl`, merges the aggregates, and writes `concepts.json` and, last, `run.json`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import MMNError
from ..find.concepts import resolve_mode
from ..find.engine import Engine, FindOptions
from ..find.heatmap import write_heatmaps
from ..find.results import neuron_label
from ..io import write_json
from ..model.inputs import MAX_IMAGE_BYTES
from .aggregate import NeuronStats, run_file
from .captions import CAPTION_WINDOW, CaptionIndex, caption_ids, check_ids_in_corpus
from .corpus import Corpus, Sample, ShardEnd, iter_samples, open_corpus
from .corpus.base import FINGERPRINT_VERSION
from .folder import RUN_FORMAT_VERSION, check_own_folders, finished_without_parts, remove_run, run_dir
from .parts import RankState, join_parts, merge_ranks
from .runinfo import library_versions

log = logging.getLogger(__name__)

MAX_FAILED_BATCHES = 8  # this many batches in a row with no usable image: a model-wide error, not bad images
# How sample keys are formed (2: tar keys prefixed by their shard, parquet fallbacks by the file's
# relative path): a run started under another scheme is not resumed into mixed keys.
KEY_FORMAT = 2
# What the config records of the corpus' content (Corpus.fingerprint) and the keys that follow from it.
CORPUS_STATE = ("corpus_fingerprint", "n_shards", "corpus_size")


@dataclass
class RunSettings:
    """How a corpus run reads, records and checkpoints (FindOptions: how each batch is scored).

    teacher_forced: score the corpus' captions instead of generating. num_workers: image-decoding
    processes (0: in this one). shard_size: samples per shard for folders, manifests, parquet.
    checkpoint_every / checkpoint_seconds: checkpoint after this many images or seconds.
    overwrite: discard a previous run in the folder. aggregate: "dense" (every neuron's per-concept
    statistics) or "sparse" (top-k neurons only). rank / world: this process and the process count
    (default: $RANK / $WORLD_SIZE). heatmaps: None, "activation" or "occlusion": also write each
    concept's heatmap and mask per image into DIR/heatmaps/<id>/ (see mmn_fast.explain.write_heatmaps).
    max_failed_batches: stop after this many batches in a row in which no image could be scored (a
    model-wide error; the rerun redoes them); 0: never stop, skip them all (images the model truly
    rejects, many in a row). max_image_bytes: the most bytes read for one image (a file, a tar
    member, a parquet cell); a larger one is skipped. captions: a caption file (mmn_fast.run.captions)
    whose captions are scored teacher-forced, joined to the corpus by id, in batches of similar caption
    lengths (ids it lacks are skipped); two_phase: that file is the run's own caption phase
    (DIR/captions.jsonl), recorded as such."""
    teacher_forced: bool = False
    progress: bool = True
    num_workers: int = 0
    shard_size: int = 1000
    checkpoint_every: int = 256
    checkpoint_seconds: float = 60.0
    overwrite: bool = False
    aggregate: str = "dense"
    rank: int | None = None
    world: int | None = None
    heatmaps: str | None = None
    max_failed_batches: int = MAX_FAILED_BATCHES
    max_image_bytes: int = MAX_IMAGE_BYTES
    captions: str | None = None
    two_phase: bool = False

    @property
    def caption_mode(self) -> str:
        """Where the scored captions come from: generated, manifest, file or two-phase."""
        if self.captions is not None:
            return "two-phase" if self.two_phase else "file"
        return "manifest" if self.teacher_forced else "generated"

    def validate(self) -> None:
        if self.captions is not None and self.teacher_forced:
            raise MMNError("--teacher-forced scores the corpus' own captions and --captions a caption file's: "
                           "give one of them")
        if self.aggregate not in ("dense", "sparse"):
            raise MMNError(f"--aggregate must be 'dense' or 'sparse', got {self.aggregate!r}")
        if self.max_failed_batches < 0:
            raise MMNError(f"--max-failed-batches must be 0 (never stop) or more, got {self.max_failed_batches}")
        if isinstance(self.max_image_bytes, bool) or not isinstance(self.max_image_bytes, int) \
                or self.max_image_bytes < 1:
            raise MMNError(f"--max-image-bytes must be a positive number of bytes, got {self.max_image_bytes!r}")


_SETTINGS = frozenset(f.name for f in dataclasses.fields(RunSettings))


def split_options(**keywords) -> tuple[RunSettings, FindOptions]:
    """Keywords of both kinds (as `run_find` takes them) into RunSettings and FindOptions."""
    settings = {k: v for k, v in keywords.items() if k in _SETTINGS}
    options = {k: v for k, v in keywords.items() if k not in _SETTINGS}
    return RunSettings(**settings), FindOptions(**options)


# ----------------------------------------------------------------------------------- public API
def run_find(engine: Engine, images: str | Path, out_dir: str | Path, teacher_forced: bool = False,
             progress: bool = True, **options) -> dict:
    """Score every image of a folder, manifest, WebDataset or Parquet corpus into `out_dir`
    (results.jsonl, skipped.jsonl, concepts.json, aggregates, run.json); a killed run resumes when
    called again with the same arguments. Returns concepts.json's content (on rank 0).

    options: the fields of `FindOptions` and of `RunSettings` (num_workers, shard_size, ...).
    """
    settings, opts = split_options(teacher_forced=teacher_forced, progress=progress, **options)
    return run_corpus(engine, images, out_dir, settings, opts).get("concepts_json", {})


def check_run(images: str | Path, out_dir: str | Path, settings: RunSettings, options: FindOptions) -> None:
    """The checks of `run_corpus` that need no model: option values, --out, the corpus, and an
    existing run's settings (all but the weights), for `settings.world` processes (default 1).
    `mmn find --nproc N` runs them before it starts N processes, so that bad input is one line, not
    N failing processes. Writes nothing."""
    options.validate()
    if isinstance(options.concepts, (list, tuple)):
        resolve_mode(options.concepts)  # an empty word list; the words themselves need the tokenizer
    settings.validate()
    out = run_dir(out_dir, create=False)
    corpus = open_corpus(images, shard_size=settings.shard_size, max_image_bytes=settings.max_image_bytes)
    index = None
    if settings.captions is not None and not settings.two_phase:
        index = CaptionIndex(settings.captions)
        check_ids_in_corpus(index, corpus)
    elif settings.two_phase and Path(settings.captions).is_file():  # made (or being made) by the caption phase
        index = CaptionIndex(settings.captions, torn="ignore")
    if index is not None:
        index.close()
    if settings.overwrite:
        return
    cfg_path = out / "parts" / "config.json"
    check_own_folders(out, settings.heatmaps)
    if cfg_path.is_file():
        world = 1 if settings.world is None else settings.world
        config = _config(None, corpus, options, settings, world, index)
        _compare(out, _read_config(out, cfg_path), config, ignore=("weight_fingerprint", "captions_digest"))
    else:
        why = finished_without_parts(out)
        if why:
            raise MMNError(why)


def run_corpus(engine: Engine, images: str | Path, out_dir: str | Path, settings: RunSettings,
               options: FindOptions) -> dict:
    """Score a corpus into `out_dir`, resuming a killed run with the same settings. Returns the run
    summary (images, skipped, concepts, neurons scored, seconds, and concepts.json's content on rank 0)."""
    engine.check_options(options)  # a bad option or word is one error now, not a skip per sample
    settings.validate()
    if engine.adapter.is_moe and settings.aggregate == "dense":
        raise MMNError(f"{type(engine.model).__name__} has mixture-of-experts layers: dense aggregates keep one "
                       "[layer, index] table per concept, which expert neurons do not fit; run with --aggregate sparse "
                       "(per concept, the neurons that rank in its top-k, experts included)")
    rank, world = _dist_info(settings.rank, settings.world)
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MMNError(f"rank {rank} of {world}: no torch.distributed process group; run through `mmn find "
                           "--nproc N` or torchrun `-m mmn_fast find`, or call init_process_group() first")
    corpus = open_corpus(images, shard_size=settings.shard_size, max_image_bytes=settings.max_image_bytes)
    out = run_dir(out_dir, create=rank == 0)
    index = None if settings.captions is None else CaptionIndex(settings.captions)
    if index is not None and not settings.two_phase:
        check_ids_in_corpus(index, corpus)
    config = _config(engine.fingerprint, corpus, options, settings, world, index)
    parts = _prepare(out, config, settings.overwrite, rank, world, settings.heatmaps)
    ad = engine.adapter
    state = RankState(parts, rank, world, NeuronStats(settings.aggregate, ad.n_layers, ad.d_mlp))
    mine = list(range(rank, corpus.n_shards, world))
    state.restore(mine)
    state.forget_unrecorded(mine)
    todo = [s for s in mine if not state.shards.get(s, {}).get("complete")]
    starts = {s: state.shards[s]["done"] for s in todo if s in state.shards}
    t0, done_before = time.perf_counter(), state.counts["images"] + state.counts["skipped"]
    if not todo and (out / "run.json").is_file():  # finished before: its record stays as it was
        state.close()
        return _finished_summary(out, state, rank)
    if done_before and rank == 0:
        total = corpus.size()
        log.info("resuming: %d of %s images done", done_before, total if total is not None else "?")
    bar = _progress_bar(corpus, world, done_before, settings.progress and rank == 0)
    runner = _BatchRunner(engine, options, settings, state, bar, out / "heatmaps", index)
    last_ckpt, since_ckpt = time.monotonic(), 0
    # a caption file's captions are batched by length within a window of a few batches (less padding)
    window = options.batch_size * (CAPTION_WINDOW if index is not None else 1)
    pending: dict[int, list[Sample]] = {}
    try:
        for item in iter_samples(corpus, todo, starts, settings.num_workers, shard_ends=True):
            if isinstance(item, ShardEnd):
                since_ckpt += runner.flush(item.shard, pending.pop(item.shard, []))
                state.close_shard(item.shard)
            else:
                batch = pending.setdefault(item.shard, [])
                batch.append(item)
                if sum(s.error is None for s in batch) >= window:
                    since_ckpt += runner.flush(item.shard, pending.pop(item.shard))
            # No checkpoint inside a streak of batches the model failed on: if it turns out to be a
            # model-wide error (the run stops after max_failed_batches), the rerun must redo the whole
            # streak rather than keep its images as skipped.
            if runner.failed_batches == 0 and (since_ckpt >= settings.checkpoint_every
                                               or time.monotonic() - last_ckpt >= settings.checkpoint_seconds):
                state.checkpoint()
                last_ckpt, since_ckpt = time.monotonic(), 0
        state.checkpoint()
    finally:
        state.close()
        bar.close()
        if index is not None:
            index.close()
    _barrier(world)
    summary = dict(state.counts, seconds=round(time.perf_counter() - t0, 3))
    if rank == 0:
        summary["concepts_json"] = _merge(engine, out, parts, corpus, config, world, options,
                                          seconds=time.perf_counter() - t0)
        totals = json.loads((out / "run.json").read_text())["totals"]
        summary.update(totals)
    _barrier(world)
    if summary["images"] == 0 and summary["skipped"] > 0 and rank == 0:
        first = json.loads((out / "skipped.jsonl").read_text().splitlines()[0])
        raise MMNError(f"none of the {summary['skipped']} images could be used (first, '{first['key']}': "
                       f"{first['reason']}); every reason is in {out / 'skipped.jsonl'}")
    return summary


def _finished_summary(out: Path, state: RankState, rank: int) -> dict:
    """The summary of a run that was already finished, read from its files (nothing is rewritten)."""
    summary = dict(state.counts, seconds=0.0)
    if rank == 0:
        summary["concepts_json"] = json.loads((out / "concepts.json").read_text())
        summary.update(json.loads((out / "run.json").read_text())["totals"])
    log.info("the run in %s was already finished: nothing to do", out)
    return summary


def summary_table(summary: dict, max_rows: int = 20, neurons: int = 3) -> str:
    """A short text table of concepts.json: concept, images, its most frequent top neurons (layer:index)."""
    experts = any("expert" in n for info in summary.values() for n in info["neurons"])
    form = "L<layer>.<index>, L<layer>.E<expert>.<index>" if experts else "L<layer>.<index>"
    lines = [f"{'concept':<16} {'images':>6}  top neurons ({form} x count)"]
    for word, info in list(summary.items())[:max_rows]:
        top = ", ".join(f"{neuron_label(n['layer'], n['index'], n.get('expert'))} x{n['count']}"
                        for n in info["neurons"][:neurons])
        lines.append(f"{word:<16} {info['images']:>6}  {top}")
    if len(summary) > max_rows:
        lines.append(f"... {len(summary) - max_rows} more concepts in concepts.json")
    return "\n".join(lines)


# ---------------------------------------------------------------------- processes and the run folder
def _dist_info(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _config(fingerprint: str | None, corpus: Corpus, opts: FindOptions, settings: RunSettings, world: int,
            index: CaptionIndex | None = None) -> dict:
    """What a resumed run must share with the run it resumes, as its JSON copy (tuples become lists).
    corpus: the absolute spec (Corpus.identity), so the same corpus typed another way, or from
    another working directory, is recognised, and another corpus under the same relative path is not;
    corpus_fingerprint: its files' names, sizes and mtimes (Corpus.fingerprint), so that a corpus
    changed under the same path is too. A caption file's run records where it is and what it holds
    (captions, captions_digest); runs that generate their captions record nothing more, as before."""
    config = {"corpus": corpus.identity, "kind": corpus.kind, "n_shards": corpus.n_shards,
              "corpus_size": corpus.size(), "shard_size": settings.shard_size,
              "options": dataclasses.asdict(opts), "teacher_forced": settings.teacher_forced,
              "aggregate": settings.aggregate, "world_size": world, "weight_fingerprint": fingerprint,
              "key_format": KEY_FORMAT, "corpus_fingerprint": corpus.fingerprint()}
    if settings.heatmaps:
        config["heatmaps"] = settings.heatmaps
    if settings.max_image_bytes != MAX_IMAGE_BYTES:  # recorded when not the default, as runs before it had none
        config["max_image_bytes"] = settings.max_image_bytes
    if settings.captions is not None:
        made = (index.settings or {}) if index is not None else {}
        config["captions"] = {"mode": settings.caption_mode, "file": str(Path(settings.captions).resolve()),
                              "source": made.get("source") if settings.two_phase else str(Path(settings.captions).resolve()),
                              "model": made.get("model"), "prompt": made.get("prompt")}
        config["captions_digest"] = index.digest if index is not None else None
    return json.loads(json.dumps(config))


def _compare(out: Path, old: dict, config: dict, ignore: tuple = ()) -> None:
    diff = sorted(k for k in set(old) | set(config) if k not in ignore and old.get(k) != config.get(k))
    if "key_format" in diff and "key_format" not in old:
        raise MMNError(f"'{out}' holds a run started by an older mmn_fast, which named samples another way: "
                       "finish it with that version, or add --overwrite to start again")
    diff = _check_corpus(out, old, config, diff)
    if "captions_digest" in diff:
        raise MMNError(f"the captions file '{config['captions']['file']}' changed since the run in '{out}' started: "
                       "restore it to resume, or add --overwrite to start again")
    if diff:
        raise MMNError(f"'{out}' holds a run with different settings ({', '.join(diff)}); rerun with the same "
                       "command to resume, or add --overwrite to start again")


def _check_corpus(out: Path, old: dict, config: dict, diff: list[str]) -> list[str]:
    """`diff` less the corpus' content once that is checked: a corpus changed under the same path is
    refused saying where; a run started before corpora were fingerprinted resumes with a warning."""
    if "corpus_fingerprint" not in diff:
        return diff
    rest = [k for k in diff if k != "corpus_fingerprint"]
    if "corpus" in diff or "kind" in diff:  # another corpus: its content differs, of course
        return rest
    before, now = old.get("corpus_fingerprint"), config.get("corpus_fingerprint")
    if before is None:
        warnings.warn(f"'{out}' holds a run started by an older mmn_fast, which did not record the corpus' files: "
                      "resuming it without checking that the corpus is unchanged", stacklevel=3)
        return rest
    if not isinstance(before, dict) or before.get("version") != FINGERPRINT_VERSION:
        raise MMNError(f"'{out}' holds a run that recorded its corpus another way (fingerprint version "
                       f"{before.get('version') if isinstance(before, dict) else before!r}): finish it with the "
                       "mmn_fast that started it, or add --overwrite to start again")
    others = [k for k in rest if k not in CORPUS_STATE]
    raise MMNError(f"the corpus '{config['corpus']}' changed since the run in '{out}' started "
                   f"({_corpus_change(old, config, before, now)})"
                   + (f", and other settings differ ({', '.join(others)})" if others else "")
                   + ": rerun with --overwrite to start over, or restore the corpus to resume")


def _corpus_change(old: dict, config: dict, before: dict, now: dict) -> str:
    """What differs between two fingerprints of a corpus, in words."""
    what = []
    for key, name in (("n_shards", "shards"), ("corpus_size", "samples")):
        if old.get(key) != config.get(key) and old.get(key) is not None and config.get(key) is not None:
            what.append(f"{old[key]} {name}, now {config[key]}")
    a, b = before.get("shards") or [], now.get("shards") or []
    changed = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    if changed:
        shown = ", ".join(map(str, changed[:5])) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        what.append(f"shard(s) {shown} of {len(b)} changed: files or records renamed, added, removed, resized or "
                    "modified")
    return "; ".join(what) or "files or records renamed, added, removed, resized or modified"


def _read_config(out: Path, cfg_path: Path) -> dict:
    try:
        config = json.loads(run_file(out, cfg_path).read_text())
    except (OSError, ValueError) as e:
        raise MMNError(f"cannot read '{cfg_path}' ({e}); rerun with --overwrite to start again") from None
    if not isinstance(config, dict):
        raise MMNError(f"'{cfg_path}' is not a run config (a JSON object); rerun with --overwrite to start again")
    return config


def _prepare(out: Path, config: dict, overwrite: bool, rank: int, world: int, heatmaps: str | None = None) -> Path:
    """Create DIR/parts with the run's config; refuse to mix results of different options."""
    parts = out / "parts"
    cfg_path = parts / "config.json"
    if rank == 0:
        if overwrite:
            remove_run(out)
        check_own_folders(out, heatmaps)
        if not cfg_path.is_file():
            why = None if overwrite else finished_without_parts(out)  # --overwrite: replace what is there
            if why:
                raise MMNError(why)
            parts.mkdir(parents=True, exist_ok=True)
            write_json(cfg_path, config)
    _barrier(world)
    check_own_folders(out, heatmaps)
    _compare(out, _read_config(out, cfg_path), config)
    return parts


# ------------------------------------------------------------------------------------ scoring
def _progress_bar(corpus: Corpus, world: int, initial: int, enabled: bool) -> tqdm:
    total = corpus.size()
    total = -(-total // world) if total is not None else None
    return tqdm(total=total, initial=initial, desc="find", unit="img", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


class _BatchRunner:
    """Runs one shard's batch through the engine and records lines, skips and aggregates."""

    def __init__(self, engine: Engine, opts: FindOptions, settings: RunSettings, state: RankState, bar: tqdm,
                 heatmap_dir: Path, captions: CaptionIndex | None = None):
        self.engine, self.opts, self.state, self.bar = engine, opts, state, bar
        self.teacher_forced = settings.teacher_forced
        self.captions = captions  # a caption file's index, or None
        self.keep_scores = settings.aggregate == "dense"
        self.heatmaps, self.heatmap_dir = settings.heatmaps, heatmap_dir  # heatmaps: method or None
        self.max_failed_batches = settings.max_failed_batches  # 0: never stop
        self.kwargs = dict(dataclasses.asdict(opts), batch_size=max(1, opts.batch_size))
        self.t0 = time.perf_counter()
        self.failed_batches = 0  # consecutive batches in which no image could be scored

    def flush(self, shard: int, samples: list[Sample]) -> int:
        """Process `samples` (one shard, in order); returns the number of samples consumed."""
        if not samples:
            return 0
        skipped, good, caps, sources = [], [], [], []
        for s in samples:
            cap, reason = self._caption_of(s)
            if s.error or reason:
                skipped.append((s, s.error or reason))
            else:
                good.append(s)
                caps.append(cap[0] if cap else None)
                sources.append(cap[1] if cap else None)
        results = self._score_bucketed(good, caps) if self.captions is not None else self._score(good, caps, top=True)
        lines, scored = [], []
        for s, res, source in zip(good, results, sources):
            if isinstance(res, str):
                skipped.append((s, res))
                continue
            res.image = s.source
            rec = res.to_dict()
            if source is not None:
                rec["caption_source"] = source
            lines.append(json.dumps(rec) + "\n")
            self._aggregate(res)
            scored.append((s.image, res))
        if self.heatmaps and scored:  # rewritten identically if a restart redoes this batch
            write_heatmaps(self.engine, [im for im, _ in scored], [r for _, r in scored], self.heatmap_dir,
                           method=self.heatmaps, prompt=self.opts.prompt, prefix=self.opts.prefix,
                           activation=self.opts.activation)
        skipped.sort(key=lambda x: x[0].position)
        st = self.state
        if lines:
            st.write(shard, "results", lines)
        if skipped:
            st.write(shard, "skipped", [json.dumps({"key": s.key, "source": s.source, "shard": s.shard,
                                                    "position": s.position, "reason": r}) + "\n" for s, r in skipped])
        st.info(shard)["done"] = samples[-1].position + 1
        st.counts["images"] += len(lines)
        st.counts["skipped"] += len(skipped)
        self.bar.update(len(samples))
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"neurons/s={st.counts['neurons_scored'] / elapsed:.3g}", refresh=False)
        return len(samples)

    def _caption_of(self, s: Sample) -> tuple[tuple | None, str | None]:
        """((caption to score, where it came from) or None to generate one, why the sample is skipped or None)."""
        if self.captions is not None:
            rec = None if s.error else self.captions.entry(s.key)
            if rec is None:
                return None, f"no caption for this id in '{self.captions.path}'"
            ids = caption_ids(rec, self.engine)
            return ((ids, self.captions.source_of(rec)), None) if not isinstance(ids, str) else (None, ids)
        if self.teacher_forced:
            return ((s.caption, None), None) if s.caption else (None, "no caption (teacher-forced mode needs one)")
        return None, None

    def _score_bucketed(self, samples: list[Sample], caps: list) -> list:
        """`_score` over batches of similar caption lengths (less padding), results in the samples' order."""
        order = sorted(range(len(samples)), key=lambda i: len(caps[i]))
        results: list = [None] * len(samples)
        for start in range(0, len(order), self.kwargs["batch_size"]):
            chunk = order[start : start + self.kwargs["batch_size"]]
            for i, res in zip(chunk, self._score([samples[i] for i in chunk], [caps[i] for i in chunk], top=True)):
                results[i] = res
        return results

    def _score(self, samples: list[Sample], caps: list | None, top: bool = False) -> list:
        """ImageResults in order; a sample the engine cannot take alone becomes its error string.
        An error every sample of a batch hits alone is not the samples' fault: it is raised.
        caps: the captions to score (text or token ids), or Nones to generate them."""
        if not samples:
            return []
        caps = None if caps is None or caps[0] is None else caps
        try:
            results = list(self.engine.iter_find([s.image for s in samples], captions=caps,
                                                 ids=[s.key for s in samples], keep_scores=self.keep_scores,
                                                 **self.kwargs))
        except Exception as e:  # noqa: BLE001 - one odd image must not stop a corpus run
            if len(samples) == 1:
                results = [f"the model could not take it: {type(e).__name__}: {e}"]
            else:
                results = [r for s, c in zip(samples, caps or [None] * len(samples))  # find the bad ones
                           for r in self._score([s], [c])]
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
        st.counts["neurons_scored"] += len(res.concepts) * self.engine.adapter.n_neurons


def _merge(engine: Engine, out: Path, parts: Path, corpus: Corpus, config: dict, world: int, opts: FindOptions,
           seconds: float) -> dict:
    """Rank 0, after every rank finished: the final files, run.json last."""
    join_parts(parts, corpus.n_shards, out)
    stats, totals = merge_ranks(parts, world)
    stats.save(out / "aggregates")
    summary = stats.summary(top_n=opts.top_k)
    write_json(out / "concepts.json", summary)
    write_json(out / "run.json", {
        "format_version": RUN_FORMAT_VERSION,
        "model": engine.source or type(engine.model).__name__,
        "adapter": engine.adapter.describe(),
        **config,
        "captions": config.get("captions") or {"mode": "manifest" if config["teacher_forced"] else "generated",
                                               "source": "manifest" if config["teacher_forced"] else "engine"},
        "totals": totals,
        "seconds": round(seconds, 3),  # this (last) session's reading and scoring, model load excluded
        "device": str(engine.device),
        "backend": engine.backend,
        "dtype": str(next(engine.model.parameters()).dtype).replace("torch.", ""),
        "versions": library_versions(),
    })
    return summary
