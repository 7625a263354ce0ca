"""Parquet files with encoded image bytes per row (raw bytes, or Hugging Face's {bytes, path} struct)."""
from __future__ import annotations

import os
from typing import Iterator

from ...errors import MMNError
from ...model.inputs import MAX_IMAGE_BYTES
from .base import DATA_EXTRA, Corpus, Sample, decode_image, file_stamp, relative_names

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text")
ID_COLUMNS = ("id", "key")
_BATCH = 64


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MMNError(f"reading parquet files needs pyarrow: {DATA_EXTRA}") from None
    return pq


class _File:
    """What a shard needs to know about its file; plain data so that the corpus pickles."""
    __slots__ = ("path", "image", "struct", "caption", "id", "row_groups")

    def __init__(self, path: str):
        pq = _pq()
        import pyarrow as pa

        try:
            with pq.ParquetFile(path) as pf:
                schema, md = pf.schema_arrow, pf.metadata
                self.row_groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        except MMNError:
            raise
        except Exception as e:
            raise MMNError(f"cannot read parquet file '{path}' ({type(e).__name__}: {e})") from None
        names = schema.names
        self.path = path
        self.image = next((c for c in IMAGE_COLUMNS if c in names), None)
        if self.image is None:
            raise MMNError(f"parquet file '{path}' has no image column ({' or '.join(IMAGE_COLUMNS)}); "
                           f"its columns are {names}")
        t = schema.field(self.image).type
        binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or \
            (hasattr(pa.types, "is_binary_view") and pa.types.is_binary_view(t))
        self.struct = pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
        if not (binary or self.struct):
            raise MMNError(f"parquet file '{path}': column '{self.image}' has type {t}; expected encoded image "
                           "bytes (binary, or a struct with a 'bytes' field as Hugging Face datasets writes)")
        self.caption = next((c for c in CAPTION_COLUMNS if c in names), None)
        self.id = next((c for c in ID_COLUMNS if c in names), None)

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


class ParquetCorpus(Corpus):
    """Shards are chunks of `shard_size` rows of each file, in file order (sizes from the metadata).

    key: the id/key column if there is one (and not null), else "<file>-<row>", <file> being the
    file's path relative to the folder common to all the files, without '.parquet' (so Hugging
    Face's default/train/0000.parquet and default/validation/0000.parquet give 'train/0000-5' and
    'validation/0000-5'; a file listed twice gets '#2' on its second name). Fallback keys are so
    unique by construction; an id/key column is taken as given (checking it would read every id
    when the corpus opens, once per process: seconds and gigabytes on a large corpus), so it must
    be unique. Only the row groups a shard overlaps are read, a batch of rows at a time. A row
    group that cannot be read gives one error sample per row of it in the shard, and the shard
    goes on.
    """
    kind = "parquet"

    def __init__(self, spec: str, paths: list[str], shard_size: int, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.files = [_File(p) for p in paths]
        self._shards = [(fi, lo, min(lo + shard_size, f.rows))
                        for fi, f in enumerate(self.files) for lo in range(0, f.rows, shard_size)]
        if not self._shards:
            raise MMNError(f"the parquet file(s) of '{spec}' have no rows")
        self._names = relative_names([f.path for f in self.files], lambda rel: os.path.splitext(rel)[0])
        super().__init__(spec, len(self._shards), max_image_bytes)

    def _fallback(self, fi: int, row: int) -> str:
        return f"{self._names[fi]}-{row}"

    def _key(self, fi: int, row: int, id_) -> str:
        return self._fallback(fi, row) if id_ is None else str(id_)

    def shard_name(self, shard: int) -> str:
        fi, lo, hi = self._shards[shard]
        return f"{self.files[fi].path}[{lo}:{hi}]"

    def shard_size(self, shard: int) -> int:
        _, lo, hi = self._shards[shard]
        return hi - lo

    def stamps(self, shard: int) -> Iterator[list]:
        fi, lo, hi = self._shards[shard]
        yield [self._names[fi], lo, hi, *file_stamp(self.files[fi].path)]

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        self._check(shard, start)
        fi, lo, hi = self._shards[shard]
        f = self.files[fi]
        first = lo + start
        if first >= hi:
            return

        def bad(row: int, error: str) -> Sample:
            return Sample(shard, row - lo, self._key(fi, row, None), f"{f.path}#{row}", None, None, error)

        try:
            pf = _pq().ParquetFile(f.path)
        except Exception as e:
            for row in range(first, hi):
                yield bad(row, f"cannot open parquet file ({type(e).__name__}: {e})")
            return
        columns = [c for c in (f.image, f.caption, f.id) if c is not None]
        with pf:
            rg_lo = 0
            for rg, n in enumerate(f.row_groups):
                rg_hi = rg_lo + n
                if rg_hi <= first:
                    rg_lo = rg_hi
                    continue
                if rg_lo >= hi:
                    break
                row = rg_lo  # file row of the next row the batches give
                try:
                    for batch in pf.iter_batches(batch_size=_BATCH, row_groups=[rg], columns=columns,
                                                 use_threads=False):
                        b_lo, b_hi = max(row, first), min(row + batch.num_rows, hi)
                        if b_lo < b_hi:
                            part = batch.slice(b_lo - row, b_hi - b_lo)
                            yield from self._samples(shard, lo, fi, part, b_lo, decode)
                        row += batch.num_rows
                        if row >= hi:
                            break
                except Exception as e:
                    for r in range(max(row, first), min(rg_hi, hi)):
                        yield bad(r, f"cannot read row group {rg} ({type(e).__name__}: {e})")
                rg_lo = rg_hi

    def _samples(self, shard: int, lo: int, fi: int, batch, row0: int, decode: bool):
        f = self.files[fi]
        images = batch.column(f.image).to_pylist()
        captions = batch.column(f.caption).to_pylist() if f.caption else [None] * len(images)
        ids = batch.column(f.id).to_pylist() if f.id else [None] * len(images)
        base = os.path.dirname(os.path.abspath(f.path))
        for i, (img, cap, id_) in enumerate(zip(images, captions, ids)):
            row = row0 + i
            key = self._key(fi, row, id_)
            data, path, image, error = img, None, None, None
            if f.struct and img is not None:
                data, path = img.get("bytes"), img.get("path")
            if data is None:
                if path:  # a Hugging Face image stored by path only
                    path = path if os.path.isabs(path) else os.path.join(base, path)
                    if decode:
                        image, error = decode_image(path=path, max_bytes=self.max_image_bytes)
                    elif not os.path.isfile(path):
                        error = f"missing file: {path}"
                else:
                    error = "no image bytes"
            elif decode:
                image, error = decode_image(data, max_bytes=self.max_image_bytes)
            yield Sample(shard, row - lo, key, f"{f.path}#{row}", image, None if cap is None else str(cap), error)
