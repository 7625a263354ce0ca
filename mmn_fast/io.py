"""Atomic writes (temp file, fsync, rename), fsynced appends to JSONL files, JSON helpers and weight
fingerprints."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Write to a temp file beside `path`, fsync, then rename over it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _publish(tmp: str, path: Path) -> None:
    """Rename a written, fsynced temp file over `path` with the mode open() would have given it
    (mkstemp makes 0600; filesystems without modes refuse chmod: keep what they give), then fsync
    the folder so that the rename itself survives a power cut."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), so that
    files written through a temp file get the mode a plain open() would give them."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set, then put back at once)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file written by someone else's writer (safetensors' save_file, say)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append whole lines (each ending in a newline) to `path`, then fsync: a kill leaves every
    earlier line intact and at most one torn last line (see `cut_torn_tail`)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def cut_torn_tail(path: str | os.PathLike) -> int:
    """Cut `path` back to the end of its last complete line (a line torn by a kill mid-write is
    dropped) and fsync; returns how many bytes were cut (0: the file ends with a newline, or is empty)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos, chunk = size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            j = data.rfind(b"\n")
            if j >= 0:
                pos = start + j + 1
                break
            pos = start
        if pos == size:
            return 0
        f.truncate(pos)
        f.flush()
        os.fsync(f.fileno())
        return size - pos


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written atomically (temp file, fsync, rename), streamed to disk by safetensors
    (no second copy of the tensors in memory); tensors made contiguous and moved to CPU."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        fsync_path(tmp)
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def tensor_fingerprint(tensors: list[torch.Tensor], max_elems: int = 1 << 20, version: int = 2) -> str:
    """Short sha256 of shapes, dtypes and an evenly strided sample of each tensor's values.

    A sample (not every byte) keeps this cheap on 13B models while any retraining, edit or
    dtype change shows up. The stride is coprime with the last dimension, so every column (a
    neuron's output vector in a [d, F] weight) is sampled: a stride dividing F
    (LLaMA-7B's F = 11008 = 256 x 43 with a stride of 43, say) would only ever read a few columns.
    version=1: the stride of mmn_fast before that fix, to recognise what older runs recorded.
    """
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // max_elems)
        while version >= 2 and t.ndim and math.gcd(step, t.shape[-1]) != 1:
            step += 1
        sample = flat[::step].float().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def user_cache_dir() -> Path:
    """Root of mmn_fast's caches: $MMN_CACHE, else ~/.cache/mmn_fast (never a model's or the working folder)."""
    return Path(os.environ.get("MMN_CACHE") or Path.home() / ".cache" / "mmn_fast").expanduser()
