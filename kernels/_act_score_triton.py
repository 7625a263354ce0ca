"""Triton kernel of `act_score` (imported only by `act_score_triton`, so triton stays optional).

Grid: (row chunks, F blocks). The host splits the rows into chunks of at most `chunk_rows`
consecutive rows that share one group (or are all unscored). A program walks its chunk in
BLOCK_N-row tiles: it computes each h tile once, stores it and the captured rows, and keeps the
column-wise sum (or max and min) of h in registers; at the end it combines them into a [G, F]
buffer with one atomic per column. P depends only on the column, so the [G, K, F] scores are
that row reduction scaled by P (max: max(h) P where P >= 0, min(h) P where P < 0), a small
elementwise epilogue: K times fewer atomics than combining [BLOCK_F, K] partials of h * P.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._act_score_common import ActScoreOut, ActScorePlans, planned
from ._triton_math import round_to
from ._triton_util import interpreter_on


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The activation in fp32 (tanh written through the sigmoid: 0.5 (1 + tanh(y)) = sigmoid(2y))."""
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        y = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == "quick_gelu":
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == "identity":
        y = x
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def act_score_kernel(
    gate_ptr,  # [N, F] contiguous
    up_ptr,  # [N, F] contiguous (unused unless HAS_UP)
    h_ptr,  # [N, F] contiguous, input dtype
    red_ptr,  # fp32 [G, F] sums (pre-filled 0), or [2, G, F] max then min (pre-filled -inf, +inf)
    cap_dst_ptr,  # [N] int64 capture slot of each row, -1 = not captured
    cap_ptr,  # [R, F] contiguous, input dtype
    cap_act_ptr,  # [R, F] contiguous, input dtype
    chunk_start_ptr,  # [C] int64 first row of each chunk
    chunk_end_ptr,  # [C] int64 one past the last row
    chunk_group_ptr,  # [C] int64 group of the chunk's rows, -1 = unscored
    F,
    G,
    ACT: tl.constexpr,
    HAS_UP: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
    HAS_CAPTURE: tl.constexpr,
    CAPTURE_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    RNE_BF16: tl.constexpr,  # round bf16 outputs by hand (interpreter only)
):
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    cmask = cols < F
    total = tl.zeros([BLOCK_F], dtype=tl.float32)
    hi = tl.full([BLOCK_F], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_F], float("inf"), tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]  # [BLOCK_N, BLOCK_F]
        offs = rows[:, None] * F + cols[None, :]

        x = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = _act(x, ACT)
        if HAS_UP:
            h = a * tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            h = a
        h = round_to(h, h_ptr.dtype.element_ty, RNE_BF16)  # rounded once; the scores use this stored value
        if ACT != "identity":  # identity: h is the input itself, read only (exact: the round trip through fp32)
            tl.store(h_ptr + offs, h, mask=mask)

        if HAS_CAPTURE:
            dst = tl.load(cap_dst_ptr + rows, mask=rmask, other=-1)  # [BLOCK_N]
            cap_mask = mask & (dst >= 0)[:, None]
            cap_offs = dst[:, None] * F + cols[None, :]
            tl.store(cap_ptr + cap_offs, h, mask=cap_mask)
            if CAPTURE_ACT:
                tl.store(cap_act_ptr + cap_offs, round_to(a, cap_act_ptr.dtype.element_ty, RNE_BF16), mask=cap_mask)

        if HAS_PROJ:
            hs = h.to(tl.float32)
            if REDUCE_MAX:
                hi = tl.maximum(hi, tl.max(tl.where(mask, hs, float("-inf")), axis=0))
                lo = tl.minimum(lo, tl.min(tl.where(mask, hs, float("inf")), axis=0))
            else:
                total += tl.sum(tl.where(mask, hs, 0.0), axis=0)

    if HAS_PROJ:
        group = tl.load(chunk_group_ptr + pid_c)
        if group >= 0:
            out = red_ptr + group * F + cols
            if REDUCE_MAX:
                tl.atomic_max(out, hi, mask=cmask)
                tl.atomic_min(out + G * F, lo, mask=cmask)
            else:
                tl.atomic_add(out, total, mask=cmask)


def _row_chunks(row_group: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split rows into runs of equal group id, then runs into chunks of at most block_n rows
    (two host syncs: the number of runs and of chunks).

    row_group: [N] int64 (-1 rows form unscored runs)
    returns (start [C], end [C], group [C]) int64
    """
    n = row_group.shape[0]
    new_run = torch.ones(n, dtype=torch.bool, device=row_group.device)
    new_run[1:] = row_group[1:] != row_group[:-1]
    run_start = new_run.nonzero().squeeze(1)  # [Rn]
    run_end = torch.cat([run_start[1:], run_start.new_tensor([n])])  # [Rn]
    pieces = (run_end - run_start + block_n - 1) // block_n  # [Rn]
    n_chunks = int(pieces.sum())
    run = torch.repeat_interleave(torch.arange(run_start.shape[0], device=row_group.device), pieces, output_size=n_chunks)
    first_piece = torch.cumsum(pieces, 0) - pieces  # [Rn]
    piece = torch.arange(n_chunks, device=row_group.device) - first_piece[run]  # [C] index inside its run
    start = run_start[run] + piece * block_n
    end = torch.minimum(start + block_n, run_end[run])
    return start, end, row_group[run_start][run]


def _capture_slots(rows: torch.Tensor, n: int):
    """[N] capture slot of each row (-1: not captured) and, only when rows has duplicates, the
    [R] slot each output row must be copied from (one device sync)."""
    r = rows.shape[0]
    cap_dst = torch.full((n,), -1, dtype=torch.long, device=rows.device)
    cap_dst[rows] = torch.arange(r, device=rows.device)  # a duplicate row keeps one of its slots
    slot = cap_dst[rows]  # [R]
    return cap_dst, (None if torch.equal(slot, torch.arange(r, device=rows.device)) else slot)


def _buffer(given: torch.Tensor | None, shape, dtype, device, name: str) -> torch.Tensor:
    """A preallocated output buffer after checks, or a fresh one."""
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or given.device != device or not given.is_contiguous():
        raise ValueError(f"out.{name} must be a contiguous {dtype} {tuple(shape)} tensor on {device}")
    return given


def launch_act_score(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    *,
    proj: torch.Tensor | None,
    row_group: torch.Tensor | None,
    n_groups: int,
    reduce: str,
    capture_rows: torch.Tensor | None,
    capture_act: bool,
    out: ActScoreOut | None,
    block_n: int,
    block_f: int,
    chunk_rows: int | None,
    plans: ActScorePlans | None,
) -> ActScoreOut:
    """Launcher (arguments already validated by `act_score_triton`). The row plan and capture
    slots come from `plans` when it holds them for these very tensors."""
    if block_n < 1 or block_n & (block_n - 1) or block_f < 16 or block_f & (block_f - 1):
        raise ValueError("block_n must be a power of two and block_f a power of two >= 16")
    n, f = gate.shape
    if chunk_rows is None:  # aim at ~1000 programs: enough to fill the GPU, few atomics per column
        chunk_rows = block_n * max(1, min(16, n * triton.cdiv(f, block_f) // (1024 * block_n)))
    if chunk_rows < block_n or chunk_rows % block_n:
        raise ValueError(f"chunk_rows must be a multiple of block_n={block_n}, got {chunk_rows}")
    g = n_groups
    dev, dtype = gate.device, gate.dtype
    out = out if out is not None else ActScoreOut(None, None, None, None)
    # The kernel indexes [N, F] row-major: make the layout explicit.
    gate = gate.contiguous()
    up = up.contiguous() if up is not None else None
    h = gate if act == "identity" else _buffer(out.h, (n, f), dtype, dev, "h")  # identity: read only

    has_proj = proj is not None
    red = scores = None
    if has_proj:
        scores = _buffer(out.scores, (g, proj.shape[1], f), torch.float32, dev, "scores")
        if reduce == "max":
            red = torch.empty((2, g, f), dtype=torch.float32, device=dev)  # [2, G, F] max, min
            red[0].fill_(float("-inf"))
            red[1].fill_(float("inf"))
        else:
            red = torch.zeros((g, f), dtype=torch.float32, device=dev)  # [G, F] sums
        groups = row_group.long() if row_group is not None else torch.zeros(n, dtype=torch.long, device=dev)
    else:  # every row unscored; built only when the (cached) row plan is
        groups = None
    plan_key = row_group if has_proj and row_group is not None else ("all" if has_proj else "none")

    captured = captured_act = None
    rows = capture_rows.long() if capture_rows is not None else None
    r = rows.shape[0] if rows is not None else 0
    has_capture = r > 0
    if rows is not None:
        captured = _buffer(out.captured, (r, f), dtype, dev, "captured")
        if capture_act:
            captured_act = _buffer(out.captured_act, (r, f), dtype, dev, "captured_act")
    cap_dst, slot = gate, None  # placeholder pointer when nothing is captured
    if has_capture:
        cap_dst, slot = planned(plans, "capture", capture_rows, dev, (n,), lambda: _capture_slots(rows, n))

    if n > 0 and f > 0:
        start, end, chunk_group = planned(plans, "rows", plan_key, dev, (n, chunk_rows), lambda: _row_chunks(
            groups if groups is not None else torch.full((n,), -1, dtype=torch.long, device=dev), chunk_rows))
        grid = (start.shape[0], triton.cdiv(f, block_f))
        act_score_kernel[grid](
            gate, up if up is not None else gate, h, red if has_proj else h,
            cap_dst, captured if has_capture else h, captured_act if has_capture and capture_act else h,
            start, end, chunk_group, f, g,
            ACT=act, HAS_UP=up is not None, HAS_PROJ=has_proj, REDUCE_MAX=reduce == "max",
            HAS_CAPTURE=has_capture, CAPTURE_ACT=bool(capture_act and has_capture),
            BLOCK_N=block_n, BLOCK_F=block_f, RNE_BF16=dtype == torch.bfloat16 and interpreter_on(),
        )
    if slot is not None:  # duplicate capture rows: copy from the slot their row was written to
        captured.copy_(captured[slot])
        if capture_act:
            captured_act.copy_(captured_act[slot])
    if has_proj:
        pt = proj.t().to(torch.float32)[None]  # [1, K, F]
        counts = torch.zeros(g + 1, dtype=torch.float32, device=dev)
        counts = counts.index_add_(0, groups + 1, torch.ones(n, device=dev))[1:]  # [G] rows per group
        if reduce == "max":
            torch.where(pt >= 0, red[0][:, None] * pt, red[1][:, None] * pt, out=scores)
            scores.masked_fill_((counts == 0)[:, None, None], float("-inf"))
        else:
            torch.mul(red[:, None], pt, out=scores)
            if reduce == "mean":
                scores /= counts.clamp_min(1)[:, None, None]
    return ActScoreOut(h, scores, captured, captured_act)
