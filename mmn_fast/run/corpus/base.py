"""The sample record, the corpus base class, and the helpers every reader shares."""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from ...errors import MMNError
from ...model.inputs import (IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, decode_image_bytes, not_regular, open_regular,
                             read_image_file)

DATA_EXTRA = "pip install 'mmn_fast[data]'"

# Image formats mmn_fast does not decode: a payload with one of these extensions is reported as
# "unsupported image type" rather than silently dropped.
UNSUPPORTED_IMAGE_EXTENSIONS = (".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx", ".svg", ".ico",
                                ".ppm", ".pgm", ".pbm", ".pnm", ".psd", ".tga", ".exr", ".hdr", ".dng",
                                ".cr2", ".nef", ".arw", ".raw")
# How `Corpus.fingerprint` describes a corpus; a run recorded under another version is not compared.
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One image of a corpus: where it is (shard, position), who it is (key), and its content.

    shard: index of its shard in corpus order; position: 0-based index inside the shard, in shard
    order (bad samples count too); key: stable unique id; source: where it came from, for humans;
    image: decoded RGB PIL image, fully loaded (None when `error` is set or decoding was not asked
    for); caption: optional caption; error: why the sample cannot be used, else None.
    """
    shard: int
    position: int
    key: str
    source: str
    image: Image.Image | None = None
    caption: str | None = None
    error: str | None = None


class Corpus:
    """A sharded, lazily read collection of images. Subclasses read one format each.

    spec: what the user passed; identity: `spec` made absolute (see `absolute_spec`), the same
    whatever the working directory it was given in and however it was spelt ('./data' or 'data');
    kind: "folder" | "manifest" | "webdataset" | "parquet" | "image"; n_shards: number of shards;
    max_image_bytes: the most bytes read for one image (a larger one is a bad sample).
    A corpus holds no open files and pickles cheaply.
    """
    kind: str = ""

    def __init__(self, spec: str, n_shards: int, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.spec = spec
        self.identity = absolute_spec(spec)
        self.n_shards = n_shards
        self.max_image_bytes = max_image_bytes

    def shard_name(self, shard: int) -> str:
        raise NotImplementedError

    def shard_size(self, shard: int) -> int | None:
        """Number of samples of `shard` if known without reading the data, else None."""
        raise NotImplementedError

    def size(self) -> int | None:
        """Total number of samples if every shard size is known, else None."""
        total = 0
        for s in range(self.n_shards):
            n = self.shard_size(s)
            if n is None:
                return None
            total += n
        return total

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        """Samples of `shard` from position `start` on, in order; skipping is cheap (nothing is decoded).

        decode=False yields the same samples without decoding images (`image` is None, and errors
        only decoding would find are not reported).
        """
        raise NotImplementedError

    def stamps(self, shard: int) -> Iterator[list]:
        """What `shard` holds, as JSON-able lists (file names, sizes, modification times, records),
        found without reading any image: `fingerprint` hashes them."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """{"version", "digest" (sha256 of every shard's stamps), "shards" (8 hex digits per shard)}:
        a resumed run compares it with the one recorded when it started, so that a file renamed,
        added, removed, resized or rewritten since is found (and where) rather than mixed in."""
        whole, shards = hashlib.sha256(), []
        for s in range(self.n_shards):
            h = hashlib.sha256()
            for entry in self.stamps(s):
                h.update(json.dumps(entry).encode() + b"\n")
            whole.update(h.digest())
            shards.append(h.hexdigest()[:8])
        return {"version": FINGERPRINT_VERSION, "digest": whole.hexdigest(), "shards": shards}

    def _check(self, shard: int, start: int) -> None:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: {self.spec!r} has {self.n_shards} shards")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} shards={self.n_shards} spec={self.spec!r}>"


# ---------------------------------------------------------------------------------------- images
def decode_image(data: bytes | None = None, path: str | os.PathLike | None = None,
                 max_bytes: int = MAX_IMAGE_BYTES):
    """(RGB PIL image, None) or (None, error message), from bytes or a file. Only a regular file is
    read (a FIFO or a device is an error, never a hang) and no more than `max_bytes` of it. Never raises."""
    if data is None:
        data, error = read_image_file(path, max_bytes)
        if data is None:
            return None, error
    return decode_image_bytes(data, max_bytes)


def file_stamp(path: str | os.PathLike) -> list:
    """[size, mtime in ns] of a file (following links), or [None, None] if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def image_error_for_extension(name: str) -> str | None:
    """'unsupported image type' error for a known image format mmn_fast cannot decode, else None."""
    ext = os.path.splitext(name)[1].lower()
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"unsupported image type '{ext}' (supported: {', '.join(IMAGE_EXTENSIONS)})"
    return None


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_text(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """A caption file's stripped text; None if it cannot be read, is not a regular file or holds
    more than `max_bytes`."""
    try:
        with open_regular(path) as f:
            data = f.read(max_bytes + 1)
    except (OSError, MMNError):
        return None
    return data.decode("utf-8", errors="replace").strip() if len(data) <= max_bytes else None


# ------------------------------------------------------------------------------------ spec paths
def absolute_spec(spec: str | os.PathLike) -> str:
    """`spec` as an absolute, real path: its components before the first one holding a brace or
    glob pattern are joined to the working directory if relative and resolved as the OS resolves
    them (symbolic links, then '..'); those from the pattern on are kept as written ('{a,b}/..'
    means something else per alternative). 'data/m.jsonl', './data/m.jsonl', '/cwd/data/m.jsonl'
    and a symlink to data/ give the same string; a working directory whose name holds '[' or '{'
    is a plain prefix."""
    spec = os.fspath(spec)
    parts = spec.split(os.sep)
    wild = next((i for i, c in enumerate(parts) if "{" in c or "}" in c or has_glob(c)), len(parts))
    head = os.sep.join(parts[:wild])
    head = os.path.realpath((head if os.path.isabs(spec) else os.path.join(os.getcwd(), head)) or os.sep)
    return os.path.join(head, *parts[wild:]) if wild < len(parts) else head


def relative_names(paths: list[str], strip) -> list[str]:
    """Each path relative to the folder common to all of them, '/'-separated, passed through
    `strip` (drops the extension), made unique (a file listed twice gets '#2'): names that tell
    files apart across a corpus without reading them (default/train/0000 vs default/validation/0000)."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    return unique_keys([strip(os.path.relpath(a, root)).replace(os.sep, "/") for a in absolute])


def unique_keys(keys: list[str]) -> list[str]:
    """Keys made unique: a repeated key gets '#2', '#3', ... in order (never a key used elsewhere)."""
    seen = set(keys)
    if len(seen) == len(keys):
        return keys
    out, used = [], set()
    for k in keys:
        if k in used:
            n = 2
            while f"{k}#{n}" in used or f"{k}#{n}" in seen:
                n += 1
            k = f"{k}#{n}"
        used.add(k)
        out.append(k)
    return out


def has_braces(spec: str) -> bool:
    return "{" in spec and "}" in spec


def has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def expand_pattern(spec: str) -> list[str]:
    """Brace pattern (braceexpand, in expanded order) and/or glob (sorted) to a list of paths."""
    parts = [spec]
    if has_braces(spec):
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise MMNError(f"'{spec}' is a brace pattern, which needs the braceexpand package: {DATA_EXTRA}") from None
        parts = list(braceexpand(spec))
    paths: list[str] = []
    for part in parts:
        if has_glob(part) and not os.path.exists(part):
            paths.extend(sorted(glob.glob(part)))
        else:
            paths.append(part)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MMNError(f"'{spec}' names {len(missing)} file(s) that do not exist ({shown}); fix the pattern")
    odd = [(p, why) for p, why in ((p, not_regular(p)) for p in paths) if why]
    if odd:
        raise MMNError(f"'{spec}' names {len(odd)} file(s) that cannot be read as shards (first: '{odd[0][0]}' "
                       f"{odd[0][1]}); name regular files only")
    if not paths:
        raise MMNError(f"no files match '{spec}'")
    return paths


def data_suffix(path: str | Path) -> str:
    """'.tar' (also for .tar.gz, .tgz), '.parquet', or the lower-case suffix."""
    name = str(path).lower()
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return ".tar"
    return os.path.splitext(name)[1]
