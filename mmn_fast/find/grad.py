"""Gradient baseline (`method="grad"`): activation x d logit(t) / d activation, as in
Schwettmann et al. 2023. Same output schema as the gradient-free score; one backward per concept
(a sum over concepts would mix in later positions' logits), so it is a baseline, not a fast path.
"""
from __future__ import annotations

import torch

from ..kernels import contribution_scores
from .capture import capture
from .moe_scoring import moe_graph


def grad_scores(engine, inputs: dict, outputs: list[list[int]], flat: list, opts) -> torch.Tensor:
    """[C, L, F] fp32 scores for the concepts `flat` = [(sample, Word), ...]."""
    full, index = engine.teacher_forced(inputs, outputs)
    ad = engine.adapter
    rows = []
    with torch.enable_grad(), capture(ad, opts.activation, keep_graph=True) as store:
        logits = engine.model(**full, use_cache=False).logits  # [B, T, V]
        hs = [store.leaves[layer][0] for layer in range(ad.n_layers)]  # L x [B, T, F]
        for b, word in flat:
            pos = int(index[b, word.step])
            logit = logits[b, pos, outputs[b][word.step]]
            grads = torch.autograd.grad(logit, hs, retain_graph=True)
            rows.append(torch.stack([contribution_scores(hs[l][b, pos].detach(), grads[l][b, pos])
                                     for l in range(ad.n_layers)]))  # [L, F]
    return torch.stack(rows)


def moe_grad_parts(engine, inputs: dict, outputs: list[list[int]], flat: list) -> list[list[tuple]]:
    """Models with mixture-of-experts layers: per concept of `flat`, [(layer, expert, indices [n], scores [n])]
    with score = activation x d logit(t) / d activation (an expert neuron's activation g_e h_{e,i}, see
    moe_scoring), the gradient taken through the model's own forward (`moe_graph`)."""
    full, index = engine.teacher_forced(inputs, outputs)
    ad = engine.adapter
    out = []
    with torch.enable_grad(), moe_graph(ad) as graph:
        logits = engine.model(**full, use_cache=False).logits  # [B, T, V]
        nodes = graph.nodes()
        for b, word in flat:
            pos = int(index[b, word.step])
            logit = logits[b, pos, outputs[b][word.step]]
            grads = torch.autograd.grad(logit, nodes, retain_graph=True, allow_unused=True)
            out.append(graph.parts(ad, {id(h): g for h, g in zip(nodes, grads)}, b, pos))
    return out
