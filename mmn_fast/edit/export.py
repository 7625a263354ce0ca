"""Export a patch as a PEFT LoRA adapter, so that vLLM, SGLang, LoRAX (or PEFT itself) serve it per request.

A patch gives neurons S of a layer the output vectors V. As a LoRA on that layer's output projection
(`y = W h + B A h`, scaling 1): `A` [r, F] has one one-hot row per neuron (selecting h[S]) and `B`
[d, r] holds the column deltas V - W[:, S], so `B A h = (V - W[:, S]) h[S]`: the patch exactly, up to
the rounding of W + (V - W). Every patched layer gets the same rank r (the most neurons of any
layer; fewer are padded with zero rows of A and zero columns of B), as serving engines want one rank
per adapter. Target modules are the patched output projections only, named as PEFT sees them on the
model loaded from the checkpoint; GPT-2's Conv1D layers get PEFT's `fan_in_fan_out`.

The adapter folder (adapter_config.json + adapter_model.safetensors) is written to a temp folder
beside `out`, fsynced, and renamed into place: a reader never sees half an adapter.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..errors import MMNError
from ..find.engine import Engine, load
from ..io import fsync_dir, fsync_path, umask
from ..model.live import model_lock, resolve_target
from ..model.patch_file import Patch, as_patch
from ..model.request_patches import PatchRegistry

FORMATS = ("peft",)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model's modules


def _module_kind(module: nn.Module) -> str:
    """'linear' or 'conv1d' for output projections PEFT's LoRA wraps; MMNError otherwise."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "conv1d"
    raise MMNError(f"PEFT's LoRA cannot express this patch: the output projection is a {type(module).__name__}, "
                   "not an nn.Linear or GPT-2 Conv1D (quantized or fused layers have no LoRA form here); "
                   "bake the patch into a checkpoint instead (mmn patch bake)")


def lora_tensors(target, patch: Patch, force: bool = False, **spec_overrides) -> tuple[dict, dict]:
    """({key: tensor} of adapter_model.safetensors, adapter_config.json's fields) for `patch` on the
    target's model (an Engine, an nn.Module with adapter overrides, or an Adapter, as for `apply`).
    Checked exactly as `apply` checks (base hashes, shapes, finiteness)."""
    patch = as_patch(patch)
    if patch.expert_entries:
        raise MMNError(f"PEFT's LoRA cannot express this patch: it edits expert neurons of mixture-of-experts layers "
                       f"({sorted(patch.expert_entries)[:3]} as (layer, expert)), whose output vectors live in fused "
                       "expert tensors, not in linear layers a LoRA adapter targets; bake it instead (mmn patch bake)")
    model, adapter = resolve_target(target, spec_overrides)
    registry = PatchRegistry(model, adapter)
    registry.load("export", patch, force=force)
    with model_lock(model):
        edits = registry.plan([(patch,)]).row_edits(0)  # {layer: LayerEdit(idx, new, delta fp32)}
    names = {id(m): n for n, m in model.named_modules()}
    kinds = {_module_kind(adapter.out_projs[l]) for l in edits}
    if len(kinds) > 1:
        raise MMNError("PEFT's LoRA cannot express this patch: its layers mix nn.Linear and Conv1D output projections, "
                       "and fan_in_fan_out is one setting per adapter")
    rank = max(int(e.idx.numel()) for e in edits.values())
    tensors, targets = {}, []
    for layer, e in sorted(edits.items()):
        name = names[id(adapter.out_projs[layer])]
        f, n = adapter.d_mlp, int(e.idx.numel())
        d = e.new.shape[1]
        a = torch.zeros(rank, f, dtype=torch.float32)  # [r, F] one-hot rows
        a[torch.arange(n), e.idx.cpu()] = 1.0
        b = torch.zeros(d, rank, dtype=torch.float32)  # [d, r] column deltas
        b[:, :n] = e.delta.t().float().cpu()
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous()
        targets.append(name)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(target, "source", None),
        "r": rank, "lora_alpha": rank,  # scaling = lora_alpha / r = 1 exactly
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "fan_in_fan_out": kinds == {"conv1d"}, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True, "revision": None,
    }
    return tensors, config


def _write_folder(out: Path, tensors: dict, config: dict, metadata: dict, overwrite: bool) -> None:
    """Write the adapter into a temp folder beside `out`, fsync it, rename it into place (an existing
    `out` is moved aside first and removed after, with overwrite)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        mask = umask()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            os.chmod(tmp / name, 0o666 & ~mask)
            fsync_path(tmp / name)
        os.chmod(tmp, 0o777 & ~mask)
        fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous adapter back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)


def export_peft(patch, model, out, overwrite: bool = False, force: bool = False) -> dict:
    """Write `patch` (a Patch or a file path) as a PEFT LoRA adapter folder `out` for `model` (a local
    checkpoint path, or an Engine). Refuses an existing `out` unless overwrite; refuses (writing
    nothing) what `apply` would refuse and what PEFT cannot express. force: skip the base-hash check
    only. Returns {"out", "rank", "target_modules", "neurons"}."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MMNError(f"--out '{out}' exists: choose another folder, or add --overwrite to replace it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MMNError(f"--out '{out}' is not a folder; an adapter is a folder (adapter_config.json + "
                       "adapter_model.safetensors)")
    if out.exists() and any(p.name not in (CONFIG_NAME, WEIGHTS_NAME, "README.md") for p in out.iterdir()):
        raise MMNError(f"--out '{out}' holds files that are not an adapter's; --overwrite replaces only an adapter "
                       "folder: choose another folder")
    patch = as_patch(patch)
    engine = model if isinstance(model, Engine) else load(model, device="cpu")
    tensors, config = lora_tensors(engine, patch, force)
    meta = {"format": "pt", "mmn_fast_version": __version__,
            "mmn_patch": json.dumps({"method": patch.method, "concepts": patch.concepts, "neurons": patch.n_neurons,
                                     "created": patch.created, "base": patch.base}, sort_keys=True)}
    _write_folder(out, tensors, config, meta, overwrite)
    return {"out": str(out), "rank": config["r"], "target_modules": config["target_modules"],
            "neurons": patch.n_neurons}
