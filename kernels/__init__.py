"""Scoring ops of mmn_fast, importable as `mmn_fast.kernels`.

Each op has a pure-torch implementation (the CPU path and the test reference) and, where it pays,
a Triton kernel behind `backend="triton"`. Importing this package never imports triton or touches
CUDA: the kernel modules (`_*_triton.py`) are imported by their launchers when first called.
"""
from ._triton_util import triton_available
from .act_score import ActScoreOut, act_score, act_score_torch, act_score_triton
from .contribution import contribution_scores, token_projection, topk_neurons
from .vocab_topk import VocabTopK, vocab_topk, vocab_topk_torch, vocab_topk_triton

__all__ = [
    "ActScoreOut",
    "VocabTopK",
    "act_score",
    "act_score_torch",
    "act_score_triton",
    "contribution_scores",
    "token_projection",
    "topk_neurons",
    "triton_available",
    "vocab_topk",
    "vocab_topk_torch",
    "vocab_topk_triton",
]
