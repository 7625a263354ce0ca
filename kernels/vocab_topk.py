"""Each neuron's top tokens: top-k of each row of `W_out^T W_U^T` [F, V] without forming it.

The vocabulary is walked in chunks with a running top-k, so the extra memory is O(F x chunk).
"""
from __future__ import annotations

import torch


def vocab_topk_torch(
    w_out: torch.Tensor, w_u: torch.Tensor, k: int, chunk: int = 4096, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (or bottom-k with largest=False) tokens per neuron.

    w_out: [d, F]   output projection weight
    w_u:   [V, d]   unembedding
    returns (values [F, k] fp32, token ids [F, k] int64), sorted best first
    """
    if w_out.shape[0] != w_u.shape[1]:
        raise ValueError(f"w_out is [{w_out.shape[0]}, F] but w_u is [V, {w_u.shape[1]}]: d must match")
    n_vocab = w_u.shape[0]
    k = min(k, n_vocab)
    w_t = w_out.t().float()  # [F, d]
    best_v = best_i = None
    for start in range(0, n_vocab, chunk):
        logits = w_t @ w_u[start : start + chunk].float().t()  # [F, chunk]
        v, i = logits.topk(min(k, logits.shape[1]), dim=1, largest=largest)
        i = i + start
        if best_v is None:
            best_v, best_i = v, i
        else:
            both_v = torch.cat([best_v, v], dim=1)
            both_i = torch.cat([best_i, i], dim=1)
            best_v, pick = both_v.topk(k, dim=1, largest=largest)
            best_i = both_i.gather(1, pick)
    return best_v, best_i
