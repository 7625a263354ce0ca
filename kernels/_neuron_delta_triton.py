"""Triton kernel of `neuron_delta` (imported only by `neuron_delta_triton`, so triton stays optional).

One program per (row b, block of positions, block of d): it reads the row's patch p, gathers the
columns S_p of h for its positions (block_n neurons at a time), multiplies by the matching rows of
D_p in fp32 and adds the result to `out`, rounding once. A row without a patch loads and stores
nothing, so it keeps its bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_math import round_to
from ._triton_util import interpreter_on


@triton.jit
def neuron_delta_kernel(
    h_ptr,  # [B, T, F] strided
    out_ptr,  # [B, T, d] strided, updated in place
    row_patch_ptr,  # [B] int64, -1 = no patch
    idx_ptr,  # [P, N] int64 contiguous
    delta_ptr,  # [P, N, D] fp32 contiguous
    counts_ptr,  # [P] int64
    T,
    D,
    N,
    stride_hb,
    stride_ht,
    stride_hf,
    stride_ob,
    stride_ot,
    stride_od,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RNE_BF16: tl.constexpr,  # round bf16 outputs by hand (interpreter only)
):
    b = tl.program_id(0)
    p = tl.load(row_patch_ptr + b)
    patched = p >= 0
    p = tl.maximum(p, 0)
    n_p = tl.where(patched, tl.load(counts_ptr + p), 0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_t = offs_t < tl.where(patched, T, 0)  # an unpatched row loads and stores nothing
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, n_p, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)  # [BN]
        mask_n = offs_n < n_p
        cols = tl.load(idx_ptr + p * N + offs_n, mask=mask_n, other=0)  # [BN] neuron indices
        hs = tl.load(h_ptr + b * stride_hb + offs_t[:, None] * stride_ht + cols[None, :] * stride_hf,
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # [BT, BN]
        dl = tl.load(delta_ptr + (p * N + offs_n[:, None]) * D + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BN, BD]
        acc = tl.dot(hs, dl, acc, input_precision="ieee")  # [BT, BD]
    o_ptrs = out_ptr + b * stride_ob + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od
    o_mask = mask_t[:, None] & mask_d[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, round_to(o + acc, out_ptr.dtype.element_ty, RNE_BF16), mask=o_mask)


def launch_neuron_delta(h: torch.Tensor, out: torch.Tensor, row_patch: torch.Tensor, deltas,
                        block_t: int, block_n: int, block_d: int) -> None:
    """Checked arguments (see `neuron_delta_triton`) -> one launch over [B, ceil(T/bt), ceil(d/bd)]."""
    b, t, _ = h.shape
    d = out.shape[2]
    idx = deltas.idx.contiguous()
    delta = deltas.delta.to(torch.float32).contiguous()
    p, n = idx.shape
    if b == 0 or t == 0 or p == 0 or n == 0:
        return
    grid = (b, triton.cdiv(t, block_t), triton.cdiv(d, block_d))
    neuron_delta_kernel[grid](
        h, out, row_patch.to(torch.int64).contiguous(), idx, delta, deltas.counts.to(torch.int64).contiguous(),
        t, d, n, *h.stride(), *out.stride(),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d,
        RNE_BF16=out.dtype == torch.bfloat16 and interpreter_on(),
    )
