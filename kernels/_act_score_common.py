"""What `act_score` and its Triton launcher both use: the result type and the caller-owned plan cache.

Kept apart from `act_score.py` so that the Triton module (imported lazily by `act_score_triton`)
and the dispatcher import it without importing each other. Never imports triton.
"""
from __future__ import annotations

import threading
from typing import Callable, NamedTuple, TypeVar

import torch

T = TypeVar("T")


class ActScoreOut(NamedTuple):
    h: torch.Tensor  # [N, F] input dtype
    scores: torch.Tensor | None  # [G, K, F] fp32 (fp64 for fp64 inputs)
    captured: torch.Tensor | None  # [R, F] input dtype
    captured_act: torch.Tensor | None  # [R, F] input dtype, act(gate) without the up factor


class ActScorePlans:
    """Index range checks and Triton row plans of `act_score`, kept by the caller across calls.

    The per-layer calls of one batch pass the same row_group / capture_rows tensors: with one
    instance passed as `plans=` to all of them, the checks (a device sync each) and the plans are
    computed once per batch instead of once per layer. Without one nothing is cached.

    One entry per (name, device), keyed by the key object's identity plus its `_version` for
    tensors: an in-place change rebuilds it, and a tensor held here cannot be freed, so its
    identity cannot be reused by another. Per device, because a model spread over GPUs alternates
    devices layer by layer and one shared entry would rebuild at every boundary. Inference-mode
    tensors have no version counter and are never cached. The entries keep their tensors alive
    until replaced or `clear()`ed. Safe to share between threads (lookups are locked; two threads
    missing at once both compute, and the later result is kept).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, torch.device], tuple] = {}  # -> (key, version, extra, value)
        self._lock = threading.Lock()

    def get(self, name: str, key: object, device: torch.device, extra: tuple, make: Callable[[], T]) -> T:
        """The cached value for (name, device) when `key` (same object, unmodified) and `extra`
        match the stored entry; otherwise `make()`, stored in its place."""
        version = None
        if isinstance(key, torch.Tensor):
            if key.is_inference():
                return make()
            version = key._version
        with self._lock:
            last = self._entries.get((name, device))
        if last is not None and last[0] is key and last[1] == version and last[2] == extra:
            return last[3]
        value = make()
        with self._lock:
            self._entries[(name, device)] = (key, version, extra, value)
        return value

    def clear(self) -> None:
        """Drop every entry (and the tensors it holds)."""
        with self._lock:
            self._entries.clear()


def planned(plans: ActScorePlans | None, name: str, key: object, device: torch.device, extra: tuple,
            make: Callable[[], T]) -> T:
    """`plans.get(...)`, or `make()` when the caller keeps no plans."""
    return make() if plans is None else plans.get(name, key, device, extra, make)
