"""Image files on disk: a folder (recursive), a JSONL or CSV manifest, or one image file."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Iterator

from ...errors import MMNError
from ...model.inputs import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, not_regular, open_regular
from .base import (Corpus, Sample, decode_image, file_stamp, image_error_for_extension, is_image_name, read_text,
                   unique_keys)

# The most bytes of one manifest line (a record: image path, caption, id), so that a file without
# line breaks is an error, not all of it in memory.
MAX_LINE_BYTES = 1 << 20


def _file_sample(shard: int, position: int, key: str, path: str, caption: str | None, decode: bool,
                 max_bytes: int) -> Sample:
    """source: the absolute path, so that results.jsonl's "image" still opens from another working
    directory (`mmn edit --from`, `mmn metrics` read the images back from there)."""
    path = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)  # not normalised: '..' after a
    # symlinked folder is the OS's to resolve
    error = image_error_for_extension(path)
    image = None
    if error is None:
        if decode:
            image, error = decode_image(path=path, max_bytes=max_bytes)
        else:
            why = not_regular(path)
            error = None if why is None else f"missing file: {path}" if why == "not found" else f"'{path}' {why}"
    return Sample(shard, position, key, path, image if error is None else None, caption, error)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


# ---------------------------------------------------------------------------------------- folder
class FolderCorpus(Corpus):
    """Images under a folder (recursive, hidden files and folders skipped), sorted by relative path.

    key: the relative path without extension ('/'-separated); where two images share it (a.jpg,
    a.png) both keep their extension. caption: a same-stem .txt file beside the image.
    """
    kind = "folder"

    def __init__(self, spec: str, root: str, shard_size: int, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.root = root
        rel, txt = [], set()
        seen_dirs = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # symlink loop
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            reldir = os.path.relpath(dirpath, root)
            reldir = "" if reldir == "." else reldir.replace(os.sep, "/") + "/"
            for name in filenames:
                if name.startswith("."):
                    continue
                if is_image_name(name):
                    rel.append(reldir + name)
                elif name.endswith(".txt"):
                    txt.add(reldir + name[:-4])
        if not rel:
            raise MMNError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder '{root}' or its subfolders")
        rel.sort()
        stems = [os.path.splitext(r)[0] for r in rel]
        counts: dict[str, int] = {}
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
        keys = [r if counts[s] > 1 else s for r, s in zip(rel, stems)]
        self._rel = rel
        self._keys = unique_keys(keys)
        self._has_caption = [s in txt for s in stems]
        self._shards = _chunks(len(rel), shard_size)
        super().__init__(spec, len(self._shards), max_image_bytes)

    def shard_name(self, shard: int) -> str:
        lo, hi = self._shards[shard]
        return f"{self.root}[{lo}:{hi}]"

    def shard_size(self, shard: int) -> int:
        lo, hi = self._shards[shard]
        return hi - lo

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        self._check(shard, start)
        lo, hi = self._shards[shard]
        for i in range(lo + start, hi):
            path = os.path.join(self.root, self._rel[i])
            caption = None
            if self._has_caption[i]:
                caption = read_text(os.path.splitext(path)[0] + ".txt", self.max_image_bytes)
            yield _file_sample(shard, i - lo, self._keys[i], path, caption, decode, self.max_image_bytes)

    def stamps(self, shard: int) -> Iterator[list]:
        lo, hi = self._shards[shard]
        for i in range(lo, hi):
            path = os.path.join(self.root, self._rel[i])
            yield [self._rel[i], *file_stamp(path)]
            if self._has_caption[i]:
                yield [os.path.splitext(self._rel[i])[0] + ".txt", *file_stamp(os.path.splitext(path)[0] + ".txt")]


# ------------------------------------------------------------------------------------ one image
class ImageCorpus(Corpus):
    """One image file: one shard of one sample (key: the file stem; caption: a same-stem .txt)."""
    kind = "image"

    def __init__(self, spec: str, path: str, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.path = path
        super().__init__(spec, 1, max_image_bytes)

    def shard_name(self, shard: int) -> str:
        return self.path

    def shard_size(self, shard: int) -> int:
        return 1

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        self._check(shard, start)
        if start == 0:
            stem = os.path.splitext(self.path)[0]
            caption = read_text(stem + ".txt", self.max_image_bytes) if os.path.isfile(stem + ".txt") else None
            yield _file_sample(0, 0, Path(self.path).stem, self.path, caption, decode, self.max_image_bytes)

    def stamps(self, shard: int) -> Iterator[list]:
        stem = os.path.splitext(self.path)[0]
        yield [os.path.basename(self.path), *file_stamp(self.path)]
        if os.path.isfile(stem + ".txt"):
            yield [os.path.basename(stem) + ".txt", *file_stamp(stem + ".txt")]


# -------------------------------------------------------------------------------------- manifest
class _Lines:
    """Lines of a binary file, decoded, with the byte offset after the last line returned."""

    def __init__(self, f, path: str, first_line: int = 1):
        self.f, self.path, self.pos, self.line_no = f, path, f.tell(), first_line - 1
        self.first = self.pos == 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            raise StopIteration
        self.pos += len(raw)
        self.line_no += 1
        if len(raw) > MAX_LINE_BYTES:
            raise MMNError(f"{self.path}:{self.line_no}: line longer than {MAX_LINE_BYTES:,} bytes; a manifest line "
                           "holds one record (image path, caption, id): is this a manifest?")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MMNError(f"{self.path}:{self.line_no}: not UTF-8 text; manifests must be UTF-8") from None
        if self.first:
            self.first = False
            line = line.lstrip("\ufeff")
        return line


class ManifestCorpus(Corpus):
    """A JSONL manifest ({"image", "caption"?, "id"?} per line) or a CSV one (header with image,
    caption?, id?). Image paths are relative to the manifest's folder or absolute. Shards are
    chunks of `shard_size` records (blank lines are not records). The whole manifest is checked
    when it is opened; only the byte offset of each shard is kept, and shards are re-read lazily.

    key: "id" if given (must be unique), else the image path as written relative to the manifest
    folder ('/'-separated, with extension; a repeated path gets '#2', '#3', ...).
    """
    kind = "manifest"

    def __init__(self, spec: str, path: str, shard_size: int, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.csv = path.lower().endswith(".csv")
        self.fieldnames: list[str] | None = None
        self._offsets: list[int] = []      # byte offset where each shard's first record starts
        self._first_line: list[int] = []   # its line number
        self._sizes: list[int] = []
        self._key_override: dict[int, str] = {}  # record index -> key, for repeated image paths
        seen: dict[str, tuple[int, bool]] = {}   # key -> (line, explicit id)
        n = 0
        with open_regular(path) as f:
            for start_pos, line_no, rec in self._records(f):
                if n % shard_size == 0:
                    self._offsets.append(start_pos)
                    self._first_line.append(line_no)
                    self._sizes.append(0)
                self._sizes[-1] += 1
                key, explicit = self._key(rec)
                if key in seen:
                    other, other_explicit = seen[key]
                    if explicit or other_explicit:
                        raise MMNError(f"{path}:{line_no}: id '{key}' already used on line {other}; ids must be unique")
                    k = 2
                    while f"{key}#{k}" in seen:
                        k += 1
                    key = f"{key}#{k}"
                    self._key_override[n] = key
                seen[key] = (line_no, explicit)
                n += 1
        if n == 0:
            raise MMNError(f"manifest '{path}' lists no images")
        super().__init__(spec, len(self._sizes), max_image_bytes)

    # one pass over the records from the current position of f: (start offset, line number, record)
    def _records(self, f, first_line: int = 1) -> Iterator[tuple[int, int, dict]]:
        lines = _Lines(f, self.path, first_line)
        if self.csv:
            reader = csv.reader(lines)
            if self.fieldnames is None:
                try:
                    header = next(reader)
                except StopIteration:
                    raise MMNError(f"CSV manifest '{self.path}' is empty: it needs a header row with an 'image' column") from None
                except csv.Error as e:
                    raise MMNError(f"{self.path}:{lines.line_no}: {e}") from None
                self.fieldnames = [h.strip() for h in header]
                if "image" not in self.fieldnames:
                    raise MMNError(f"{self.path}:1: the CSV header must name an 'image' column (found {header})")
            while True:
                pos, line_no = lines.pos, lines.line_no + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise MMNError(f"{self.path}:{line_no}: malformed CSV line ({e})") from None
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(self.fieldnames):
                    raise MMNError(f"{self.path}:{line_no}: {len(row)} fields where the header has "
                                   f"{len(self.fieldnames)} ({', '.join(self.fieldnames)})")
                rec = dict(zip(self.fieldnames, row))
                if not rec["image"].strip():
                    raise MMNError(f"{self.path}:{line_no}: empty 'image' field")
                rec = {"image": rec["image"].strip(), "caption": rec.get("caption") or None,
                       "id": (rec.get("id") or "").strip() or None}
                yield pos, line_no, rec
        else:
            while True:
                pos = lines.pos
                try:
                    line = next(lines)
                except StopIteration:
                    return
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MMNError(f"{self.path}:{lines.line_no}: not valid JSON ({e.msg}); each manifest line "
                                   "must be a JSON object with an \"image\" path") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"].strip():
                    raise MMNError(f"{self.path}:{lines.line_no}: each manifest line must be a JSON object with an "
                                   "\"image\" path")
                cap, id_ = rec.get("caption"), rec.get("id")
                if cap is not None and not isinstance(cap, str):
                    raise MMNError(f"{self.path}:{lines.line_no}: \"caption\" must be a string")
                if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, (str, int))):
                    raise MMNError(f"{self.path}:{lines.line_no}: \"id\" must be a string or an integer")
                yield pos, lines.line_no, {"image": rec["image"], "caption": cap,
                                           "id": None if id_ is None else str(id_)}

    def _key(self, rec: dict) -> tuple[str, bool]:
        if rec["id"] is not None:
            return rec["id"], True
        img = rec["image"]
        if os.path.isabs(img):
            rel = os.path.relpath(img, self.base)
            img = img if rel.startswith("..") else rel
        return os.path.normpath(img).replace(os.sep, "/"), False

    def _image_path(self, img: str) -> str:
        return img if os.path.isabs(img) else os.path.join(self.base, img)

    def shard_name(self, shard: int) -> str:
        lo = sum(self._sizes[:shard])
        return f"{self.path}[{lo}:{lo + self._sizes[shard]}]"

    def shard_size(self, shard: int) -> int:
        return self._sizes[shard]

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        self._check(shard, start)
        first = sum(self._sizes[:shard])
        for position, rec in self._shard_records(shard, start):
            key = self._key_override.get(first + position) or self._key(rec)[0]
            yield _file_sample(shard, position, key, self._image_path(rec["image"]), rec["caption"], decode,
                               self.max_image_bytes)

    def stamps(self, shard: int) -> Iterator[list]:
        """Each record as written (image, caption, id) and its image file's size and mtime."""
        for _, rec in self._shard_records(shard, 0):
            yield [rec["image"], rec["caption"], rec["id"], *file_stamp(self._image_path(rec["image"]))]

    def _shard_records(self, shard: int, start: int) -> Iterator[tuple[int, dict]]:
        """(position, record) of `shard` from position `start` on, re-read from the manifest."""
        size = self._sizes[shard]
        if start >= size:
            return
        with open_regular(self.path) as f:
            f.seek(self._offsets[shard])
            for position, (_, _, rec) in enumerate(self._records(f, self._first_line[shard])):
                if position >= size:
                    return
                if position >= start:
                    yield position, rec
