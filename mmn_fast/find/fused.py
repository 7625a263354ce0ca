"""Fused capture: while a capture is active, each MLP's forward runs `act_score`.

The MLP's own input projections run as usual; `act_score` then computes `h` (what the output
projection consumes), copies the rows the score needs into the capture store and, for
`positions="image"`, reduces h over the image tokens, in one pass over the activations (one
Triton kernel on the "triton" backend). One-position decode steps, which score nothing, run the
model's own ops and index the captured rows instead (`DECODE_WITH_KERNEL` below). The original
forward is restored exactly on exit: nothing stays patched and there is no overhead outside a
capture.

Only MLPs whose forward is known are fused: LLaMA-style `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
(LLaMA, Vicuna, Mistral, Qwen2, Gemma) and CLIP/Phi-style `fc2(activation_fn(fc1(x)))`, with
one of the activations the kernel implements. `fused_problem` says why a model does not qualify.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn

from ..model.adapters import Adapter
from .capture import CaptureStore, Selector, _image_reduce, last_position
from ..errors import MMNError
from ..kernels import act_score

# Activation module class -> the kernel's name for it (the same function, not an approximation).
_ACT_CLASSES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh",
                "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "QuickGELUActivation": "quick_gelu",
                "ReLU": "relu"}
_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")
_PLAIN = (("fc1", "fc2", "activation_fn"), ("fc1", "fc2", "act_fn"))


# Decode steps run the model's own torch ops (see the forward below); True runs the kernel there
# too. `bench/run_bench.py --gpu` times both, which is what should settle this default.
DECODE_WITH_KERNEL = False


def activation_name(module: nn.Module) -> str | None:
    """The kernel's name for an activation module, or None if the kernel does not implement it."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is not nn.functional.gelu:
        return None  # the pure-python erf variant: same function, but keep to what was verified
    return _ACT_CLASSES.get(type(module).__name__)


def _layout(mlp: nn.Module) -> tuple[str, str | None, str, str] | None:
    """(in_proj, up_proj or None, out_proj, act) names when `mlp`'s forward is a known shape."""
    children = {name for name, _ in mlp.named_children()}
    if children == set(_GATED):
        return "gate_proj", "up_proj", "down_proj", "act_fn"
    for fc_in, fc_out, act in _PLAIN:
        if children == {fc_in, fc_out, act}:
            return fc_in, None, fc_out, act
    return None


def fused_problem(adapter: Adapter) -> str | None:
    """Why the fused MLP forward cannot replace this model's MLPs, or None when it can."""
    for layer, mlp in enumerate(adapter.mlps):
        layout = _layout(mlp)
        if layout is None:
            names = ", ".join(n for n, _ in mlp.named_children())
            return (f"layer {layer}'s MLP ({type(mlp).__name__}: {names}) is not a LLaMA-style gate/up/down "
                    "or fc1/fc2 MLP the fused kernel knows")
        if adapter.out_projs[layer] is not getattr(mlp, layout[2]):
            return f"the adapter's output projection of layer {layer} is not the MLP's {layout[2]}"
        if activation_name(getattr(mlp, layout[3])) is None:
            return f"layer {layer}'s activation {type(getattr(mlp, layout[3])).__name__} is not implemented by the kernel"
    return None


def _rows(select: Selector, b: int, t: int, device: torch.device) -> torch.Tensor:
    """Flat row indices (into [B*T]) of the positions `select` keeps: [B*S]."""
    if select is last_position:
        return torch.arange(b, device=device) * t + (t - 1)
    index = getattr(select, "index", None)
    if index is None:
        raise MMNError("the fused capture needs last_position or gather_positions selectors")
    return (torch.arange(b, device=device)[:, None] * t + index.to(device)).reshape(-1)


@contextlib.contextmanager
def fused_capture(
    adapter: Adapter,
    backend: str = "torch",
    activation: str = "down_proj_input",
    select: Selector = last_position,
    image_mask: torch.Tensor | None = None,
    reduce: str = "mean",
    fold_norm: bool = False,
) -> Iterator[CaptureStore]:
    """Swap every MLP's forward for the fused one, yield the store, restore the forwards on exit.

    Fills the same `CaptureStore` as `capture.capture` (rows of h, or of act(gate) alone with
    activation="act_fn"; image-position stats: 'sum' for reduce="mean", 'max'/'min' for "max").
    fold_norm: also keep the final norm's inputs at the same rows (a forward pre-hook, removed on exit).
    """
    problem = fused_problem(adapter)
    if problem:
        raise MMNError(f"the fused capture cannot run on this model: {problem}; use backend='torch'")
    if activation not in ("down_proj_input", "act_fn"):
        raise MMNError(f"unknown activation '{activation}': use 'down_proj_input' or 'act_fn'")
    store = CaptureStore(adapter.n_layers)
    row_cache: dict[torch.device, tuple] = {}  # device -> ((B, T), capture rows), one tensor for its layers

    def capture_rows(b: int, t: int, device: torch.device) -> torch.Tensor:
        """The same tensor object for every layer of a call on a device, so the kernel's launch
        plan is reused (building it needs a device sync), also when layers alternate devices."""
        hit = row_cache.get(device)
        if hit is None or hit[0] != (b, t):
            hit = row_cache[device] = ((b, t), _rows(select, b, t, device))
        return hit[1]
    signs: dict[tuple, torch.Tensor] = {}  # (F, device, dtype, reduce) -> [F, K] +-1 columns

    def image_proj(f: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Columns of ones (sum) or +1/-1 (max h, -min h): the group reduce then yields raw stats."""
        key = (f, device, dtype, reduce)
        if key not in signs:
            cols = [1.0] if reduce == "mean" else [1.0, -1.0]
            signs[key] = torch.tensor(cols, device=device, dtype=dtype).expand(f, -1).contiguous()
        return signs[key]

    def image_groups(device: torch.device) -> torch.Tensor:
        """[B*T] sample index of each image row, -1 elsewhere; one tensor shared by all layers."""
        if device not in groups:
            mask = image_mask.to(device)  # [B, T]
            groups[device] = torch.where(mask, torch.arange(mask.shape[0], device=device)[:, None], -1).reshape(-1)
        return groups[device]

    groups: dict[torch.device, torch.Tensor] = {}

    def make_forward(layer: int, mlp: nn.Module):
        in_name, up_name, out_name, act_name = _layout(mlp)
        act_module = getattr(mlp, act_name)
        act = activation_name(act_module)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t = x.shape[0], x.shape[1]  # x: [B, T, d]
            gate = getattr(self, in_name)(x)  # [B, T, F]
            up = getattr(self, up_name)(x) if up_name else None
            f = gate.shape[-1]
            kwargs = {}
            image_call = image_mask is not None and store.image[layer] is None and t == image_mask.shape[1]
            if image_call and activation == "down_proj_input":
                group = image_groups(x.device)  # [B*T]
                acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
                kwargs = dict(proj=image_proj(f, x.device, acc), row_group=group, n_groups=b,
                              reduce="sum" if reduce == "mean" else "max")
            if t == 1 and not image_call and not DECODE_WITH_KERNEL:
                # A decode step (one new position per sample, nothing scored) has B rows: the
                # kernel saves no memory traffic worth a Triton launch and our argument checks
                # there, and host time per layer is what a decode step pays (bench/run_kernels.py,
                # host table). The model's own ops, so captures are bit-identical to plain hooks.
                a = act_module(gate)  # [B, 1, F]
                h = a * up if up is not None else a
                kept = (a if activation == "act_fn" else h).detach()
                if select is not last_position:  # the last position of a one-position step is all of it
                    kept = kept.reshape(-1, f).index_select(0, capture_rows(b, t, x.device)).view(b, -1, f)
                store.rows[layer].append(kept)
                return getattr(self, out_name)(h)
            out = act_score(gate.reshape(-1, f), None if up is None else up.reshape(-1, f), act,
                            capture_rows=capture_rows(b, t, x.device), capture_act=activation == "act_fn",
                            backend=backend, act_module=act_module, **kwargs)
            rows = out.captured_act if activation == "act_fn" else out.captured  # [B*S, F]
            store.rows[layer].append(rows.view(b, -1, f))
            if image_call:
                count = image_mask.to(x.device).sum(1)
                if activation == "act_fn":  # stats of act(gate) alone: rare path, plain torch
                    store.image[layer] = _image_reduce(act_module(gate), image_mask.to(x.device))
                elif reduce == "mean":
                    store.image[layer] = {"sum": out.scores[:, 0], "count": count}
                else:
                    store.image[layer] = {"max": out.scores[:, 0], "min": -out.scores[:, 1], "count": count}
            return getattr(self, out_name)(out.h.view(*gate.shape))

        return forward

    patched: list[tuple[nn.Module, object]] = []  # (mlp, its own instance-level forward or None)
    handle = None
    try:
        if fold_norm:
            if adapter.final_norm is None:
                raise MMNError("fold_final_norm=True needs the final norm; pass final_norm='<path>' to load()")
            handle = adapter.final_norm.register_forward_pre_hook(
                lambda _m, args: store.norm_rows.append(select(args[0]).detach()))
        for layer, mlp in enumerate(adapter.mlps):
            patched.append((mlp, mlp.__dict__.get("forward")))
            mlp.forward = types.MethodType(make_forward(layer, mlp), mlp)
        yield store
    finally:
        if handle is not None:
            handle.remove()
        for mlp, own in patched:
            if own is None:
                del mlp.forward
            else:
                mlp.forward = own
