"""Per-row neuron edits of an output projection: `out[b] += h[b][:, S_p] @ D_p` for the patch p of row b.

A patch replaces the output vectors of neurons S (columns of W_out) by V. For one row that is the
same as adding `h[:, S] @ (V - W_out[:, S])^T` to the projection's output, so rows of one batch can
carry different patches (or none) while every row shares the unchanged weight: a gather and a small
matmul per distinct patch, the shape of work of multi-LoRA's segmented kernels.

`neuron_delta_torch` is the reference and the CPU path (a gather and one batched matmul);
`neuron_delta_triton` (kernel in `_neuron_delta_triton.py`, imported only when called) does all
patches of a layer in one launch, segmented by the row's patch; `neuron_delta` dispatches. Both
accumulate in fp32 (fp64 for fp64 inputs) and add to `out` in that precision before rounding once
to `out`'s dtype; rows without a patch are returned bit for bit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton_util import require_triton

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NeuronDeltas(NamedTuple):
    """The edits of one layer for the P distinct patches of a batch (padded to n = the most neurons)."""

    idx: torch.Tensor  # [P, n] int64 neuron indices (padding: 0)
    delta: torch.Tensor  # [P, n, d] new minus old output vectors, fp32 (fp64 for fp64 models); padding: 0
    counts: torch.Tensor  # [P] int64 neurons of each patch in this layer (0: the patch leaves it alone)
    counts_list: tuple[int, ...]  # the same counts on the host (the torch path loops over them)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(h: torch.Tensor, out: torch.Tensor, row_patch: torch.Tensor, deltas: NeuronDeltas) -> None:
    """Shapes and devices: h [B, T, F], out [B, T, d], row_patch [B] in -1..P-1, deltas on one device."""
    if h.dim() != 3 or out.dim() != 3 or h.shape[:2] != out.shape[:2]:
        raise ValueError(f"h must be [B, T, F] and out [B, T, d] with the same B, T; got {tuple(h.shape)} "
                         f"and {tuple(out.shape)}")
    p, n = deltas.idx.shape
    if tuple(deltas.delta.shape) != (p, n, out.shape[2]) or tuple(deltas.counts.shape) != (p,):
        raise ValueError(f"deltas must be idx [P, n], delta [P, n, d={out.shape[2]}], counts [P]; got "
                         f"{tuple(deltas.idx.shape)}, {tuple(deltas.delta.shape)}, {tuple(deltas.counts.shape)}")
    if tuple(row_patch.shape) != (h.shape[0],):
        raise ValueError(f"row_patch must be [B={h.shape[0]}], got {tuple(row_patch.shape)}")
    devices = {t.device for t in (h, out, row_patch, *deltas[:3])}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def neuron_delta_torch(h: torch.Tensor, out: torch.Tensor, row_patch: torch.Tensor,
                       deltas: NeuronDeltas) -> torch.Tensor:
    """Reference and CPU path: a new tensor equal to `out` with each patched row corrected, in a fixed
    number of batched ops whatever the number of patches (a gather of every row's neuron columns, one
    batched matmul, a select that keeps unpatched rows' bits).

    h:         [B, T, F]  input of the output projection
    out:       [B, T, d]  its output (not modified)
    row_patch: [B] int64  the patch of each row, -1 for none
    deltas:    the P patches' edits of this layer
    returns    [B, T, d] in out's dtype
    """
    _check(h, out, row_patch, deltas)
    acc = _acc_dtype(out)
    p = row_patch.clamp(min=0)  # [B]
    patched = (row_patch >= 0) & (deltas.counts.index_select(0, p) > 0)  # [B]
    cols = deltas.idx.index_select(0, p)  # [B, n]; padding columns meet zero rows of delta
    hs = torch.gather(h, 2, cols[:, None, :].expand(-1, h.shape[1], -1)).to(acc)  # [B, T, n]
    corr = torch.bmm(hs, deltas.delta.index_select(0, p).to(acc))  # [B, T, d]
    return torch.where(patched[:, None, None], (out.to(acc) + corr).to(out.dtype), out)


def neuron_delta_triton(h: torch.Tensor, out: torch.Tensor, row_patch: torch.Tensor, deltas: NeuronDeltas,
                        block_t: int = 16, block_n: int = 16, block_d: int = 64) -> torch.Tensor:
    """One launch for all patches of a layer: programs over (row, block of positions, block of d);
    a program of an unpatched row stores nothing. Writes into `out` (returned), so call it only where
    no autograd graph needs the unpatched output (`neuron_delta` checks)."""
    _check(h, out, row_patch, deltas)
    if h.dtype not in TRITON_DTYPES or out.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton path takes fp32/fp16/bf16 activations, got {h.dtype} and {out.dtype}")
    require_triton(h, out)
    from ._neuron_delta_triton import launch_neuron_delta

    launch_neuron_delta(h, out, row_patch, deltas, block_t, block_n, block_d)
    return out


def neuron_delta(h: torch.Tensor, out: torch.Tensor, row_patch: torch.Tensor, deltas: NeuronDeltas,
                 backend: str = "torch") -> torch.Tensor:
    """`out` with each row's patch applied (see `neuron_delta_torch`). backend="triton" runs the kernel
    (in place) for fp32/fp16/bf16 inputs outside autograd, the torch path otherwise."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
    grad = torch.is_grad_enabled() and (h.requires_grad or out.requires_grad)
    if backend == "triton" and not grad and h.dtype in TRITON_DTYPES and out.dtype in TRITON_DTYPES:
        return neuron_delta_triton(h, out, row_patch, deltas)
    return neuron_delta_torch(h, out, row_patch, deltas)
