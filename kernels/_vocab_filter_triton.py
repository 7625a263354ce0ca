"""Triton kernel of `vocab_topk`'s filter method (imported only by `vocab_topk_triton`).

A plain tiled GEMM of `W_out^T W_U^T` [F, V] whose epilogue keeps, per row, only the logits at or
above a per-row threshold (or at or below one, for the bottom-k), appending them with their ids
to a per-row candidate buffer, one atomic per kept logit reserving its slot. No sort runs in the
kernel, and the epilogue does almost nothing for the logits it drops; the threshold (from a probe
of the vocabulary, computed first) makes the kept set small, and a `torch.topk` over the
[F, capacity] candidates finishes. The
candidates are ranked as packed int64 keys, the same order as the running top-k kernel's: the
order-preserving int32 of the fp32 bits in the high half, `2^31 - 1 - id` in the low half, so
ties go to the smaller id and the result does not depend on the order the atomics ran in.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton_util import interpreter_on, topk_buffers

# Relative margin under each row's probe threshold (times the row's largest |probe logit|). The
# probe is a torch matmul with fp32 output, so its logits differ from the kernel's fp32 accumulators
# by summation order only, unless torch cannot give fp32 output from half inputs (then 2^-9 bf16 /
# 2^-11 fp16 output rounding), cuBLAS reduces in half precision (split-K), or TF32 is enabled for
# fp32 weights (2^-11 per product). The margins cover several of the worst of those. Exactness does
# not depend on them: candidates are the logits >= the threshold, judged on the kernel's own values,
# so a row with >= k of them holds its exact top-k; a row with fewer is recomputed.
_MARGIN = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8, torch.float32: 2.0**-8}
_FLOOR = 1e-30  # absolute slack: near-zero rows, where rounding error is not relative


@triton.jit
def _append(x, thr, vs, valid, cnt_ptr, val_ptr, id_ptr, fs, fmask, C):
    """Append the logits of x [BF, BV] that are >= thr [BF], with their ids, to each row's slots.

    One atomic per kept logit reserves its slot; the tile is flattened first so the atomics and
    stores run on a plain 1-D layout (on the 2-D MMA layout triton 3.9's layout pass asserts), and
    the few kept logits are the only ones that branch into the atomic. (A cumsum over each tile row
    instead cost 2.4x the epilogue instructions, measured in the sm_90 SASS.)"""
    N: tl.constexpr = x.shape[0] * x.shape[1]
    keep = tl.reshape((x >= thr[:, None]) & valid & fmask[:, None], [N])  # [BF * BV]
    rows = tl.reshape(tl.broadcast_to(fs[:, None], x.shape), [N])
    slot = tl.atomic_add(cnt_ptr + rows, tl.full([N], 1, tl.int32), mask=keep, sem="relaxed")
    ok = keep & (slot < C)  # a full row only counts; the caller recomputes it
    offs = rows.to(tl.int64) * C + slot
    tl.store(val_ptr + offs, tl.reshape(x, [N]), mask=ok)
    tl.store(id_ptr + offs, tl.reshape(tl.broadcast_to(vs[None, :], x.shape), [N]), mask=ok)


@triton.jit
def _logits_tile(wo_ptr, wu_ptr, fs, vs, D, s_wo_d, s_wo_f, s_wu_v, s_wu_d, BLOCK_F: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """[BLOCK_F, BLOCK_V] fp32 tile of W_out^T W_U^T for rows fs and columns vs (both in bounds)."""
    acc = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        a_ptr = wo_ptr + ds[None, :] * s_wo_d + fs[:, None] * s_wo_f  # [BF, BD] = W_out^T tile
        b_ptr = wu_ptr + vs[None, :] * s_wu_v + ds[:, None] * s_wu_d  # [BD, BV] = W_U^T tile
        if EVEN_D:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            dmask = ds < D
            a = tl.load(a_ptr, mask=dmask[None, :], other=0.0)
            b = tl.load(b_ptr, mask=dmask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)  # [BF, BV]
    return acc


@triton.jit
def vocab_filter_kernel(
    wo_ptr,  # [d, F], strides (s_wo_d, s_wo_f); FROM_LOGITS: fp32 logits [F, V - V0], strides (s_wo_f, s_wo_d)
    wu_ptr,  # [V, d], strides (s_wu_v, s_wu_d); unused with FROM_LOGITS
    top_thr_ptr,  # [F] fp32: keep logits >= this
    bot_thr_ptr,  # [F] fp32: keep -logits >= this (the negated bottom threshold)
    top_cnt_ptr,  # [F] int32 zeroed: candidates seen per row (may exceed C)
    bot_cnt_ptr,
    top_val_ptr,  # [F, C] fp32 candidate logits (bottom: negated), slots past the count unwritten
    top_id_ptr,  # [F, C] int32 their token ids
    bot_val_ptr,
    bot_id_ptr,
    D,
    F,
    V0,  # first token id this launch covers (0 unless FROM_LOGITS walks vocabulary chunks)
    V,  # one past the last
    C,
    s_wo_d,
    s_wo_f,
    s_wu_v,
    s_wu_d,
    TOP: tl.constexpr,
    BOTTOM: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_F: tl.constexpr,  # programs grouped along F so neighbouring ones share W_U tiles in L2
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no masks in the inner loop
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's half dot is wrong)
    PRECISION: tl.constexpr,  # "ieee" for fp32 weights: no TF32 rounding in the ranking
    FROM_LOGITS: tl.constexpr,  # the logits come precomputed (a cuBLAS chunk): only the epilogue runs
    HINT_F: tl.constexpr,  # F % 16 == 0: the wrapped row index may be declared contiguous (see below)
    HINT_V: tl.constexpr,  # (V - V0) % 16 == 0: the same for the columns
):
    pid = tl.program_id(0)
    n_f = tl.cdiv(F, BLOCK_F)
    n_v = tl.cdiv(V - V0, BLOCK_V)
    per_group = GROUP_F * n_v
    first_f = (pid // per_group) * GROUP_F
    group_size = tl.minimum(n_f - first_f, GROUP_F)
    pid_f = first_f + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # [BF]
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # [BV] columns of this launch's vocabulary range
    vs = V0 + cols  # token ids
    fmask = fs < F
    vmask = vs < V
    # Out-of-range rows / columns wrap around so loads stay in bounds without masks. The hints (as
    # in triton's matmul tutorial) keep the contiguity a clamp would hide, so loads along F and
    # along the logits' columns vectorize (a tl.where clamp made them 16-bit scalar loads). They
    # claim whole contiguous blocks, which the wrap breaks in the last block: harmless only when
    # the wrap point is a multiple of 16 (no 16-byte vector straddles it), so the launcher sets
    # HINT_F / HINT_V from the sizes (a column slice W_out[:, :100] would otherwise load
    # misaligned vectors across the wrap).
    fs_load = fs % F
    if HINT_F:
        fs_load = tl.max_contiguous(tl.multiple_of(fs_load, BLOCK_F), BLOCK_F)
    cols_load = cols % (V - V0)
    if HINT_V:
        cols_load = tl.max_contiguous(tl.multiple_of(cols_load, BLOCK_V), BLOCK_V)
    fs_load = fs_load.to(tl.int64)  # int64 offsets: F x chunk, or d x V for a transposed W_U, may pass 2^31
    if FROM_LOGITS:
        acc = tl.load(wo_ptr + fs_load[:, None] * s_wo_f + cols_load.to(tl.int64)[None, :] * s_wo_d)  # [BF, BV]
    else:
        acc = _logits_tile(wo_ptr, wu_ptr, fs_load, (V0 + cols_load).to(tl.int64), D, s_wo_d, s_wo_f, s_wu_v,
                           s_wu_d, BLOCK_F, BLOCK_V, BLOCK_D, EVEN_D, UPCAST, PRECISION)

    valid = vmask[None, :]
    if TOP:
        thr = tl.load(top_thr_ptr + fs, mask=fmask, other=0.0)
        _append(acc, thr, vs, valid, top_cnt_ptr, top_val_ptr, top_id_ptr, fs, fmask, C)
    if BOTTOM:
        thr = tl.load(bot_thr_ptr + fs, mask=fmask, other=0.0)
        _append(-acc, thr, vs, valid, bot_cnt_ptr, bot_val_ptr, bot_id_ptr, fs, fmask, C)


def probe_thresholds(w_out, w_u, k, probe_stride, top, bottom, chunk=4096):
    """Per-row thresholds from the logits of every `probe_stride`-th token (at least k of them).

    The k-th largest logit of any subset of a row is at most the row's k-th largest, so every true
    top-k logit is >= the probe's k-th (less a margin for the probe's own rounding). Returns
    (top [F] fp32 or None, negated bottom [F] fp32 or None) and the probe's size."""
    d, f = w_out.shape
    v = w_u.shape[0]
    n_probe = min(v, max(k, -(-v // probe_stride)))
    cols = torch.arange(n_probe, device=w_u.device) * v // n_probe  # distinct, evenly spread ids
    probe_u = w_u.index_select(0, cols)  # [P, d]
    margin = _MARGIN[w_out.dtype]
    tops, bots = [], []
    for s in range(0, f, chunk):
        logits = _matmul_fp32(w_out[:, s : s + chunk].t(), probe_u.t(), exact=False)  # [Fc, P]
        slack = logits.abs().amax(dim=1) * margin + _FLOOR  # [Fc]
        if top:
            tops.append(logits.topk(k, dim=1).values[:, -1] - slack)
        if bottom:
            bots.append(-logits.topk(k, dim=1, largest=False).values[:, -1] - slack)
    cat = lambda parts: torch.cat(parts).contiguous() if parts else None  # noqa: E731
    return cat(tops), cat(bots), n_probe


def pack_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 values + int ids -> int64 keys whose signed order is (value, then smaller id)."""
    bits = values.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude bits
    return (ordered.to(torch.int64) << 32) | (2147483647 - ids.to(torch.int64))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (fp32 values, int64 ids), the inverse of `pack_keys`."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), 2147483647 - (keys & 0xFFFFFFFF)


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """a @ b with fp32 output: half inputs through cuBLAS with fp32 out where torch offers it
    (CUDA), else upcast first (exact products, fp32 sums: on a GPU an fp32 GEMM, several times
    slower). exact=False takes the half-precision GEMM instead of that slow upcast (its output
    rounded to half: fine for the probe, whose margin covers it)."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            if not exact:
                return (a @ b).float()
    return a.float() @ b.float()


def exact_rows(w_out: torch.Tensor, w_u: torch.Tensor, k: int, negate: bool, chunk: int = 4096):
    """Top-k of -logits if negate else logits, for the few rows the candidate buffer could not
    hold, ranked by the same packed keys (so ties still go to the smaller id): a running top-k
    over vocabulary chunks. Returns (values [n, k] fp32 of the logits, ids [n, k] int64)."""
    best = None
    for v0 in range(0, w_u.shape[0], chunk):
        logits = _matmul_fp32(w_out.t(), w_u[v0 : v0 + chunk].t())  # [n, chunk]
        ids = torch.arange(v0, v0 + logits.shape[1], device=logits.device).expand_as(logits)
        keys = pack_keys(-logits if negate else logits, ids)
        keys = keys if best is None else torch.cat([best, keys], dim=1)
        best = keys.topk(min(k, keys.shape[1]), dim=1).values
    values, ids = decode_keys(best)
    return (-values if negate else values), ids


class FilterTuning(NamedTuple):
    """How `launch_vocab_filter` runs (what it computes does not depend on any of it).

    probe_stride: every probe_stride-th token goes into the threshold probe
    capacity:     candidate slots per row, None for `default_capacity`
    gemm:         "triton" (the kernel computes the logits) or "torch" (cuBLAS, `chunk` tokens at a time)
    block_*, group_f, num_warps, num_stages: the filter kernel's tiles and launch configuration
    """

    probe_stride: int = 8
    capacity: int | None = None
    gemm: str = "triton"
    chunk: int = 8192
    block_f: int = 128
    block_v: int = 128
    block_d: int = 64
    group_f: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_capacity(k: int, v: int, n_probe: int) -> int:
    """Candidate slots per row: about k * V / n_probe candidates are expected, room for twice that."""
    return 2 * k * -(-v // n_probe) + 256


def launch_vocab_filter(
    w_out: torch.Tensor,
    w_u: torch.Tensor,
    k: int,
    *,
    largest: bool,
    both: bool,
    out: tuple[torch.Tensor, ...] | None,
    tuning: FilterTuning,
) -> tuple[torch.Tensor, ...]:
    """Probe thresholds, the filtering pass, then a top-k of each row's candidates. Rows whose
    candidates overflowed the capacity (or, defensively, came out under k) are recomputed exactly in
    torch with the same ranking (`exact_rows`), so the result never depends on the capacity.
    gemm="triton": one kernel computes the logits and filters them; gemm="torch": cuBLAS computes
    `chunk`-token slices of the logits (extra memory F x chunk x 4 bytes) and the kernel only
    filters. Shapes are validated by `vocab_topk_triton`; (values, ids) pairs as `topk_buffers`."""
    probe_stride, capacity, gemm, chunk, block_f, block_v, block_d, group_f, num_warps, num_stages = tuning
    for name, b in (("block_f", block_f), ("block_v", block_v), ("block_d", block_d)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {b}")
    if probe_stride < 1:
        raise ValueError(f"probe_stride must be >= 1, got {probe_stride}")
    if gemm not in ("triton", "torch"):
        raise ValueError(f"unknown gemm {gemm!r}; expected 'triton' or 'torch'")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    d, f = w_out.shape
    v = w_u.shape[0]
    k = min(k, v)
    top, bottom = (True, True) if both else (largest, not largest)
    bufs = topk_buffers(out, 4 if both else 2, f, k, w_out.device)
    if f == 0:
        return tuple(bufs)
    top_thr, bot_thr, n_probe = probe_thresholds(w_out, w_u, k, probe_stride, top, bottom)
    if capacity is None:
        capacity = default_capacity(k, v, n_probe)
    capacity = max(k, min(int(capacity), v))
    dev = w_out.device
    sides = [(top, top_thr, False), (bottom, bot_thr, True)]
    cnts = [torch.zeros(f, dtype=torch.int32, device=dev) if on else None for on, _, _ in sides]
    vals = [torch.full((f, capacity), float("-inf"), device=dev) if on else None for on, _, _ in sides]
    ids = [torch.zeros((f, capacity), dtype=torch.int32, device=dev) if on else None for on, _, _ in sides]
    pick = lambda ts, i: ts[i] if ts[i] is not None else ts[1 - i]  # noqa: E731  (an unused side's stand-in)
    fp32 = w_out.dtype == torch.float32

    def launch(src, v0, v1, strides, from_logits):
        grid = (triton.cdiv(f, block_f) * triton.cdiv(v1 - v0, block_v),)
        vocab_filter_kernel[grid](
            src, w_u, pick([top_thr, bot_thr], 0), pick([top_thr, bot_thr], 1), pick(cnts, 0), pick(cnts, 1),
            pick(vals, 0), pick(ids, 0), pick(vals, 1), pick(ids, 1), d, f, v0, v1, capacity, *strides,
            TOP=top, BOTTOM=bottom, BLOCK_F=block_f, BLOCK_V=block_v, BLOCK_D=block_d, GROUP_F=group_f,
            EVEN_D=d % block_d == 0, UPCAST=interpreter_on() and not fp32,
            PRECISION="ieee" if fp32 or interpreter_on() else "tf32", FROM_LOGITS=from_logits,
            HINT_F=f % 16 == 0, HINT_V=(v1 - v0) % 16 == 0,
            num_warps=num_warps, num_stages=num_stages,
        )

    if gemm == "triton":
        launch(w_out, 0, v, (w_out.stride(0), w_out.stride(1), w_u.stride(0), w_u.stride(1)), False)
    else:
        for v0 in range(0, v, chunk):
            logits = _matmul_fp32(w_out.t(), w_u[v0 : min(v, v0 + chunk)].t())  # [F, chunk]
            launch(logits, v0, min(v, v0 + chunk), (logits.stride(1), logits.stride(0), 0, 0), True)
    pairs = iter(bufs)
    for (on, _, negate), cnt, val, idx in zip(sides, cnts, vals, ids):
        if not on:
            continue
        values_out, ids_out = next(pairs), next(pairs)
        best, best_ids = decode_keys(pack_keys(val, idx).topk(k, dim=1).values)  # [F, k] best first
        values_out.copy_(-best if negate else best)
        ids_out.copy_(best_ids)
        redo = ((cnt > capacity) | (cnt < k)).nonzero().flatten()
        for r0 in range(0, redo.numel(), 1024):  # exact, for the few rows the buffer could not hold
            rows = redo[r0 : r0 + 1024]
            rv, ri = exact_rows(w_out.index_select(1, rows), w_u, k, negate)
            values_out.index_copy_(0, rows, rv)
            ids_out.index_copy_(0, rows, ri)
    return tuple(bufs)
