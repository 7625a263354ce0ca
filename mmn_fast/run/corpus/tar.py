"""WebDataset tar shards (img2dataset layout: key.jpg + key.txt / key.json), read as a stream."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import tarfile
import zlib
from typing import Iterator

from ...errors import MMNError
from ...model.inputs import IMAGE_EXTENSIONS, MAX_IMAGE_BYTES, open_regular, too_big
from .base import UNSUPPORTED_IMAGE_EXTENSIONS, Corpus, Sample, decode_image, file_stamp, relative_names

_IMAGE_EXTS = {e[1:] for e in IMAGE_EXTENSIONS}
_UNSUPPORTED_EXTS = {e[1:] for e in UNSUPPORTED_IMAGE_EXTENSIONS}
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]*)$")  # webdataset's __key__ / extension split
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
# Compressed shards, by their first bytes, and readers that decompress no more than they are asked for.
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
               (b"BZh", lambda f: bz2.BZ2File(f, "rb")),
               (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, "rb")))
_TAR_SUFFIX = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)
# tarfile reads a pax extended header or a GNU long name whole, before any member: real ones are
# a few hundred bytes.
MAX_HEADER_BYTES = 1 << 20
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header over MAX_HEADER_BYTES instead of reading it into memory."""

    def _proc_member(self, tar):
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"extended header of {self.size:,} bytes (more than {MAX_HEADER_BYTES:,})")
        return super()._proc_member(tar)


class _Group:
    __slots__ = ("base", "key", "position", "image", "has_image", "txt", "json", "unsupported", "error")

    def __init__(self, base: str, key: str, position: int):
        self.base, self.key, self.position = base, key, position
        self.image = self.txt = self.json = None
        self.has_image = False
        self.unsupported: str | None = None
        self.error: str | None = None  # a member over the byte limit


class WebDatasetCorpus(Corpus):
    """One shard per tar file, in the given order. Members are grouped by key (the member name
    before the first dot of its base name, directories included) while streaming; a key reappearing
    later in the same shard gets '#2', '#3', .... Shard sizes are unknown until read.

    A sample's key is that member key for a single tar file; with several, it is prefixed by the
    shard's path relative to the folder common to all the shards, without the .tar suffix
    ('shards-00003/000000123'), so that keys are unique across the corpus without reading it all
    first (two shards may use the same member names).

    A truncated or corrupt tar yields the samples read so far, then one sample with an error, and
    ends the shard; nothing raises.
    """
    kind = "webdataset"

    def __init__(self, spec: str, paths: list[str], max_image_bytes: int = MAX_IMAGE_BYTES):
        self.paths = list(paths)
        self._prefix = [""] * len(self.paths)
        if len(self.paths) > 1:  # a shard listed twice: 'x#2/...'
            self._prefix = [n + "/" for n in relative_names(self.paths, lambda rel: _TAR_SUFFIX.sub("", rel))]
        super().__init__(spec, len(self.paths), max_image_bytes)

    def shard_name(self, shard: int) -> str:
        return self.paths[shard]

    def shard_size(self, shard: int) -> None:
        return None

    def stamps(self, shard: int) -> Iterator[list]:
        yield [self._prefix[shard] or os.path.basename(self.paths[shard]), *file_stamp(self.paths[shard])]

    def iter_shard(self, shard: int, start: int = 0, decode: bool = True) -> Iterator[Sample]:
        self._check(shard, start)
        path = self.paths[shard]
        stem = os.path.basename(path).split(".")[0]
        counter = {"next": 0}
        used: set[str] = set()

        def new_group(base: str) -> _Group:
            key = base
            if key in used:
                n = 2
                while f"{key}#{n}" in used:
                    n += 1
                key = f"{key}#{n}"
            used.add(key)
            g = _Group(base, key, counter["next"])
            counter["next"] += 1
            return g

        def broken(where: int, err: Exception | str, group: _Group | None = None,
                   why: str | None = None) -> Sample | None:
            g = group or new_group(f"{stem}@{where}")
            if g.position < start:
                return None
            return Sample(shard, g.position, self._prefix[shard] + g.key, f"{path}:{g.key}", None, None,
                          why or f"truncated tar shard {path} at byte {where} ({err})")

        try:
            f = open_regular(path)
        except (OSError, MMNError) as e:
            s = broken(0, e, why=f"cannot open tar shard {path} ({e})")
            if s is not None:
                yield s
            return
        with f:
            try:
                tf, compressed = _open_tar(f)
            except _READ_ERRORS as e:
                s = broken(0, e)
                if s is not None:
                    yield s
                return
            group: _Group | None = None
            while True:
                offset = tf.offset
                try:
                    member = tf.next()
                except _READ_ERRORS as e:
                    if group is not None:
                        s = self._sample(shard, path, group, start, decode)
                        if s is not None:
                            yield s
                    s = broken(offset, e)
                    if s is not None:
                        yield s
                    return
                tf.members = []  # stream mode keeps every TarInfo otherwise
                if member is None:
                    break
                if not member.isfile():
                    continue
                m = _KEY_EXT.match(member.name)
                key = m.group(1) if m else None  # None: no extension or a dot file, ignored
                if group is not None and key is not None and key != group.base:
                    s = self._sample(shard, path, group, start, decode)
                    if s is not None:
                        yield s
                    group = None
                if key is not None and group is None:
                    group = new_group(key)
                ext = m.group(2).lower() if m else ""
                wanted = key is not None and group.position >= start and _wanted(group, ext, decode)
                if wanted and member.size > self.max_image_bytes:  # drained, never held
                    wanted = False
                    if group.error is None:
                        group.error = f"tar member {member.name} is {too_big(member.size, self.max_image_bytes)}"
                try:  # read (or drain) every member, also skipped ones: that is how truncation shows
                    data = _read_member(tf, member, keep=wanted)
                except _READ_ERRORS as e:
                    if key is None and group is not None:
                        s = self._sample(shard, path, group, start, decode)
                        if s is not None:
                            yield s
                        group = None
                    s = broken(member.offset_data, e, group)
                    if s is not None:
                        yield s
                    return
                if key is not None:
                    _add(group, ext, data)
            if group is not None:
                s = self._sample(shard, path, group, start, decode)
                if s is not None:
                    yield s
            # The stream also ends quietly on a cut or garbled header: an intact tar ends with a zero block.
            if not compressed:
                f.seek(tf.offset)
                block = f.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
                    s = broken(tf.offset, "no valid header or end-of-archive marker")
                    if s is not None:
                        yield s

    def _sample(self, shard: int, path: str, g: _Group, start: int, decode: bool) -> Sample | None:
        if g.position < start:
            return None
        caption = g.txt
        if caption is None and g.json is not None:
            try:
                meta = json.loads(g.json)
                meta = meta if isinstance(meta, dict) else {}
                cap = meta.get("caption")
                cap = cap if isinstance(cap, str) else meta.get("text")
                caption = cap.strip() if isinstance(cap, str) else None
            except (ValueError, UnicodeDecodeError):
                caption = None
        image, error = None, g.error
        if error is None and not g.has_image:
            if g.unsupported:
                error = f"unsupported image type '.{g.unsupported}' (supported: {', '.join(IMAGE_EXTENSIONS)})"
            else:
                error = "no image member"
        elif error is None and decode:
            image, error = decode_image(g.image, max_bytes=self.max_image_bytes)
        return Sample(shard, g.position, self._prefix[shard] + g.key, f"{path}:{g.key}", image, caption, error)


def _open_tar(f) -> tuple[tarfile.TarFile, bool]:
    """(a streaming TarFile over `f`, whether it is compressed). gzip, bzip2 and xz are decompressed
    here, not by tarfile, whose stream mode decompresses a whole read buffer at once: 10 KB of
    bzip2 can hold gigabytes of zeros."""
    head = f.read(6)
    f.seek(0)
    opener = next((o for magic, o in _COMPRESSED if head.startswith(magic)), None)
    raw = f if opener is None else opener(f)
    return tarfile.open(fileobj=raw, mode="r|", tarinfo=_BoundedTarInfo), opener is not None


def _wanted(g: _Group, ext: str, decode: bool) -> bool:
    """Whether a member's bytes are kept: the first image (when decoding), .txt and .json of a key."""
    if ext in _IMAGE_EXTS:
        return decode and g.image is None
    return (ext == "txt" and g.txt is None) or (ext == "json" and g.json is None)


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> bytes | None:
    f = tf.extractfile(member)
    if keep:
        return f.read()
    while f.read(1 << 20):
        pass
    return None


def _add(g: _Group, ext: str, data: bytes | None) -> None:
    """File one member into its key's group (first image member wins); data is None when skipped."""
    if ext in _IMAGE_EXTS:
        g.has_image = True
        if g.image is None:
            g.image = data
    elif ext == "txt":
        if g.txt is None and data is not None:
            g.txt = data.decode("utf-8", errors="replace").strip()
    elif ext == "json":
        if g.json is None and data is not None:
            g.json = data
    elif ext in _UNSUPPORTED_EXTS and g.unsupported is None:
        g.unsupported = ext
