"""Triton kernel of `vocab_topk` (imported only by `vocab_topk_triton`, so triton stays optional).

Each (value, token id) pair is packed into one int64 key whose signed order is the float order:
the fp32 bits mapped to an order-preserving int32 in the high half, `2^31 - 1 - id` in the low half
(so ties go to the smaller id, as a stable sort would). A top-k then only compares int64 keys:
a bitonic top-k of each logits tile, merged into the sorted running top-k with one bitonic step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import interpreter_on, next_pow2, topk_buffers

_KEY_MIN = tl.constexpr(-9223372036854775808)  # below every real key: padding and masked columns


@triton.jit
def _pack(x, low, valid):
    """fp32 [BF, BV] + int64 low bits [1, BV] -> int64 keys ordered like x (then by smaller id)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude bits
    key = (ordered.to(tl.int64) << 32) | low
    return tl.where(valid, key, _KEY_MIN)


if hasattr(triton, "constexpr_function"):

    @triton.constexpr_function
    def _log2(n):
        return int(n).bit_length() - 1  # n is a power of two

else:  # older triton: the standard library's own helper
    from triton.language.standard import _log2


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0 / 1 along the j-th innermost axis of an n_dims hypercube (which side of a pair)."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr):
    """Order every pair along the i-th innermost axis of the hypercube h (ascending where flip is 0).

    Same network as tl.sort, but the pair is ordered with max / min over the size-2 axis instead
    of an xor_sum: triton's interpreter runs xor_sum element by element in Python (seconds per
    call), max / min as numpy reductions."""
    n_dims: tl.constexpr = _log2(h.numel)
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)).to(tl.int1), hi, lo)


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """`stage` rounds of compare-swap; order 0 ascending, 1 descending, 2 alternating."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_swap(h, flip, stage - 1 - i)
    return h


@triton.jit
def _topk(x, KP: tl.constexpr, ORDER: tl.constexpr):
    """Top KP of each row of x [R, C], sorted ascending (ORDER 0) or descending (1); bitonic
    top-k as tl.topk."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(KP)
    if log_k == 0:
        out = tl.max(x, axis=1, keep_dims=True)
    else:
        h = tl.reshape(x, [2] * _log2(x.numel))
        for i in tl.static_range(1, log_k + 1):  # sort runs of KP, alternating directions
            h = _bitonic_stage(h, i, 2 if i < log_n else ORDER)
        for i in tl.static_range(log_k + 1, log_n + 1):  # keep the larger half of each run pair
            h = tl.max(h, axis=_log2(h.numel) - 1 - log_k)
            h = _bitonic_stage(h, log_k, 2 if i < log_n else ORDER)
        out = tl.reshape(h, [x.shape[0], KP])
    return out


@triton.jit
def _merge(running, keys, KP: tl.constexpr):
    """Running top-KP [BF, KP] (sorted descending) merged with the top-KP of a tile's keys."""
    t = _topk(keys, KP, 0)  # [BF, KP] sorted ascending
    # running (descending) against t (ascending): the pairwise max is a bitonic sequence holding
    # the KP largest of the union; one bitonic merge sorts it. (No tl.flip: it is an xor_sum too.)
    m = tl.maximum(running, t)
    if KP > 1:
        m = tl.reshape(_bitonic_stage(tl.reshape(m, [2] * _log2(m.numel)), _log2(KP), 1), [m.shape[0], KP])
    return m


@triton.jit
def _update(running, x, low, valid, KP: tl.constexpr):
    """Merge a logits tile into the running top-KP; skipped when no key beats any row's KP-th best."""
    keys = _pack(x, low, valid)  # [BF, BV]
    beats = keys > tl.min(running, axis=1, keep_dims=True)
    if tl.max(beats.to(tl.int32)) > 0:
        running = _merge(running, keys, KP)
    return running


@triton.jit
def _store(keys, val_ptr, id_ptr, fs, fmask, K, KP: tl.constexpr, NEGATE: tl.constexpr):
    """Decode keys [BF, KP] back to fp32 values and int64 ids; store the first K columns."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    vals = bits.to(tl.float32, bitcast=True)
    if NEGATE:
        vals = -vals
    ids = 2147483647 - (keys & 0xFFFFFFFF)
    ks = tl.arange(0, KP)
    offs = fs[:, None] * K + ks[None, :]
    mask = fmask[:, None] & (ks < K)[None, :]
    tl.store(val_ptr + offs, vals, mask=mask)
    tl.store(id_ptr + offs, ids, mask=mask)


@triton.jit
def vocab_topk_kernel(
    wo_ptr,  # [d, F], strides (s_wo_d, s_wo_f)
    wu_ptr,  # [V, d], strides (s_wu_v, s_wu_d)
    top_v_ptr,  # [F, K] fp32 contiguous
    top_i_ptr,  # [F, K] int64 contiguous
    bot_v_ptr,  # [F, K] fp32 contiguous
    bot_i_ptr,  # [F, K] int64 contiguous
    D,
    F,
    V,
    K,
    s_wo_d,
    s_wo_f,
    s_wu_v,
    s_wu_d,
    TOP: tl.constexpr,
    BOTTOM: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's half dot is wrong)
    PRECISION: tl.constexpr,  # "ieee" for fp32 weights: no TF32 rounding in the ranking
):
    pid = tl.program_id(0)
    fs = pid * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    fmask = fs < F
    top = tl.full([BLOCK_F, KP], _KEY_MIN, tl.int64)
    bot = tl.full([BLOCK_F, KP], _KEY_MIN, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)  # [BV]
        vmask = vs < V
        acc = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            a = tl.load(
                wo_ptr + ds[None, :] * s_wo_d + fs[:, None] * s_wo_f,
                mask=fmask[:, None] & dmask[None, :], other=0.0,
            )  # [BF, BD] = W_out^T tile
            b = tl.load(
                wu_ptr + vs[None, :] * s_wu_v + ds[:, None] * s_wu_d,
                mask=dmask[:, None] & vmask[None, :], other=0.0,
            )  # [BD, BV] = W_U^T tile
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)  # [BF, BV]
        low = (2147483647 - vs).to(tl.int64)[None, :]
        valid = vmask[None, :]
        if TOP:
            top = _update(top, acc, low, valid, KP)
        if BOTTOM:
            bot = _update(bot, -acc, low, valid, KP)
    if TOP:
        _store(top, top_v_ptr, top_i_ptr, fs, fmask, K, KP, False)
    if BOTTOM:
        _store(bot, bot_v_ptr, bot_i_ptr, fs, fmask, K, KP, True)


def launch_vocab_topk(
    w_out: torch.Tensor,
    w_u: torch.Tensor,
    k: int,
    *,
    largest: bool,
    both: bool,
    block_f: int,
    block_v: int,
    block_d: int,
    out: tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, ...]:
    """Launcher (shapes validated by `vocab_topk_triton`); (values, ids) pairs as `topk_buffers`."""
    for name, b in (("block_f", block_f), ("block_v", block_v), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
    d, f = w_out.shape
    v = w_u.shape[0]
    k = min(k, v)
    kp = next_pow2(k)
    block_v = max(block_v, kp)  # tl.topk needs k <= the tile width
    top, bottom = (True, True) if both else (largest, not largest)
    bufs = topk_buffers(out, 4 if both else 2, f, k, w_out.device)
    top_v, top_i = bufs[0], bufs[1]  # unused by the kernel when TOP is off
    bot_v, bot_i = (bufs[2], bufs[3]) if both else (bufs[0], bufs[1])
    if f > 0:
        fp32 = w_out.dtype == torch.float32
        vocab_topk_kernel[(triton.cdiv(f, block_f),)](
            w_out, w_u, top_v, top_i, bot_v, bot_i, d, f, v, k,
            w_out.stride(0), w_out.stride(1), w_u.stride(0), w_u.stride(1),
            TOP=top, BOTTOM=bottom, KP=kp, BLOCK_F=block_f, BLOCK_V=block_v, BLOCK_D=block_d,
            UPCAST=interpreter_on() and not fp32, PRECISION="ieee" if fp32 or interpreter_on() else "tf32",
        )
    return tuple(bufs)
