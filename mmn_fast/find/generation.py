"""Generation settings: the KV cache, sampling, and a batch streamer for `Engine.generate` (the server's path)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from ..errors import MMNError


KV_CACHES = ("auto", "static", "dynamic")


def cache_kwargs(model, kv_cache: str = "auto") -> dict:
    """`generate` keywords for the KV cache. A static cache (allocated once for prompt + new tokens, written
    in place) gives the same tokens as transformers' default dynamic one (tests/test_kv_cache.py), which
    concatenates every layer's keys and values at every step: on CPU the static one decodes the benchmark
    model's captions 1.12x faster, but a model of many thin layers 5% slower (docs/benchmarks.md). "auto"
    takes it on CPU where the model says it can (`_can_compile_fullgraph`, transformers' flag for static
    caches), and keeps the dynamic cache on GPUs until `bench/gpu_check.sh` has measured it there. Never
    compiled on the way (`disable_compile`): a capture's hooks must run eagerly, and compiled kernels could
    round differently from plain generate's."""
    if kv_cache not in KV_CACHES:
        raise MMNError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    supported = bool(getattr(model, "_can_compile_fullgraph", False))
    if kv_cache == "static" and not supported:
        raise MMNError(f"kv_cache='static': {type(model).__name__} does not declare support for a static KV cache; "
                       "use kv_cache='auto' or 'dynamic'")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    static = kv_cache == "static" or (kv_cache == "auto" and on_cpu and supported)
    return {"cache_implementation": "static", "disable_compile": True} if static else {}


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: temperature 0 is greedy; above 0, sampling (seeded by `seed` when given).
    Frozen and hashable: a server batches only requests whose settings are equal."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not 0 <= self.temperature <= 100:
            raise MMNError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MMNError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return dict(do_sample=False, num_beams=1)
        return dict(do_sample=True, num_beams=1, temperature=self.temperature, top_p=self.top_p, top_k=None)


@dataclass
class Generated:
    """What `Engine.generate` returns: each row's new token ids and its prompt's length in tokens."""

    ids: list[list[int]]
    prompt_tokens: list[int]


class RowStreamer(BaseStreamer):
    """Hands each row's new tokens to `on_token(row, token_id)` as `generate` makes them (a batch
    streamer: Hugging Face's text streamers take one row only). The prompt, put first, is skipped."""

    def __init__(self, on_token: Callable[[int, int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        rows = value.reshape(value.shape[0], -1).tolist()  # [B] or [B, k] new tokens
        for row, tokens in enumerate(rows):
            for token in tokens:
                self.on_token(row, int(token))

    def end(self) -> None:
        pass
