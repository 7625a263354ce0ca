"""Streaming, lazy corpus readers: image folders, JSONL/CSV manifests, WebDataset tar shards,
parquet files, single images.

    corpus = open_corpus("data/shards-{00000..00099}.tar")
    for s in iter_samples(corpus, list(range(corpus.n_shards)), num_workers=4):
        if s.error is None:
            use(s.key, s.image, s.caption)

A corpus is a list of shards; `Corpus.iter_shard(shard, start)` reads one shard from a position
on, in order, and `iter_samples` reads several in DataLoader worker processes (whole shards per
worker, images decoded there). A bad sample (missing, corrupt or unsupported image, truncated tar
member, key without image, a file that is not a regular one, more than `max_image_bytes` bytes or
too many pixels) is a `Sample` with `error` set, never an exception; a bad spec (also a FIFO or a
device) or a malformed manifest line is an `MMNError` from `open_corpus`. Only regular files are
opened (a FIFO would block), and no more than `max_image_bytes` is read for one image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...errors import MMNError
from ...model.inputs import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, not_regular
from .base import Corpus, Sample, data_suffix, expand_pattern, has_braces, has_glob, is_image_name
from .files import FolderCorpus, ImageCorpus, ManifestCorpus
from .parquet import ParquetCorpus
from .tar import WebDatasetCorpus

__all__ = ["Sample", "ShardEnd", "Corpus", "open_corpus", "iter_samples", "FolderCorpus", "ManifestCorpus",
           "WebDatasetCorpus", "ParquetCorpus", "ImageCorpus"]

_MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")
_WHAT = ("give a folder of images, a .jsonl or .csv manifest, WebDataset .tar shard(s) (a path, a brace "
         "pattern like 'dir/shard-{00000..00099}.tar', a glob, or a folder of .tar), .parquet file(s), "
         "or one image")


def open_corpus(spec: str | os.PathLike, shard_size: int = 1000, max_image_bytes: int = MAX_IMAGE_BYTES) -> Corpus:
    """The corpus `spec` names; shard_size: samples per shard for folders, manifests and parquet
    files; max_image_bytes: the most bytes read for one image (file, tar member, parquet cell)."""
    spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise MMNError(f"corpus spec must be a path, got {spec!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise MMNError(f"shard_size must be a positive integer, got {shard_size!r}")
    if isinstance(max_image_bytes, bool) or not isinstance(max_image_bytes, int) or max_image_bytes < 1:
        raise MMNError(f"max_image_bytes must be a positive number of bytes, got {max_image_bytes!r}")
    cap = max_image_bytes
    if not os.path.exists(spec) and (has_braces(spec) or has_glob(spec)):
        return _from_paths(spec, expand_pattern(spec), shard_size, cap)
    if not os.path.exists(spec):
        raise MMNError(f"corpus '{spec}' does not exist: {_WHAT}")
    why = None if os.path.isdir(spec) else not_regular(spec)
    if why:
        raise MMNError(f"corpus '{spec}' {why}: give a folder or a regular file")
    if os.path.isdir(spec):
        names = [n for n in os.listdir(spec) if not n.startswith(".")]
        tars = sorted(n for n in names if data_suffix(n) == ".tar" and os.path.isfile(os.path.join(spec, n)))
        parquets = sorted(n for n in names if data_suffix(n) == ".parquet" and os.path.isfile(os.path.join(spec, n)))
        images = [n for n in names if is_image_name(n)]
        # img2dataset folders hold, beside the .tar shards, .parquet metadata and _stats.json files.
        if tars and not images:
            return WebDatasetCorpus(spec, [os.path.join(spec, n) for n in tars], cap)
        if parquets and not images:
            return ParquetCorpus(spec, [os.path.join(spec, n) for n in parquets], shard_size, cap)
        return FolderCorpus(spec, spec, shard_size, cap)
    suffix = data_suffix(spec)
    if suffix == ".tar":
        return WebDatasetCorpus(spec, [spec], cap)
    if suffix == ".parquet":
        return ParquetCorpus(spec, [spec], shard_size, cap)
    if suffix in _MANIFEST_SUFFIXES:
        return ManifestCorpus(spec, spec, shard_size, cap)
    if suffix in IMAGE_EXTENSIONS:
        return ImageCorpus(spec, spec, cap)
    raise MMNError(f"'{spec}' is not a corpus mmn_fast reads (suffix '{suffix or Path(spec).name}'): {_WHAT}")


def _from_paths(spec: str, paths: list[str], shard_size: int, cap: int) -> Corpus:
    kinds = {data_suffix(p) for p in paths}
    if kinds == {".tar"}:
        return WebDatasetCorpus(spec, paths, cap)
    if kinds == {".parquet"}:
        return ParquetCorpus(spec, paths, shard_size, cap)
    raise MMNError(f"'{spec}' matches {len(paths)} file(s) of kinds {sorted(kinds)}: a pattern must name only "
                   ".tar shards or only .parquet files")


# ----------------------------------------------------------------------------------- DataLoader
@dataclass(frozen=True)
class ShardEnd:
    """Marker `iter_samples(..., shard_ends=True)` yields after the last sample of a shard."""
    shard: int


class _ShardStream(IterableDataset):
    """Whole shards per DataLoader worker: worker w of W reads shards[w::W], each from its start."""

    def __init__(self, corpus: Corpus, shards: list[int], starts: dict[int, int], shard_ends: bool):
        self.corpus, self.shards, self.starts, self.shard_ends = corpus, shards, starts, shard_ends

    def __iter__(self) -> Iterator[Sample | ShardEnd]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from self.corpus.iter_shard(shard, self.starts.get(shard, 0))
            if self.shard_ends:
                yield ShardEnd(shard)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def _identity(sample: Sample | ShardEnd) -> Sample | ShardEnd:
    return sample


def iter_samples(corpus: Corpus, shards: list[int], starts: dict[int, int] | None = None,
                 num_workers: int = 0, shard_ends: bool = False) -> Iterator[Sample]:
    """Samples of `shards` (each from `starts.get(shard, 0)`) through a DataLoader, one by one.

    num_workers=0 reads in this process, shard after shard; with W workers, worker w reads
    shards[w::W] (at most one worker per shard is started) and decodes there. Per shard the
    samples come in position order; shards may interleave. shard_ends: also yield a `ShardEnd`
    after each shard's last sample (the scheduler flushes that shard's last batch on it).
    """
    shards = [int(s) for s in shards]
    for s in shards:
        if not 0 <= s < corpus.n_shards:
            raise IndexError(f"shard {s} out of range: {corpus.spec!r} has {corpus.n_shards} shards")
    if len(set(shards)) != len(shards):
        raise ValueError(f"shards listed twice in {shards}")
    if not shards:
        return iter(())
    workers = min(max(int(num_workers), 0), len(shards))
    loader = DataLoader(_ShardStream(corpus, shards, dict(starts or {}), shard_ends), batch_size=None,
                        num_workers=workers, collate_fn=_identity, persistent_workers=False,
                        worker_init_fn=_one_thread if workers else None, pin_memory=False)
    return iter(loader)
