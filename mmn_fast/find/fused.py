"""Fused capture: while a capture is active, each MLP's forward runs `act_score` beside its own ops.

The MLP computes `h` (what the output projection consumes) with its own modules, exactly as without a
capture, so a capture never changes what the model says (on any backend or dtype). `act_score` then
only reads h ("identity" mode): it copies the rows the score needs into the capture store and, for
`positions="image"`, reduces h over the image tokens, in one pass (one Triton kernel on the "triton"
backend). One-position decode steps, which score nothing, index the captured rows instead
(`Engine.decode_with_kernel` runs the kernel there too). The original forward is restored exactly
on exit: nothing stays patched and there is no overhead outside a capture.

(Until 2026-12 the kernel computed h itself, rounding act(gate) * up once where the model rounds
act(gate) first: captions could differ from plain generate's in low precision. That design saved one
pass over h on the GPU; exactness comes first.)

Only MLPs whose forward is known are fused: LLaMA-style `down_proj(act_fn(gate_proj(x)) * up_proj(x))`
(LLaMA, Vicuna, Mistral, Qwen2, Gemma) and CLIP/Phi-style `fc2(activation_fn(fc1(x)))`, with any
activation module (the forward runs it). `fused_problem` says why a model does not qualify.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from ..errors import MMNError
from ..kernels import ActScorePlans, act_score
from ..model.adapters import Adapter, check_activation
from .capture import CaptureStore, Selector, last_position

_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")
_PLAIN = (("fc1", "fc2", "activation_fn"), ("fc1", "fc2", "act_fn"))


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
    return None


def _rows(select: Selector, b: int, t: int, device: torch.device) -> torch.Tensor:
    """Flat row indices (into [B*T]) of the positions `select` keeps: [B*S]."""
    if select is last_position:
        return torch.arange(b, device=device) * t + (t - 1)
    index = getattr(select, "index", None)
    if index is None:
        raise MMNError("the fused capture needs last_position or gather_positions selectors")
    return (torch.arange(b, device=device)[:, None] * t + index.to(device)).reshape(-1)


class FusedCapture:
    """The fused MLP forwards of one capture and the `CaptureStore` they fill.

    `forward(layer, x)` replaces layer `layer`'s MLP forward while `patched()` is active. The row
    indices, image-row groups and sign columns it hands the kernel are built once per device (and
    shape) and shared by all layers, so the kernel's launch plan is reused.
    """

    def __init__(self, adapter: Adapter, backend: str, activation: str, select: Selector,
                 image_mask: torch.Tensor | None, reduce: str, decode_with_kernel: bool):
        self.adapter, self.backend, self.activation = adapter, backend, activation
        self.select, self.image_mask, self.reduce = select, image_mask, reduce
        self.decode_with_kernel = decode_with_kernel
        self.store = CaptureStore(adapter.n_layers)
        self.layers = []  # per layer: (in_proj name, up_proj name or None, out_proj name, act module)
        for mlp in adapter.mlps:
            in_name, up_name, out_name, act_name = _layout(mlp)
            self.layers.append((in_name, up_name, out_name, getattr(mlp, act_name)))
        self._row_cache: dict[torch.device, tuple] = {}  # device -> ((B, T), capture rows [B*S])
        self._signs: dict[tuple, torch.Tensor] = {}  # (F, device, dtype, reduce) -> [F, K] +-1 columns
        self._groups: dict[torch.device, torch.Tensor] = {}  # device -> [B*T] sample of each image row
        # The kernel's range checks and launch plans, keyed by the shared tensors above: made once per
        # call and device, reused by every layer; they live as long as this capture.
        self.plans = ActScorePlans()

    @contextlib.contextmanager
    def patched(self) -> Iterator[CaptureStore]:
        """Every MLP's forward swapped for `forward` inside the block; the originals restored on exit."""
        saved: list[tuple[nn.Module, object]] = []  # (mlp, its own instance-level forward or None)
        try:
            for layer, mlp in enumerate(self.adapter.mlps):
                saved.append((mlp, mlp.__dict__.get("forward")))
                mlp.forward = functools.partial(self.forward, layer)
            yield self.store
        finally:
            for mlp, own in saved:
                if own is None:
                    del mlp.forward
                else:
                    mlp.forward = own

    def capture_rows(self, b: int, t: int, device: torch.device) -> torch.Tensor:
        """[B*S] rows to capture: the same tensor object for every layer of a call on a device (also
        when layers alternate devices), as building the kernel's launch plan needs a device sync."""
        hit = self._row_cache.get(device)
        if hit is None or hit[0] != (b, t):
            hit = self._row_cache[device] = ((b, t), _rows(self.select, b, t, device))
        return hit[1]

    def image_proj(self, f: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[F, K] columns of ones (sum) or +1/-1 (max h, -min h): the group reduce then yields raw stats."""
        key = (f, device, dtype, self.reduce)
        if key not in self._signs:
            cols = [1.0] if self.reduce == "mean" else [1.0, -1.0]
            self._signs[key] = torch.tensor(cols, device=device, dtype=dtype).expand(f, -1).contiguous()
        return self._signs[key]

    def image_groups(self, device: torch.device) -> torch.Tensor:
        """[B*T] sample index of each image row, -1 elsewhere; one tensor shared by all layers."""
        if device not in self._groups:
            mask = self.image_mask.to(device)  # [B, T]
            self._groups[device] = torch.where(mask, torch.arange(mask.shape[0], device=device)[:, None],
                                               -1).reshape(-1)
        return self._groups[device]

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s MLP on x [B, T, d] -> [B, T, d], capturing its rows (and image stats)."""
        mlp = self.adapter.mlps[layer]
        in_name, up_name, out_name, act_module = self.layers[layer]
        t = x.shape[1]
        gate = getattr(mlp, in_name)(x)  # [B, T, F]
        up = getattr(mlp, up_name)(x) if up_name else None
        a = act_module(gate)  # [B, T, F]: the model's own ops, so the forward is the model's exactly
        h = a * up if up is not None else a
        kept = a if self.activation == "act_fn" else h  # what is captured
        image_call = self.image_mask is not None and self.store.image[layer] is None and t == self.image_mask.shape[1]
        if t == 1 and not image_call and not self.decode_with_kernel:
            self.decode_step(layer, kept, x.device)
        else:
            self.kernel_step(layer, kept, image_call, x.device)
        return getattr(mlp, out_name)(h)

    def decode_step(self, layer: int, kept: torch.Tensor, device: torch.device) -> None:
        """A decode step (one new position per sample, nothing scored) has B rows: the kernel saves no
        memory traffic worth a Triton launch and our argument checks there, and host time per layer
        is what a decode step pays (bench/run_kernels.py, host table). kept: [B, 1, F]."""
        b, f = kept.shape[0], kept.shape[-1]
        kept = kept.detach()
        if self.select is not last_position:  # the last position of a one-position step is all of it
            kept = kept.reshape(-1, f).index_select(0, self.capture_rows(b, 1, device)).view(b, -1, f)
        self.store.rows[layer].append(kept)

    def kernel_step(self, layer: int, kept: torch.Tensor, image_call: bool, device: torch.device) -> None:
        """`act_score` reading kept [B, T, F] (h, or act(gate) for activation="act_fn"): keeps the captured
        rows and, in the prefill of an image capture, the image-position stats."""
        b, t, f = kept.shape
        kwargs = {}
        if image_call:
            acc = torch.float64 if kept.dtype == torch.float64 else torch.float32
            kwargs = dict(proj=self.image_proj(f, device, acc), row_group=self.image_groups(device), n_groups=b,
                          reduce="sum" if self.reduce == "mean" else "max")
        out = act_score(kept.detach().reshape(-1, f), None, "identity", capture_rows=self.capture_rows(b, t, device),
                        backend=self.backend, plans=self.plans, **kwargs)
        self.store.rows[layer].append(out.captured.view(b, -1, f))
        if image_call:
            mask = self.image_mask.to(device)  # [B, T]
            if self.reduce == "mean":
                self.store.image[layer] = {"sum": out.scores[:, 0], "count": mask.sum(1)}
            else:
                self.store.image[layer] = {"max": out.scores[:, 0], "min": -out.scores[:, 1], "count": mask.sum(1)}


@contextlib.contextmanager
def fused_capture(
    adapter: Adapter,
    backend: str = "torch",
    activation: str = "down_proj_input",
    select: Selector = last_position,
    image_mask: torch.Tensor | None = None,
    reduce: str = "mean",
    fold_norm: bool = False,
    decode_with_kernel: bool = False,
) -> Iterator[CaptureStore]:
    """Swap every MLP's forward for the fused one, yield the store, restore the forwards on exit.

    Fills the same `CaptureStore` as `capture.capture` (rows of h, or of act(gate) alone with
    activation="act_fn"; image-position stats: 'sum' for reduce="mean", 'max'/'min' for "max").
    fold_norm: also keep the final norm's inputs at the same rows (a hook, removed on exit).
    decode_with_kernel: run the kernel at one-position decode steps too (`Engine.decode_with_kernel`).
    """
    problem = fused_problem(adapter)
    if problem:
        raise MMNError(f"the fused capture cannot run on this model: {problem}; use backend='torch'")
    check_activation(activation)
    fused = FusedCapture(adapter, backend, activation, select, image_mask, reduce, decode_with_kernel)
    with contextlib.ExitStack() as stack:
        if fold_norm:
            stack.enter_context(adapter.final_norm_site().hooked(
                lambda x: fused.store.norm_rows.append(select(x).detach())))
        yield stack.enter_context(fused.patched())
