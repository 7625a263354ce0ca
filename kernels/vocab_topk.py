"""Each neuron's top tokens: top-k of each row of `W_out^T W_U^T` [F, V] without forming it.

The vocabulary is walked in chunks with a running top-k, so the extra memory is O(F x chunk).
`vocab_topk_triton` (kernels in `_vocab_filter_triton.py` and `_vocab_topk_triton.py`, imported only
when called) filters the logits against a per-row threshold inside one GEMM, or keeps a running
top-k in registers; `vocab_topk` dispatches.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton_util import require_triton

MAX_K = 64
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class VocabTopK(NamedTuple):
    """Top-k and bottom-k of each row, both sorted best first (largest / most negative first)."""

    top_values: torch.Tensor  # [F, k] fp32
    top_ids: torch.Tensor  # [F, k] int64
    bottom_values: torch.Tensor  # [F, k] fp32
    bottom_ids: torch.Tensor  # [F, k] int64


def _merge(best, v, i, k, largest):
    """Merge a chunk's (values, ids) into the running top-k (fewer than k while chunks are shorter than k)."""
    if best is None:
        return v, i
    both_v = torch.cat([best[0], v], dim=1)
    both_i = torch.cat([best[1], i], dim=1)
    best_v, pick = both_v.topk(min(k, both_v.shape[1]), dim=1, largest=largest)
    return best_v, both_i.gather(1, pick)


def vocab_topk_torch(
    w_out: torch.Tensor, w_u: torch.Tensor, k: int, chunk: int = 4096, largest: bool = True, both: bool = False
):
    """Top-k (or bottom-k with largest=False) tokens per neuron.

    w_out: [d, F]   output projection weight
    w_u:   [V, d]   unembedding
    returns (values [F, k] fp32, token ids [F, k] int64), sorted best first;
    with both=True a VocabTopK with the top-k and the bottom-k from the same pass (largest ignored)
    """
    if w_out.shape[0] != w_u.shape[1]:
        raise ValueError(f"w_out is [{w_out.shape[0]}, F] but w_u is [V, {w_u.shape[1]}]: d must match")
    n_vocab = w_u.shape[0]
    k = min(k, n_vocab)
    w_t = w_out.t().float()  # [F, d]
    top = bottom = None
    for start in range(0, n_vocab, chunk):
        logits = w_t @ w_u[start : start + chunk].float().t()  # [F, chunk]
        kc = min(k, logits.shape[1])
        if both or largest:
            v, i = logits.topk(kc, dim=1, largest=True)
            top = _merge(top, v, i + start, k, True)
        if both or not largest:
            v, i = logits.topk(kc, dim=1, largest=False)
            bottom = _merge(bottom, v, i + start, k, False)
    if both:
        return VocabTopK(*top, *bottom)
    return top if largest else bottom


def vocab_topk_triton(
    w_out: torch.Tensor,
    w_u: torch.Tensor,
    k: int,
    largest: bool = True,
    both: bool = False,
    method: str = "filter",
    block_f: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    probe_stride: int = 8,
    capacity: int | None = None,
    gemm: str = "triton",
    chunk: int = 8192,
    num_warps: int = 8,
    num_stages: int = 3,
    out: tuple[torch.Tensor, ...] | None = None,
):
    """Triton path of `vocab_topk`; F x V is never stored. fp32 / fp16 / bf16 weights of one dtype.

    method="filter" (default): a probe of every `probe_stride`-th token gives each row a threshold
    under its k-th logit; one tiled GEMM then appends only the logits past it to a per-row buffer
    of `capacity` slots (about 2 k probe_stride by default), and a top-k of that buffer finishes.
    No sort runs in the GEMM, so the cost is the matmul plus 1/probe_stride of it for the probe.
    Rows that overflow the buffer are recomputed exactly by the torch path. gemm="torch" leaves
    the logits to cuBLAS, `chunk` tokens at a time in fp32 (extra memory F x chunk x 4 bytes), and
    runs only the filter in Triton: the yardstick for the fused GEMM's own efficiency.
    num_warps / num_stages: the filter kernel's launch configuration (128x128x64 tiles, 8 warps and
    3 stages by default: the largest that keep its main loop free of register spills on sm_90).
    method="bitonic": one program per block_f neurons walks the vocabulary in block_v tiles and
    keeps a running top-k in registers (bitonic merges); the sorting, not the matmul, bounds it
    (docs/benchmarks.md). Kept as the comparison for the filter method.
    `out` may hold preallocated contiguous (values [F, k] fp32, ids [F, k] int64) buffers, four of
    them for both=True (top values, top ids, bottom values, bottom ids); k here is min(k, V).
    Returns what `vocab_topk_torch` returns; ties go to the smaller token id.
    """
    _check_topk(w_out, w_u, k, max_k=MAX_K)
    if not triton_takes(w_out, w_u, k):
        raise ValueError(
            f"the Triton path takes fp32/fp16/bf16 weights of one dtype, got {w_out.dtype} and {w_u.dtype}"
        )
    if method not in ("filter", "bitonic"):
        raise ValueError(f"unknown method {method!r}; expected 'filter' or 'bitonic'")
    require_triton(w_out, w_u)
    if method == "filter":
        from ._vocab_filter_triton import FilterTuning, launch_vocab_filter

        tuning = FilterTuning(
            probe_stride=probe_stride, capacity=capacity, gemm=gemm, chunk=chunk, block_f=block_f or 128,
            block_v=block_v or 128, block_d=block_d or 64, group_f=8, num_warps=num_warps, num_stages=num_stages,
        )
        res = launch_vocab_filter(w_out, w_u, k, largest=largest, both=both, out=out, tuning=tuning)
    else:
        from ._vocab_topk_triton import launch_vocab_topk

        res = launch_vocab_topk(w_out, w_u, k, largest=largest, both=both, block_f=block_f or 64,
                                block_v=block_v or 128, block_d=block_d or 64, out=out)
    return VocabTopK(*res) if both else res


def triton_takes(w_out: torch.Tensor, w_u: torch.Tensor, k: int) -> bool:
    """Whether the Triton path takes these weights and k: 1 <= k <= 64, fp32/fp16/bf16 of one dtype."""
    return 1 <= k <= MAX_K and w_out.dtype in TRITON_DTYPES and w_u.dtype == w_out.dtype


def _check_topk(w_out: torch.Tensor, w_u: torch.Tensor, k: int, max_k: int | None) -> None:
    """Shapes, devices and 1 <= k <= max_k (None: no upper bound; k is capped at V)."""
    if w_out.dim() != 2 or w_u.dim() != 2:
        raise ValueError(f"w_out must be [d, F] and w_u [V, d], got {tuple(w_out.shape)} and {tuple(w_u.shape)}")
    if w_out.shape[0] != w_u.shape[1]:
        raise ValueError(f"w_out is [{w_out.shape[0]}, F] but w_u is [V, {w_u.shape[1]}]: d must match")
    if w_out.device != w_u.device:
        raise ValueError("w_out and w_u must be on one device")
    if k < 1 or (max_k is not None and k > max_k):
        raise ValueError(f"k must be in 1..{max_k}, got {k}" if max_k is not None else f"k must be >= 1, got {k}")
    if w_u.shape[0] == 0:
        raise ValueError("w_u has no rows (V = 0)")


def vocab_topk(
    w_out: torch.Tensor,
    w_u: torch.Tensor,
    k: int,
    largest: bool = True,
    both: bool = False,
    backend: str = "torch",
    chunk: int = 4096,
):
    """Top-k tokens of each neuron (bottom-k with largest=False, both with both=True).

    w_out:   [d, F], w_u: [V, d], k >= 1 (capped at V)
    backend: "torch", or "triton": the Triton kernel where it takes the input (`triton_takes`:
             k <= 64, fp32/fp16/bf16 weights of one dtype), the torch path otherwise, so a caller
             passes its backend once and any k or dtype still works
    chunk:   vocabulary tokens per step of the torch path (extra memory F x chunk x 4 bytes)
    returns (values [F, k] fp32, ids [F, k] int64) sorted best first, or a VocabTopK for both=True
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
    _check_topk(w_out, w_u, k, max_k=None)
    if backend == "triton" and triton_takes(w_out, w_u, k):
        return vocab_topk_triton(w_out, w_u, k, largest=largest, both=both)
    return vocab_topk_torch(w_out, w_u, k, chunk=chunk, largest=largest, both=both)
