"""Baking patches into a new checkpoint directory that any Hugging Face loader can serve.

Only the safetensors shards holding a touched weight are rewritten (with the new output vectors);
the other shards are hard-linked (copied across file systems), the other files copied, and
`model.safetensors.index.json`, when there is one, rewritten with the patches recorded in its
metadata. The directory is assembled beside `out` and renamed into place when complete.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MMNError
from ..io import fsync_dir, fsync_path, umask
from ..model.patch_file import Entry, Patch, PatchError, as_patch, gather_rows, rows_sha256, write_rows

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _weight_map(model_dir: Path) -> tuple[dict[str, str], dict | None]:
    """{tensor key: shard file name}, and the index JSON (None for a single-file checkpoint)."""
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        return dict(index["weight_map"]), index
    if (model_dir / SINGLE).is_file():
        with safe_open(str(model_dir / SINGLE), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}, None
    raise MMNError(f"'{model_dir}' has no {SINGLE} or {INDEX}: only safetensors checkpoints can be baked")


def checkpoint_key(entry: Entry, keys) -> str:
    """The checkpoint's key for an entry's weight: its recorded checkpoint name, its live state_dict
    name, else the one key ending with the longest common suffix (e.g. 'layers.3.mlp.down_proj.weight')."""
    keys = set(keys)
    for k in (entry.checkpoint_name, entry.name):
        if k in keys:
            return k
    parts = entry.name.split(".")
    for cut in range(1, len(parts) - 2):
        suffix = ".".join(parts[cut:])
        hits = sorted(k for k in keys if k == suffix or k.endswith("." + suffix))
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise MMNError(f"layer {entry.layer}: the checkpoint has several tensors ending in '{suffix}' "
                           f"({', '.join(hits[:3])}); cannot tell which one the patch edits")
    raise MMNError(f"layer {entry.layer}: the checkpoint has no tensor '{entry.checkpoint_name}' (live name "
                   f"'{entry.name}'): it was saved with other key names than the patched model uses")


def _patch_tensor(t: torch.Tensor, entry: Entry, base: dict, force: bool, key: str) -> torch.Tensor:
    """The checkpoint tensor with the entry's vectors written in ([d, F] columns, or Conv1D [F, d] rows)."""
    d, f = base["d_model"], base["d_mlp"]
    want = (f, d) if entry.layout == "conv1d" else (d, f)
    if tuple(t.shape) != want:
        raise PatchError(f"checkpoint tensor '{key}' has shape {tuple(t.shape)}, the patch expects {want}")
    if not t.is_floating_point():
        raise PatchError(f"checkpoint tensor '{key}' has dtype {t.dtype}: cannot bake into it")
    w = t.t() if entry.layout == "conv1d" else t  # [d, F] view
    cur = gather_rows(w, entry.indices)  # [n, d]
    dt = str(t.dtype).replace("torch.", "")
    if entry.orig_sha256.get(dt) != rows_sha256(cur) and not force:
        raise PatchError(f"checkpoint tensor '{key}' does not hold the vectors the patch was made on "
                         "(wrong base checkpoint, or patches baked out of order); force=True bakes anyway")
    new = entry.vectors.to(t.dtype)
    if not bool(torch.isfinite(new).all()):
        raise PatchError(f"layer {entry.layer}: the patch vectors overflow {t.dtype}")
    write_rows(w, entry.indices, new)
    return t


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link the file itself (a Hugging Face cache snapshot's shards are relative symlinks into
    ../../blobs: linking the symlink would leave a dangling one in the new directory)."""
    try:
        os.link(os.path.realpath(src), dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def bake(model_dir, patches, out_dir, force: bool = False) -> dict:
    """Write `out_dir`: the checkpoint at `model_dir` with `patches` (one, or several in stacking
    order) baked in. Returns {"rewritten": [shards], "linked": [...], "copied": [...]}."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    patches: list[Patch] = [as_patch(p) for p in (patches if isinstance(patches, (list, tuple)) else [patches])]
    if not (model_dir / "config.json").is_file():
        raise MMNError(f"'{model_dir}' is not a Hugging Face checkpoint directory (no config.json)")
    if out_dir.resolve() == model_dir.resolve():
        raise MMNError("the baked checkpoint must go to a new directory, not over the base model")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MMNError(f"output directory '{out_dir}' exists and is not empty")
    weight_map, index = _weight_map(model_dir)
    todo: dict[str, list[tuple[str, Entry, Patch]]] = {}  # shard -> [(key, entry, patch)] in stacking order
    for p in patches:
        for entry in p.entries.values():
            key = checkpoint_key(entry, weight_map)
            todo.setdefault(weight_map[key], []).append((key, entry, p))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    record = [{"method": p.method, "concepts": p.concepts, "neurons": p.n_neurons, "created": p.created}
              for p in patches]
    done = {"rewritten": [], "linked": [], "copied": []}
    try:
        for shard, items in todo.items():
            with safe_open(str(model_dir / shard), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            for key, entry, p in items:
                tensors[key] = _patch_tensor(tensors[key], entry, p.base, force, key)
            meta["mmn_patches"] = json.dumps(record)
            (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp / shard), metadata=meta)
            fsync_path(tmp / shard)  # on disk before the directory is renamed into place
            done["rewritten"].append(shard)
        for src in sorted(model_dir.rglob("*")):
            rel = src.relative_to(model_dir)
            if any(part.startswith(".") for part in rel.parts) or src.is_dir() or str(rel) in todo:
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if str(rel) == INDEX:
                index = dict(index, metadata={**index.get("metadata", {}), "mmn_patches": record})
                dst.write_text(json.dumps(index, indent=2) + "\n")
                done["copied"].append(str(rel))
            elif src.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                done[_link_or_copy(src, dst)].append(str(rel))
            else:
                shutil.copy2(src, dst)
                done["copied"].append(str(rel))
        (tmp / "mmn_bake.json").write_text(json.dumps({
            "base_model": str(model_dir.resolve()), "patches": record, "rewritten": done["rewritten"],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n")
        for name in done["copied"] + ["mmn_bake.json"]:
            fsync_path(tmp / name)
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp (and safetensors) make 0700/0600: follow the umask
        for shard in done["rewritten"]:
            os.chmod(tmp / shard, 0o666 & ~mask)
        for folder in {(tmp / f).parent for names in done.values() for f in names} | {tmp}:
            fsync_dir(folder)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done
