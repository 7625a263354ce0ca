"""Fused MLP activation + capture + contribution scoring, in one pass over the activations.

`h = act(gate) * up` (or `act(gate)` for a plain MLP) is what the MLP's output projection consumes;
the direct logit contribution of neuron i to target k is `h[p, i] * P[i, k]` with
`P = W_out^T W_U[targets]^T`. The scores are reduced (sum / mean / max) over the rows of each
group (e.g. the image-token rows of one sample), and chosen rows of h are copied out, all while
h is read once.

`act_score_torch` is the readable reference and the CPU path; `act_score_triton` runs one Triton
kernel (see `_act_score_triton.py`, imported only when called); `act_score` dispatches.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F_

from ._act_score_common import ActScoreOut, ActScorePlans, planned
from ._triton_util import require_triton

# "identity": gate already is h (the model computed it with its own ops): the call only reads it, to
# capture rows and score, and returns it as out.h without a copy.
ACTS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu", "identity")
# Hugging Face `hidden_act` names that mean one of ours.
ACT_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
REDUCES = ("sum", "mean", "max")
MAX_K = 64
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _act_fn(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The named activation in the input dtype, written as Hugging Face's ACT2FN computes it."""
    if act == "silu":
        return F_.silu
    if act == "gelu":
        return F_.gelu
    if act == "gelu_tanh":
        return lambda x: F_.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if act == "identity":
        return lambda x: x
    return F_.relu


def _in_range(name: str, t: torch.Tensor, lo: int, hi: int, plans: ActScorePlans | None) -> bool:
    """All of t in [lo, hi), with one device sync; kept in `plans` for this very tensor (same
    object, unmodified), so the layers of a batch check it once."""
    if t.numel() == 0:
        return True

    def check() -> bool:
        mn, mx = torch.stack(torch.aminmax(t)).tolist()
        return lo <= mn and mx < hi

    return planned(plans, f"{name} in range", t, t.device, (lo, hi), check)


def _check(
    gate, up, act, proj, row_group, n_groups, reduce, capture_rows, *, triton: bool, plans: ActScorePlans | None
) -> tuple[str, torch.Tensor | None, int]:
    """Validate the arguments; returns (canonical act name, row_group or None, n_groups)."""
    if not isinstance(gate, torch.Tensor) or gate.dim() != 2:
        raise ValueError(f"gate must be a 2-D [N, F] tensor, got {getattr(gate, 'shape', type(gate))}")
    allowed = _FLOATS[:3] if triton else _FLOATS
    if gate.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        path = "Triton" if triton else "torch"
        raise ValueError(f"gate dtype {gate.dtype} is not supported on the {path} path ({names})")
    n, f = gate.shape
    if up is not None:
        if up.shape != gate.shape:
            raise ValueError(f"up must match gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
        if up.dtype != gate.dtype or up.device != gate.device:
            raise ValueError(f"up must have gate's dtype and device ({gate.dtype}, {gate.device})")
    act = ACT_ALIASES.get(act, act)
    if act not in ACTS:
        raise ValueError(f"unknown act {act!r}; expected one of {ACTS}")
    if act == "identity" and up is not None:
        raise ValueError("act='identity' reads h as given: pass it as gate, with up=None")
    if reduce not in REDUCES:
        raise ValueError(f"unknown reduce {reduce!r}; expected one of {REDUCES}")
    if proj is not None:
        if proj.dim() != 2 or proj.shape[0] != f:
            raise ValueError(f"proj must be [F={f}, K], got {tuple(proj.shape)}")
        if not 1 <= proj.shape[1] <= MAX_K:
            raise ValueError(f"proj has K={proj.shape[1]} columns; K must be in 1..{MAX_K}")
        if not proj.is_floating_point() or proj.device != gate.device:
            raise ValueError(f"proj must be a floating tensor on {gate.device}")
        if n_groups < 0:
            raise ValueError(f"n_groups must be >= 0, got {n_groups}")
        if row_group is None:  # every row scored, in one group
            if n_groups not in (0, 1):
                raise ValueError("row_group=None scores all rows as group 0; n_groups must be 0 or 1")
            n_groups = 1
        else:
            if row_group.shape != (n,) or row_group.dtype.is_floating_point or row_group.dtype == torch.bool:
                raise ValueError(f"row_group must be an integer [N={n}] tensor, got {row_group.dtype} {tuple(row_group.shape)}")
            if row_group.device != gate.device:
                raise ValueError(f"row_group must be on {gate.device}")
            if not _in_range("row_group", row_group, -1, n_groups, plans):
                raise ValueError(f"row_group values must be in [-1, n_groups={n_groups})")
    if capture_rows is not None:
        if capture_rows.dim() != 1 or capture_rows.dtype.is_floating_point or capture_rows.dtype == torch.bool:
            raise ValueError(f"capture_rows must be a 1-D integer tensor, got {capture_rows.dtype} {tuple(capture_rows.shape)}")
        if capture_rows.device != gate.device:
            raise ValueError(f"capture_rows must be on {gate.device}")
        if not _in_range("capture_rows", capture_rows, 0, n, plans):
            raise ValueError(f"capture_rows must be in [0, N={n})")
    return act, row_group, n_groups


def _group_scores(
    h: torch.Tensor, proj: torch.Tensor, row_group: torch.Tensor | None, n_groups: int, reduce: str
) -> torch.Tensor:
    """`s[g, k, i] = reduce_{p in g} h[p, i] * P[i, k]` without an [N, K, F] intermediate.

    P depends only on the column, so the row reduction comes first: sum / mean of h*P is
    (sum of h) * P (divided by the count), and max of h*P is max(h) * P where P >= 0 and
    min(h) * P where P < 0 (exact: rounding a product is monotone in h).
    h: [N, F] accumulation dtype, proj: [F, K]; returns [G, K, F]
    """
    n, f = h.shape
    p = proj.t().to(h.dtype)[None]  # [1, K, F]
    if row_group is None:
        idx = torch.zeros(n, dtype=torch.long, device=h.device)
    else:
        keep = row_group >= 0
        idx, h = row_group[keep].long(), h[keep]
    counts = torch.bincount(idx, minlength=n_groups)  # [G]
    if reduce == "max":
        at = idx[:, None].expand_as(h)  # [M, F]
        hi = h.new_full((n_groups, f), float("-inf")).scatter_reduce_(0, at, h, "amax")  # [G, F]
        lo = h.new_full((n_groups, f), float("inf")).scatter_reduce_(0, at, h, "amin")
        scores = torch.where(p >= 0, hi[:, None] * p, lo[:, None] * p)  # [G, K, F]
        return scores.masked_fill_((counts == 0)[:, None, None], float("-inf"))
    total = h.new_zeros(n_groups, f).index_add_(0, idx, h)  # [G, F]
    scores = total[:, None] * p  # [G, K, F]
    if reduce == "mean":
        scores /= counts.clamp_min(1).to(h.dtype)[:, None, None]
    return scores


def act_score_torch(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    *,
    proj: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None,
    n_groups: int = 0,
    reduce: str = "sum",
    capture_rows: torch.Tensor | None = None,
    capture_act: bool = False,
    act_module: Callable[[torch.Tensor], torch.Tensor] | None = None,
    plans: ActScorePlans | None = None,
) -> ActScoreOut:
    """Reference / CPU path. h is computed in the input dtype exactly like the model's MLP
    (`act_module(gate) * up` when act_module is given, so captures are bit-identical to a forward
    hook); scores accumulate in fp32 (fp64 for fp64 inputs). See `act_score` for the arguments."""
    act, row_group, n_groups = _check(
        gate, up, act, proj, row_group, n_groups, reduce, capture_rows, triton=False, plans=plans
    )
    a = gate if act == "identity" else (act_module or _act_fn(act))(gate)  # [N, F]
    h = a * up if up is not None else a  # [N, F]
    captured = captured_act = None
    if capture_rows is not None:
        captured = h[capture_rows]  # [R, F]
        if capture_act:
            captured_act = a[capture_rows]  # [R, F]
    scores = None
    if proj is not None:
        acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
        scores = _group_scores(h.to(acc), proj, row_group, n_groups, reduce)
    return ActScoreOut(h, scores, captured, captured_act)


def act_score_triton(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    *,
    proj: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None,
    n_groups: int = 0,
    reduce: str = "sum",
    capture_rows: torch.Tensor | None = None,
    capture_act: bool = False,
    out: ActScoreOut | None = None,
    block_n: int = 1,
    block_f: int = 1024,
    chunk_rows: int | None = None,
    plans: ActScorePlans | None = None,
) -> ActScoreOut:
    """Triton path: one kernel reads gate/up once and writes h, the captured rows and the per-group
    row reductions of h (then a small epilogue scales them by P). h is computed in fp32 and rounded
    once to the input dtype; the scores use that rounded h. `out` may hold preallocated contiguous
    buffers (fields left None are allocated). Each program covers up to chunk_rows rows of one
    group in BLOCK_N-row tiles, BLOCK_F columns wide: short wide tiles keep the row reduction
    inside each thread (measured: see below); chunk_rows=None picks it from N and F. The row plan,
    capture slots and index checks are kept in `plans` when given (see `act_score`).
    fp32/fp16/bf16 only."""
    # Default tiles: on an H100, bf16 2048 x 11008, 1 x 1024 tiles ran at 2.1 TB/s, 16 x 128 at 0.46 TB/s.
    act, row_group, n_groups = _check(
        gate, up, act, proj, row_group, n_groups, reduce, capture_rows, triton=True, plans=plans
    )
    require_triton(gate)
    from ._act_score_triton import launch_act_score

    return launch_act_score(
        gate, up, act, proj=proj, row_group=row_group, n_groups=n_groups, reduce=reduce, capture_rows=capture_rows,
        capture_act=capture_act, out=out, block_n=block_n, block_f=block_f, chunk_rows=chunk_rows, plans=plans,
    )


def act_score(
    gate: torch.Tensor,
    up: torch.Tensor | None,
    act: str,
    *,
    proj: torch.Tensor | None = None,
    row_group: torch.Tensor | None = None,
    n_groups: int = 0,
    reduce: str = "sum",
    capture_rows: torch.Tensor | None = None,
    capture_act: bool = False,
    backend: str = "torch",
    act_module: Callable[[torch.Tensor], torch.Tensor] | None = None,
    plans: ActScorePlans | None = None,
) -> ActScoreOut:
    """MLP activation, captures and per-group contribution scores in one call.

    gate:         [N, F] gate_proj output (fc1 output for a plain MLP), fp32/fp16/bf16 (fp64: torch only)
    up:           [N, F] up_proj output, or None for a plain MLP (h = act(gate))
    act:          "silu" | "gelu" (erf) | "gelu_tanh" | "quick_gelu" | "relu" (HF aliases accepted), or
                  "identity": gate is h as the model computed it; read only (captures, scores), out.h is gate
    proj:         [F, K] target columns P = W_out^T W_U[targets]^T, 1 <= K <= 64, or None (no scoring)
    row_group:    [N] int group id of each row in [0, n_groups), -1 = not scored; None = all rows in group 0
    reduce:       "sum" | "mean" | "max" over the rows of a group (empty groups: 0, 0, -inf)
    capture_rows: [R] row indices whose h rows are copied out (duplicates allowed)
    capture_act:  also copy act(gate) alone at those rows
    act_module:   torch path only: the model's own activation module, so h is bit-identical to it
    plans:        an `ActScorePlans` the caller keeps across calls that share row_group /
                  capture_rows tensors (the layers of one batch), so their index checks and row
                  plans are computed once; None computes them at every call
    returns ActScoreOut(h [N, F], scores [G, K, F] or None, captured [R, F] or None, captured_act or None)
    """
    if backend == "torch":
        return act_score_torch(
            gate, up, act, proj=proj, row_group=row_group, n_groups=n_groups, reduce=reduce,
            capture_rows=capture_rows, capture_act=capture_act, act_module=act_module, plans=plans,
        )
    if backend == "triton":
        return act_score_triton(
            gate, up, act, proj=proj, row_group=row_group, n_groups=n_groups, reduce=reduce,
            capture_rows=capture_rows, capture_act=capture_act, plans=plans,
        )
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
