"""Baking patches into a new checkpoint directory that any Hugging Face loader can serve.

Only the safetensors shards holding a touched weight are rewritten (with the new output vectors);
the other shards are hard-linked (copied across file systems), the other files copied, and
`model.safetensors.index.json`, when there is one, rewritten with the patches recorded in its
metadata. The directory is assembled beside `out` and renamed into place when complete.

A checkpoint folder is input like any file: its index may name shards anywhere, its files may be
symlinks to anything, and its patches may name any tensor. So shard names must be plain file names
in the folder, nothing may lead outside it (but a Hub cache snapshot's blobs), and each entry goes
where `apply` would write it: its layer's MLP output projection, found by the adapter of the model
that config.json describes (built on the meta device), after apply's own checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MMNError
from ..io import fsync_dir, fsync_path, umask
from ..model.adapters import Adapter, spec_for, unit_matrix
from ..model.live import base_matches, entry_unit, fit_rows
from ..model.patch_file import (DENSE, EXPERT_LAYOUTS, Entry, Patch, PatchError, as_patch, gather_rows, weight_names,
                                write_rows)

try:  # POSIX: a running bake locks its temporary folder, so that only dead bakes' folders are removed
    import fcntl
except ImportError:  # pragma: no cover (Windows: temporary folders of killed bakes are left)
    fcntl = None

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")


@dataclasses.dataclass
class _Target:
    """Where one patch entry goes: checkpoint tensor `key`, the unit's output vectors (a layer's MLP output
    projection, or an expert's down projection)."""

    key: str
    layer: int
    layout: str  # of the model's weight: "linear" [d, F], "conv1d" [F, d], "experts" / "experts_t" (fused experts)
    shape: tuple  # (d, F) of the model's output matrix, as config.json makes it
    entry: Entry
    patch: Patch


# ------------------------------------------------------------------------------ checkpoint files
def _roots(model_dir: Path) -> list[Path]:
    """Where the checkpoint's files may really lie: its folder, and for a Hugging Face cache
    snapshot (<repo>/snapshots/<rev>, whose files are symlinks into <repo>/blobs) those blobs."""
    real = model_dir.resolve()
    return [real] + ([real.parent.parent / "blobs"] if real.parent.name == "snapshots" else [])


def _inside(model_dir: Path, rel, roots: list[Path]) -> Path:
    """model_dir / rel, refused if it (through a symlink) leads outside the checkpoint."""
    real = Path(os.path.realpath(model_dir / rel))
    if not any(real.is_relative_to(r) for r in roots):
        raise MMNError(f"'{rel}' in '{model_dir}' leads to '{real}', outside the checkpoint folder: bake reads "
                       "only the checkpoint's own files; copy the file into the folder instead of linking it")
    return model_dir / rel


def _shard(name, model_dir: Path, roots: list[Path]) -> str:
    """A shard name of the index, checked: a plain .safetensors file name of a file in the folder."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or not name.endswith(".safetensors")
            or PurePosixPath(name).name != name or PureWindowsPath(name).name != name):
        raise MMNError(f"'{model_dir / INDEX}' names the shard {name!r}: shards must be plain .safetensors file "
                       "names in the checkpoint folder (no folders, '..' or absolute paths); fix the index")
    if not _inside(model_dir, name, roots).is_file():
        raise MMNError(f"'{model_dir / INDEX}' names the shard '{name}', which is not a file in '{model_dir}'")
    return name


def _weight_map(model_dir: Path, roots: list[Path]) -> tuple[dict[str, str], dict | None]:
    """{tensor key: shard file name}, and the index JSON (None for a single-file checkpoint)."""
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads(_inside(model_dir, INDEX, roots).read_text())
        except (ValueError, RecursionError) as e:
            raise MMNError(f"'{model_dir / INDEX}' is not valid JSON ({str(e).splitlines()[0]})") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise MMNError(f"'{model_dir / INDEX}' has no 'weight_map' object (tensor name -> shard file)")
        return {k: _shard(v, model_dir, roots) for k, v in wm.items()}, index
    if (model_dir / SINGLE).is_file():
        with safe_open(str(_inside(model_dir, SINGLE, roots)), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}, None
    raise MMNError(f"'{model_dir}' has no {SINGLE} or {INDEX}: only safetensors checkpoints can be baked")


def _other_files(model_dir: Path, roots: list[Path], rewritten) -> list[Path]:
    """The files to link or copy (relative paths): all but hidden ones and the rewritten shards."""
    out = []
    for src in sorted(model_dir.rglob("*")):
        rel = src.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or src.is_dir() or str(rel) in rewritten:
            continue
        _inside(model_dir, rel, roots)
        out.append(rel)
    return out


# ------------------------------------------------------------------------ where each entry goes
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
            raise MMNError(f"{entry.where()}: the checkpoint has several tensors ending in '{suffix}' "
                           f"({', '.join(hits[:3])}); cannot tell which one the patch edits")
    raise MMNError(f"{entry.where()}: the checkpoint has no tensor '{entry.checkpoint_name}' (live name "
                   f"'{entry.name}'): it was saved with other key names than the patched model uses")


def _model_adapter(model_dir: Path, spec_overrides: dict) -> Adapter:
    """The adapter of the model config.json describes, built on the meta device (no weights, no
    memory): it finds each layer's MLP output projection as the live model's adapter does for apply."""
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise MMNError(f"cannot read the model config in '{model_dir}' ({str(e).splitlines()[0]}): bake needs "
                       "it to find each layer's MLP output projection") from None
    errors = []
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except ValueError as e:  # this Auto class does not know the config
            errors.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        return Adapter(model, spec_for(model, spec_overrides))
    raise MMNError(f"no Auto class builds the model of '{model_dir}' ({'; '.join(errors)}), so bake cannot tell "
                   "which tensors are its MLP output projections; load the model, apply the patch, save_pretrained")


def _targets(patches: list[Patch], adapter: Adapter, weight_map: dict) -> dict[str, list[_Target]]:
    """shard -> its targets in stacking order. An entry goes where apply writes it, whatever tensor
    the patch names: its layer's MLP output projection, under the name this model gives it."""
    todo: dict[str, list[_Target]] = {}
    for p in patches:
        for e in p.units():
            shape = tuple(unit_matrix(*entry_unit(adapter, e)).shape)  # [d, F] on the meta device
            name, ckpt, layout = weight_names(adapter, e.layer, e.expert)
            key = checkpoint_key(Entry(e.layer, e.indices, e.vectors, name, ckpt, expert=e.expert), weight_map)
            todo.setdefault(weight_map[key], []).append(_Target(key, e.layer, layout, shape, e, p))
    return todo


def _expert_matrix(t: torch.Tensor, target: _Target, force: bool) -> torch.Tensor:
    """The [d, F] view of an expert's output vectors in a checkpoint tensor: its slot of a fused [E, ., .]
    tensor, or its own; stored as in the live model or transposed (transformers transposes some families'
    experts on load). A square slot (F = d) is read the way whose rows hold the patch's original vectors."""
    e = target.entry
    m = t[e.expert] if t.dim() == 3 and e.expert < t.shape[0] else t
    live = m.t() if target.layout == "experts_t" else m  # the live model's orientation
    fits = [c for c in (live, live.t()) if tuple(c.shape) == target.shape]
    if len(fits) == 2:  # square: the stored values decide
        matching = [c for c in fits if base_matches(e, gather_rows(c, e.indices), True)]
        if len(matching) == 1:
            return matching[0]
        if force:
            raise PatchError(f"checkpoint tensor '{target.key}': {e.where()}'s output vectors are square "
                             f"({list(target.shape)}) and hold none of the patch's original vectors either way, so "
                             "their orientation is unknown; force cannot bake them")
    return fits[0] if fits else live


def _patch_tensor(t: torch.Tensor, target: _Target, force: bool) -> torch.Tensor:
    """The checkpoint tensor with the entry's vectors written in ([d, F] columns, or Conv1D [F, d]
    rows), after apply's checks (fit_rows, base_matches) and a check of the patch's model shape."""
    l, e, key, base = target.layer, target.entry, target.key, target.patch.base
    w = t.t() if target.layout == "conv1d" else t  # [d, F] view
    if target.layout in EXPERT_LAYOUTS:
        w = _expert_matrix(t, target, force)
    if tuple(w.shape) != target.shape:
        raise MMNError(f"checkpoint tensor '{key}' is {tuple(t.shape)}, but the model of its config.json has a "
                       f"[d, F] = {list(target.shape)} output projection there: weights and config do not match")
    if base["d_model"] != target.shape[0] or (e.expert == DENSE and base["d_mlp"] != target.shape[1]):
        raise PatchError(f"{e.where()}: the patch was made for another model shape (d_model {base['d_model']}, d_mlp "
                         f"{base['d_mlp']}); this checkpoint has d_model {target.shape[0]}, d_mlp {target.shape[1]}")
    new = fit_rows(l, e, w)  # [n, d] in t's dtype
    if not base_matches(e, gather_rows(w, e.indices), force) and not force:
        named = f"; the patch names '{e.checkpoint_name}'" if e.checkpoint_name != key else ""
        raise PatchError(f"checkpoint tensor '{key}' ({e.where()}'s output vectors) does not hold the vectors "
                         f"the patch was made on (wrong base checkpoint, or patches baked out of order{named}); "
                         "force=True bakes anyway")
    write_rows(w, e.indices, new)
    return t


# --------------------------------------------------------------------------- the output folder
def _check_out(model_dir: Path, out_dir: Path) -> None:
    model, out = model_dir.resolve(), out_dir.resolve()
    if out.is_relative_to(model):
        raise MMNError(f"the baked checkpoint must go to a new folder outside the base model '{model_dir}', not "
                       f"'{out_dir}'")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MMNError(f"output directory '{out_dir}' exists and is not empty")


def _stale_temps(out_dir: Path) -> list[Path]:
    """The temporary folders of bakes into out_dir (as mkdtemp names them) beside it."""
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"[a-z0-9_]{8}\.tmp")
    return sorted(p for p in out_dir.parent.iterdir()
                  if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink())


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove what killed bakes into out_dir (SIGKILL, power cut) left beside it: up to a model's
    size each. A running bake holds a lock on its folder, so that one is left alone."""
    if fcntl is None:  # pragma: no cover
        return
    for folder in _stale_temps(out_dir):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a bake still running
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed '%s', left by an interrupted bake", folder)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _temp_dir(out_dir: Path):
    """A new hidden folder beside out_dir, locked while the bake runs, removed if the bake fails."""
    for _ in range(3):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        fd = os.open(tmp, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break
        os.close(fd)  # another bake took it for a dead one's between mkdtemp and flock: take another
    else:  # pragma: no cover
        raise MMNError(f"could not make a temporary folder beside '{out_dir}'")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ baking
def _write_shards(model_dir: Path, todo: dict, tmp: Path, record: list, force: bool) -> list[str]:
    for shard, targets in todo.items():
        with safe_open(str(model_dir / shard), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for target in targets:
            tensors[target.key] = _patch_tensor(tensors[target.key], target, force)
        meta["mmn_patches"] = json.dumps(record)
        save_file(tensors, str(tmp / shard), metadata=meta)
        fsync_path(tmp / shard)  # on disk before the directory is renamed into place
    return list(todo)


def _copy_others(model_dir: Path, files: list[Path], tmp: Path, index: dict | None, record: list, done: dict) -> None:
    for rel in files:
        src, dst = model_dir / rel, tmp / rel
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


def _link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link the file itself (a Hugging Face cache snapshot's shards are relative symlinks into
    ../../blobs: linking the symlink would leave a dangling one in the new directory)."""
    try:
        os.link(os.path.realpath(src), dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def _finish(model_dir: Path, tmp: Path, out_dir: Path, record: list, done: dict) -> None:
    """Provenance, modes, fsyncs, then the rename into place."""
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


def bake(model_dir, patches, out_dir, force: bool = False, **spec_overrides) -> dict:
    """Write `out_dir`: the checkpoint at `model_dir` with `patches` (one, or several in stacking
    order) baked in. Returns {"rewritten": [shards], "linked": [...], "copied": [...]}.
    Refuses (writing nothing) every patch `apply` would refuse on this model; force skips the check
    of the original vectors only. spec_overrides: as for apply, for models discovery does not cover."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    patches: list[Patch] = [as_patch(p) for p in (patches if isinstance(patches, (list, tuple)) else [patches])]
    if not (model_dir / "config.json").is_file():
        raise MMNError(f"'{model_dir}' is not a Hugging Face checkpoint directory (no config.json)")
    _check_out(model_dir, out_dir)
    roots = _roots(model_dir)
    weight_map, index = _weight_map(model_dir, roots)
    todo = _targets(patches, _model_adapter(model_dir, spec_overrides), weight_map)
    files = _other_files(model_dir, roots, todo)
    record = [{"method": p.method, "concepts": p.concepts, "neurons": p.n_neurons, "created": p.created}
              for p in patches]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    with _temp_dir(out_dir) as tmp:
        done = {"rewritten": _write_shards(model_dir, todo, tmp, record, force), "linked": [], "copied": []}
        _copy_others(model_dir, files, tmp, index, record, done)
        _finish(model_dir, tmp, out_dir, record, done)
    return done
