"""Scores of every neuron of a model with mixture-of-experts layers, expert neurons included.

Dense layer l, neuron i: `a_i * <W_out^l[:, i], W_U[t]>`, as for dense models. MoE layer l, neuron i of
routed expert e: `g_e * h_{e,i} * <W_out^{l,e}[:, i], W_U[t]>` with g_e the router weight of e at that
position (0, and no score, when e was not chosen); shared experts: weight 1. Neurons are named
`[layer, expert, index, score]`: routed experts 0..E-1, the shared expert E, a dense layer's neurons -1.

The capture keeps, at the scored positions only, what each layer needs: a dense layer's h (the input of
its output projection), an MoE layer's input rows and routing (read off the experts module's call,
whatever kernel runs the experts), a shared expert's h. Scoring recomputes the chosen experts' h from
those rows with the experts' own weights and activation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..model.adapters import Adapter, HookSite
from .capture import Selector

DENSE = -1  # the expert number of a dense layer's neurons


class MoECaptureStore:
    """Per layer, the rows of each forward call at the selected positions."""

    def __init__(self, n_layers: int):
        self.dense: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, F]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, d] MoE block rows
        self.routes: list[list[tuple]] = [[] for _ in range(n_layers)]  # ([B, S, k] expert ids, [B, S, k] weights)
        self.shared: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, F_s]

    @staticmethod
    def cat(parts: list) -> torch.Tensor:
        return torch.cat(parts, dim=1)


@contextlib.contextmanager
def moe_capture(adapter: Adapter, select: Selector) -> Iterator[MoECaptureStore]:
    """Hooks on every layer (removed on exit, also on error) filling a MoECaptureStore."""
    store = MoECaptureStore(adapter.n_layers)
    with contextlib.ExitStack() as hooks:
        for layer, block in enumerate(adapter.experts):
            if block is None:
                hooks.enter_context(adapter.hook_site(layer).hooked(
                    lambda h, layer=layer: store.dense[layer].append(select(h).detach())))
                continue
            shape: list = []

            def record(_m, args, kwargs, shape=shape):
                x = args[0] if args else kwargs.get("hidden_states")
                shape[:] = [tuple(x.shape[:2])]

            def routed(_m, args, kwargs, layer=layer, shape=shape):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                x, idx, w = (args[k] if len(args) > k else kwargs[n] for k, n in enumerate(names))
                b, t = shape[0]
                store.inputs[layer].append(select(x.reshape(b, t, -1)).detach())
                store.routes[layer].append((select(idx.reshape(b, t, -1)), select(w.reshape(b, t, -1)).detach()))

            hooks.enter_context(_removing(adapter.mlps[layer].register_forward_pre_hook(record, with_kwargs=True)))
            hooks.enter_context(_removing(block.experts.register_forward_pre_hook(routed, with_kwargs=True)))
            if block.shared is not None:
                site = HookSite(block.shared.down_proj, pre=True, layer=adapter.layer_modules[layer])
                hooks.enter_context(site.hooked(lambda h, layer=layer: store.shared[layer].append(select(h).detach())))
        yield store


@contextlib.contextmanager
def _removing(handle):
    try:
        yield
    finally:
        handle.remove()


def concept_parts(adapter: Adapter, store: MoECaptureStore, b: int, s: int, token: int) -> list[tuple]:
    """[(layer, expert, neuron indices [n], scores [n])] of one concept: sample b, captured step s, token t.
    Scores in fp32 (fp64 for fp64 models)."""
    w_u = adapter.unembed_weight()
    acc = torch.float64 if w_u.dtype == torch.float64 else torch.float32
    u = w_u[token].detach().to(acc)  # [d]
    parts = []
    for layer, block in enumerate(adapter.experts):
        if block is None:
            w = adapter.out_weight(layer).detach()
            h = store.cat(store.dense[layer])[b, s].to(acc)  # [F]
            scores = h * (w.to(acc).t() @ u.to(w.device))
            parts.append((layer, DENSE, torch.arange(h.numel()), scores))
            continue
        x = store.cat(store.inputs[layer])[b, s]  # [d]
        idx = torch.cat([r[0] for r in store.routes[layer]], 1)[b, s].tolist()  # [k]
        gates = torch.cat([r[1] for r in store.routes[layer]], 1)[b, s].to(acc)  # [k]
        with torch.no_grad():
            for j, e in enumerate(idx):
                if not 0 <= e < block.n_experts:
                    continue  # a padding slot (some routers mark unused slots past the last expert)
                h = block.expert_h(x[None], e)[0].to(acc)  # [F]
                proj = block.expert_out(e).detach().to(acc).t() @ u.to(x.device)  # [F]
                parts.append((layer, e, torch.arange(h.numel()), gates[j] * h * proj))
        if block.shared is not None:
            h = store.cat(store.shared[layer])[b, s].to(acc)
            w = block.shared_out().detach()
            parts.append((layer, block.n_experts, torch.arange(h.numel()), h * (w.to(acc).t() @ u.to(w.device))))
    return parts


def top_neurons(parts: list[tuple], k: int) -> list[list]:
    """The k highest-scoring neurons of `parts` as [[layer, expert, index, score], ...], descending."""
    best = []  # each part's own top k first: never a Python list of every neuron
    for layer, expert, index, scores in parts:
        values, order = scores.detach().cpu().topk(min(k, scores.numel()))
        best += [(v, layer, expert, int(index[j])) for v, j in zip(values.tolist(), order.tolist())]
    best.sort(key=lambda r: -r[0])
    return [[layer, expert, i, v] for v, layer, expert, i in best[:k]]
