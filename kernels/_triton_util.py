"""Helpers shared by the Triton launchers. Importing this module never imports triton or touches CUDA.

The Triton kernel modules (`_act_score_triton`, `_vocab_topk_triton`, `_vocab_filter_triton`) import
triton at their top, so they are only imported by the launchers when a Triton path is actually
called; `mmn_fast.kernels` stays importable on machines without triton.
"""
from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    """True when `import triton` works (imported lazily; after a success it is a lookup in sys.modules)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise a clear error unless triton is importable and the tensors can go to a Triton kernel."""
    if not triton_available():
        raise RuntimeError("the Triton path needs triton (pip install mmn_fast[triton]); use backend='torch'")
    if interpreter_on():
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                f"the Triton path needs CUDA tensors (got a {t.device.type} tensor); "
                "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels on CPU"
            )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def topk_buffers(out, count: int, f: int, k: int, device: torch.device) -> list[torch.Tensor]:
    """`count` // 2 (values [F, k] fp32, ids [F, k] int64) output pairs of a top-k launcher:
    the caller's preallocated `out` after checks, or fresh ones."""
    want = [torch.float32, torch.int64] * (count // 2)
    if out is None:
        return [torch.empty((f, k), dtype=dt, device=device) for dt in want]
    if len(out) != count:
        raise ValueError(f"out must hold {count} tensors")
    for t, dt in zip(out, want):
        if tuple(t.shape) != (f, k) or t.dtype != dt or t.device != device or not t.is_contiguous():
            raise ValueError(f"out buffers must be contiguous [F={f}, k={k}] tensors on {device} ({want})")
    return list(out)
