"""Scoring ops of mmn_fast, importable as `mmn_fast.kernels`.

Each op has a pure-torch implementation (the CPU path and the test reference); Triton kernels
join them in later work. Importing this package never touches CUDA or triton.
"""
from .contribution import contribution_scores, token_projection, topk_neurons
from .vocab_topk import vocab_topk_torch

__all__ = ["contribution_scores", "token_projection", "topk_neurons", "vocab_topk_torch"]
