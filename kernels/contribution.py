"""Direct logit contribution of MLP neurons: `score(l, i, t) = a^l_i * <W_out^l[:, i], W_U[t]>`.

Only the K unembedding rows at hand are projected (one [F, d] x [d, K] matmul per layer); the
F x V product is never formed.
"""
from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: fp32 for fp32/fp16/bf16, fp64 kept (used by the exact tests)."""
    return t if t.dtype == torch.float64 else t.float()


def token_projection(w_out: torch.Tensor, w_u_rows: torch.Tensor, center: bool = False) -> torch.Tensor:
    """`P = W_out^T W_U[targets]^T` in fp32.

    w_out:    [d, F]  the output projection weight (nn.Linear layout: out_features x in_features)
    w_u_rows: [K, d]  unembedding rows of the target tokens (already scaled by a folded norm weight)
    center:   subtract each output vector's mean over d first (exact LayerNorm folding)
    returns   [F, K]
    """
    w = _acc(w_out)
    if center:
        w = w - w.mean(dim=0, keepdim=True)
    return w.t() @ _acc(w_u_rows).to(w.dtype).t()


def contribution_scores(acts: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Elementwise `a * P` for C concepts.

    acts: [C, L, F]  activations at each concept's position
    proj: [C, L, F]  projection column of each concept's token
    returns [C, L, F] fp32 (fp64 for fp64 inputs)
    """
    return _acc(acts) * _acc(proj)


def topk_neurons(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k over all L x F neurons of each concept.

    scores: [C, L, F]
    returns (values [C, k], layer [C, k], index [C, k]) sorted by descending score
    """
    c, n_layers, f = scores.shape
    k = min(k, n_layers * f)
    values, flat = scores.reshape(c, n_layers * f).topk(k, dim=1, sorted=True)
    return values, flat // f, flat % f
