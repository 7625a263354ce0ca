"""Wall-clock timing on CPU and CUDA, and the two bandwidth figures kernels are judged by: a plain device
copy (the yardstick) and `act_score` at a given shape. Used by `mmn bench` (mmn_fast/run/bench.py) and
the scripts in bench/. CUDA work is synchronised before each clock read; nothing here runs on import.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .act_score import act_score


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def wall_times(fn: Callable[[], Any], repeats: int, device: torch.device | str,
               after_each: Callable[[], None] | None = None) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of `fn` (device synchronised before and after each), and the
    last call's result. after_each() runs after each call, outside the clock (e.g. a progress bar)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if after_each is not None:
            after_each()
    return times, result


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device | str) -> float:
    """Median seconds of `repeats` calls of `fn` (no warm-up: make one first)."""
    return median(wall_times(fn, repeats, device)[0])


def copy_bandwidth(device: torch.device | str, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second (read + written) of a device-to-device copy of `nbytes`: after one warm-up copy,
    the median of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = median_time(lambda: dst.copy_(src), repeats, device)
    return 2 * nbytes / t


def act_score_bandwidth(n_rows: int, d_mlp: int, dtype: torch.dtype, device: torch.device | str, backend: str,
                        repeats: int = 10, act: str = "silu", captured: int = 1) -> tuple[float, float]:
    """(median seconds, bytes per second) of `act_score` reading an [n_rows, d_mlp] h with `captured` rows
    copied out: one layer's prefill step as find's fused capture runs it (the model computes h = act(gate)
    * up with its own ops; the kernel only reads it, act="identity"). Bytes counted: h read (n_rows x d_mlp
    elements). `act` names the activation the model applied (h's values, not the kernel's work). One
    warm-up call first (Triton compiles then)."""
    gen = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(n_rows, d_mlp, device=device, dtype=dtype, generator=gen)
    up = torch.randn(n_rows, d_mlp, device=device, dtype=dtype, generator=gen)
    h = act_score(gate, up, act, backend="torch").h  # [n_rows, d_mlp] as the model computes it
    rows = torch.arange(max(0, n_rows - captured), n_rows, device=device)

    def step():
        return act_score(h, None, "identity", capture_rows=rows, backend=backend)

    step()
    t = median_time(step, repeats, device)
    return t, n_rows * d_mlp * h.element_size() / t
