"""Scores of every neuron of a model with mixture-of-experts layers, expert neurons included.

Dense layer l, neuron i: `a_i * <W_out^l[:, i], W_U[t]>`, as for dense models. MoE layer l, neuron i of
routed expert e: `g_e * h_{e,i} * <W_out^{l,e}[:, i], W_U[t]>` with g_e the router weight of e at that
position (0, and no score, when e was not chosen); shared experts: weight 1. Neurons are named
`[layer, expert, index, score]`: routed experts 0..E-1, the shared expert E, a dense layer's neurons -1.

The capture keeps, at the scored positions only, what each layer needs: a dense layer's h (the input of
its output projection), an MoE layer's input rows and routing (read off the experts module's call,
whatever kernel runs the experts), a shared expert's h. Scoring recomputes the chosen experts' h from
those rows with the experts' own weights and activation.

The *activation* of a neuron at a position: a dense or shared-expert neuron's h_i; a routed expert
neuron's `g_e * h_{e,i}` (0 where e was not routed), so that score = activation x projection throughout.
positions='image' reduces it over the image positions as it passes (sum, max, min per expert neuron);
method='grad' (`moe_graph`) differentiates the logit through the real forward, in which each expert's h is
recomputed by a hook as a node of the graph; heatmaps (`moe_recording`) record it at every position.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from ..errors import MMNError
from ..kernels import token_projection
from ..model.adapters import Adapter, HookSite
from ..model.moe import DENSE, EXPERTS_CALL, ExpertBlock, call_args
from .capture import Selector, image_reduce
from .scoring import Scorer


class MoECaptureStore:
    """Per layer, the rows of each forward call at the selected positions."""

    def __init__(self, n_layers: int):
        self.dense: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, F]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, d] MoE block rows
        self.route_ids: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, k] chosen experts
        self.route_weights: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, k] their weights
        self.shared: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # [B, S, F_s]
        # positions='image': per layer the prefill call's stats over the image positions (image_reduce's for
        # a dense layer's h, expert_image_stats' for an MoE layer's experts) and its shared expert's
        self.image: list[dict | None] = [None] * n_layers
        self.shared_image: list[dict | None] = [None] * n_layers
        self.norm: list[torch.Tensor] = []  # [B, S, d] the final norm's inputs (fold_final_norm)
        self._merged: dict[int, tuple] = {}  # id(list) -> (its length, its calls concatenated)

    def merged(self, parts: list) -> torch.Tensor:
        """One list's calls concatenated along the steps ([B, S, ...]): made once, as every concept of a batch
        reads them."""
        hit = self._merged.get(id(parts))
        if hit is None or hit[0] != len(parts):
            hit = self._merged[id(parts)] = (len(parts), torch.cat(parts, dim=1))
        return hit[1]


@contextlib.contextmanager
def moe_capture(adapter: Adapter, select: Selector, image_mask: torch.Tensor | None = None,
                fold_norm: bool = False) -> Iterator[MoECaptureStore]:
    """Hooks on every layer (removed on exit, also on error) filling a MoECaptureStore.
    image_mask: [B, T] bool of image positions in the first (prefill) call: activations reduced there.
    fold_norm: also keep the final norm's inputs at the selected positions."""
    store = MoECaptureStore(adapter.n_layers)

    def at_image(stats: list, layer: int, h: torch.Tensor) -> None:  # h [B, T, F]
        if image_mask is not None and stats[layer] is None and h.shape[1] == image_mask.shape[1]:
            stats[layer] = image_reduce(h.detach(), image_mask.to(h.device))

    def dense(layer: int, h: torch.Tensor) -> None:
        store.dense[layer].append(select(h).detach())
        at_image(store.image, layer, h)

    def shared(layer: int, h: torch.Tensor) -> None:
        store.shared[layer].append(select(h).detach())
        at_image(store.shared_image, layer, h)

    with contextlib.ExitStack() as hooks:
        if fold_norm:
            hooks.enter_context(adapter.final_norm_site().hooked(lambda x: store.norm.append(select(x).detach())))
        for layer, block in enumerate(adapter.experts):
            if block is None:
                hooks.enter_context(adapter.hook_site(layer).hooked(functools.partial(dense, layer)))
                continue
            shape: list = []

            def record(_m, args, kwargs, shape=shape):
                shape[:] = [tuple(call_args(args, kwargs)[0].shape[:2])]

            def routed(x, idx, w, layer=layer, shape=shape):  # x [N, d], idx / w [N, k]
                b, t = shape[0]
                store.inputs[layer].append(select(x.reshape(b, t, -1)).detach())
                store.route_ids[layer].append(select(idx.reshape(b, t, -1)))
                store.route_weights[layer].append(select(w.reshape(b, t, -1)).detach())
                if image_mask is not None and store.image[layer] is None and t == image_mask.shape[1]:
                    store.image[layer] = expert_image_stats(adapter.experts[layer], x.reshape(b, t, -1),
                                                            idx.reshape(b, t, -1), w.reshape(b, t, -1),
                                                            image_mask.to(x.device))

            hooks.enter_context(_removing(adapter.mlps[layer].register_forward_pre_hook(record, with_kwargs=True)))
            for handle in block.routing_hooks(routed):
                hooks.enter_context(_removing(handle))
            if block.shared is not None:
                site = HookSite(block.shared.down_proj, pre=True, layer=adapter.layer_modules[layer])
                hooks.enter_context(site.hooked(functools.partial(shared, layer)))
        yield store


@contextlib.contextmanager
def _removing(handle):
    try:
        yield
    finally:
        handle.remove()


def _projector(adapter: Adapter, token: int, scorer: Scorer | None = None):
    """(project, acc): project([d, F] output vectors) -> [F] their projections on W_U[token] in acc (fp32, fp64
    for fp64 models); through a scorer's folded final norm (its scale, centred for a LayerNorm) when it folds."""
    w_u = adapter.unembed_weight()
    acc = torch.float64 if w_u.dtype == torch.float64 else torch.float32
    if scorer is not None and scorer.fold_norm:
        rows, center = scorer.unembed_rows([token])  # [1, d]
        u = rows[0].detach().to(acc)
    else:
        u, center = w_u[token].detach().to(acc), False  # [d]

    def project(w: torch.Tensor) -> torch.Tensor:
        return token_projection(w.detach(), u[None].to(w.device), center)[:, 0].to(acc)

    return project, acc


def concept_parts(adapter: Adapter, store: MoECaptureStore, b: int, s: int, token: int,
                  scorer: Scorer | None = None) -> list[tuple]:
    """[(layer, expert, neuron indices [n], scores [n])] of one concept: sample b, captured step s, token t.
    Scores in fp32 (fp64 for fp64 models). A scorer with fold_norm folds the final norm in, as it does for
    dense models: each output vector projected on the norm-scaled W_U[t] (centred for a LayerNorm), the
    score divided by the norm's denominator at that position."""
    project, acc = _projector(adapter, token, scorer)
    fold = scorer is not None and scorer.fold_norm
    denom = scorer.norm_denominator(store.merged(store.norm)[b, s][None])[0].to(acc) if fold else None
    parts = []
    for layer, block in enumerate(adapter.experts):
        if block is None:
            h = store.merged(store.dense[layer])[b, s].to(acc)  # [F]
            parts.append((layer, DENSE, torch.arange(h.numel()), h * project(adapter.out_weight(layer)).to(h.device)))
            continue
        x = store.merged(store.inputs[layer])[b, s]  # [d]
        idx = store.merged(store.route_ids[layer])[b, s].tolist()  # [k]
        gates = store.merged(store.route_weights[layer])[b, s]  # [k]
        with torch.no_grad():
            for j, e in enumerate(idx):
                if not 0 <= e < block.n_experts:
                    continue  # a padding slot (some routers mark unused slots past the last expert)
                a = block.activation(x[None], e, gates[j : j + 1], acc)[0]  # [F]
                parts.append((layer, e, torch.arange(a.numel()), a * project(block.expert_out(e)).to(a.device)))
        if block.shared is not None:
            h = store.merged(store.shared[layer])[b, s].to(acc)
            parts.append((layer, block.n_experts, torch.arange(h.numel()), h * project(block.shared_out()).to(h.device)))
    if fold:
        parts = [(l, e, i, sc / denom.to(sc.device)) for l, e, i, sc in parts]
    return parts


def top_neurons(parts: list[tuple], k: int) -> list[list]:
    """The k highest-scoring neurons of `parts` as [[layer, expert, index, score], ...], descending."""
    best = []  # each part's own top k first: never a Python list of every neuron
    for layer, expert, index, scores in parts:
        values, order = scores.detach().cpu().topk(min(k, scores.numel()))
        best += [(v, layer, expert, int(index[j])) for v, j in zip(values.tolist(), order.tolist())]
    best.sort(key=lambda r: -r[0])
    return [[layer, expert, i, v] for v, layer, expert, i in best[:k]]


# ----------------------------------------------------------------------------------- positions='image'
def expert_image_stats(block: ExpertBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [B, T, d] block rows, idx / w [B, T, k] routing, mask [B, T] image positions -> over the image
    positions of each sample, the activation a = g_e * h_{e,i} (0 where e is not routed) reduced:
    {'sum','max','min': [B, E, F], 'routed': [B, E] how many image positions chose e, 'count': [B]}, fp32
    (fp64 kept). Only routed rows are computed (a row per chosen expert, as the model's own forward)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_b, n_e, n_f = x.shape[0], block.n_experts, block.d_expert
    sample = torch.arange(n_b, device=x.device)[:, None].expand(mask.shape)[mask]  # [M]
    xs, ids, ws = x[mask], idx[mask], w[mask]  # [M, d], [M, k], [M, k]
    out = {"sum": x.new_zeros(n_b, n_e, n_f, dtype=acc), "max": x.new_full((n_b, n_e, n_f), float("-inf"), dtype=acc),
           "min": x.new_full((n_b, n_e, n_f), float("inf"), dtype=acc), "routed": x.new_zeros(n_b, n_e, dtype=acc)}
    with torch.no_grad():
        for e in ids.unique().tolist():
            if not 0 <= e < n_e:
                continue  # a padding slot
            rows, slot = torch.where(ids == e)  # [R], [R]
            a = block.activation(xs[rows], e, ws[rows, slot], acc)  # [R, F]
            at = sample[rows]  # [R] the sample of each row
            out["sum"][:, e].index_add_(0, at, a)
            out["max"][:, e].scatter_reduce_(0, at[:, None].expand_as(a), a, "amax")
            out["min"][:, e].scatter_reduce_(0, at[:, None].expand_as(a), a, "amin")
            out["routed"][:, e].index_add_(0, at, torch.ones_like(a[:, 0]))
    out["count"] = mask.sum(1)  # [B]
    unrouted = (out["routed"] < out["count"][:, None])[..., None]  # [B, E, 1]: a = 0 at some image position
    out["max"] = torch.where(unrouted, out["max"].clamp(min=0), out["max"])
    out["min"] = torch.where(unrouted, out["min"].clamp(max=0), out["min"])
    return out


def reduced_score(stats: dict, proj: torch.Tensor, reduce: str, *at) -> torch.Tensor:
    """Over image positions, score = reduce of activation x projection (as Scorer.score_image): mean: sum /
    count x P; max: max(a) P where P >= 0, min(a) P where P < 0. stats[k][at] [F], proj [F] -> [F]."""
    if reduce == "mean":
        return stats["sum"][at].to(proj.dtype) / max(int(stats["count"][at[0]]), 1) * proj
    return torch.where(proj >= 0, stats["max"][at].to(proj.dtype) * proj, stats["min"][at].to(proj.dtype) * proj)


def image_parts(adapter: Adapter, store: MoECaptureStore, b: int, token: int, reduce: str) -> list[tuple]:
    """[(layer, expert, neuron indices [n], scores [n])] of one concept of sample b, token t, over the sample's
    image positions (positions='image'); routed experts no image position chose are not scored."""
    if any(s is None for s in store.image) or int(store.image[0]["count"][b]) == 0:
        raise MMNError("positions='image': a sample's prompt holds no image tokens (its processor or template "
                       "left the image placeholder out); check the prompt, or use positions='last'")
    project, _acc = _projector(adapter, token)
    parts = []
    with torch.no_grad():
        for layer, block in enumerate(adapter.experts):
            stats = store.image[layer]
            if block is None:
                proj = project(adapter.out_weight(layer))  # [F]
                parts.append((layer, DENSE, torch.arange(proj.numel()), reduced_score(stats, proj, reduce, b)))
                continue
            for e in torch.nonzero(stats["routed"][b] > 0)[:, 0].tolist():
                proj = project(block.expert_out(e))  # [F]
                parts.append((layer, e, torch.arange(proj.numel()), reduced_score(stats, proj, reduce, b, e)))
            if block.shared is not None:
                proj = project(block.shared_out())  # [F_s]
                parts.append((layer, block.n_experts, torch.arange(proj.numel()),
                              reduced_score(store.shared_image[layer], proj, reduce, b)))
    return parts


# ----------------------------------------------------------------------------------- method='grad'
def expert_forward(block: ExpertBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """The experts module's forward, eagerly: x [N, d], idx / w [N, k] -> (y [N, d], {e: (rows [R], h [R, F])})
    with each routed expert's h a node of the graph (a leaf when nothing before it needs a gradient). Each
    expert's rows as the eager forward computes them: act(gate) * up, down_proj, times the router weight."""
    y = torch.zeros_like(x)  # [N, d]
    nodes = {}
    for e in idx.unique().tolist():
        if not 0 <= e < block.n_experts:
            continue
        rows, slot = torch.where(idx == e)  # [R], [R]
        h = block.expert_h(x[rows], e)  # [R, F]
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
        out = block.down(h, e) * w[rows, slot, None]  # [R, d]
        y = y.index_add(0, rows, out.to(y.dtype))
        nodes[e] = (rows, h)
    return y, nodes


def expert_forward_input(block: ExpertBlock, routed_in: torch.Tensor):
    """An input-gated experts module's forward (Llama 4), eagerly: routed_in [E*N, d] (each expert's copy of
    the rows, scaled by its router score: 0 where not chosen) -> (y [E*N, d], {e: (rows [R] of N, h [R, F])})
    with each expert's h on its chosen rows a node of the graph (elsewhere its rows are 0, and so its output)."""
    xs = routed_in.reshape(block.n_experts, -1, routed_in.shape[-1])  # [E, N, d]
    y = torch.zeros_like(xs)
    nodes = {}
    for e in range(block.n_experts):
        rows = torch.nonzero(xs[e].ne(0).any(-1))[:, 0]  # [R] the rows routed to e
        if not len(rows):
            continue
        h = block.expert_h(xs[e, rows], e)  # [R, F]
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
        y = y.index_put((torch.full_like(rows, e), rows), block.down(h, e).to(y.dtype))
        nodes[e] = (rows, h)
    return y.reshape(routed_in.shape), nodes


GRAD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # else 2e-2 (half precision kernels)


class MoEGraph:
    """What `moe_graph` keeps of one forward: per layer the nodes whose gradients score the neurons."""

    def __init__(self, n_layers: int):
        self.dense: list[torch.Tensor | None] = [None] * n_layers  # [B, T, F]
        self.shared: list[torch.Tensor | None] = [None] * n_layers  # [B, T, F_s]
        self.experts: list[dict | None] = [None] * n_layers  # {e: (rows [R] of the flat B*T, h [R, F])}
        self.width: list[int] = [0] * n_layers  # T of the MoE block's call: row = b * T + position

    def nodes(self) -> list[torch.Tensor]:
        out = [t for t in self.dense + self.shared if t is not None]
        return out + [h for ex in self.experts if ex for _rows, h in ex.values()]

    def parts(self, adapter: Adapter, grads: dict, b: int, pos: int) -> list[tuple]:
        """[(layer, expert, indices [n], h x d logit / d h [n])] at sample b, position pos; grads: id(node) ->
        its gradient (None: unused). For an expert neuron h dL/dh = a dL/da, a = g h (h reaches the logit
        only through a)."""
        parts = []

        def score(h, g, at):  # h, g [..., F] -> [F]
            acc = torch.float64 if h.dtype == torch.float64 else torch.float32
            return h[at].detach().to(acc) * (0 if g is None else g[at].to(acc))

        for layer in range(len(self.dense)):
            if self.dense[layer] is not None:
                h = self.dense[layer]
                parts.append((layer, DENSE, torch.arange(h.shape[-1]), score(h, grads[id(h)], (b, pos))))
            for e, (rows, h) in sorted((self.experts[layer] or {}).items()):
                hit = torch.nonzero(rows == b * self.width[layer] + pos)[:, 0]
                if len(hit):
                    parts.append((layer, e, torch.arange(h.shape[-1]), score(h, grads[id(h)], int(hit[0]))))
            if self.shared[layer] is not None:
                h = self.shared[layer]
                parts.append((layer, adapter.experts[layer].n_experts, torch.arange(h.shape[-1]),
                              score(h, grads[id(h)], (b, pos))))
        return parts


@contextlib.contextmanager
def moe_graph(adapter: Adapter) -> Iterator[MoEGraph]:
    """Hooks (removed on exit, also on error) that keep, of a forward under torch.enable_grad, every
    dense and shared-expert h with its graph, and replace each experts module's output with
    `expert_forward`'s (after checking that it equals the module's own), so that d logit / d h exists for
    every routed expert's h through the real model's forward."""
    graph = MoEGraph(adapter.n_layers)

    def node(where: list, layer: int, h: torch.Tensor) -> torch.Tensor:
        if not h.requires_grad:  # nothing before it needs a gradient: a leaf, so later layers carry a graph
            h = h.detach().requires_grad_(True)
        where[layer] = h
        return h

    with contextlib.ExitStack() as hooks:
        for layer, block in enumerate(adapter.experts):
            if block is None:
                hooks.enter_context(adapter.hook_site(layer).hooked(functools.partial(node, graph.dense, layer)))
                continue

            def width(_m, args, kwargs, layer=layer):
                (x,) = call_args(args, kwargs)
                graph.width[layer] = int(x.shape[1]) if x.dim() == 3 else int(x.shape[0])

            def recompute(_m, args, kwargs, y, layer=layer, block=block):
                if block.gating == "input":
                    new, graph.experts[layer] = expert_forward_input(block, *call_args(args, kwargs))
                else:
                    new, graph.experts[layer] = expert_forward(block, *call_args(args, kwargs, EXPERTS_CALL))  # [N, d]
                tol = GRAD_TOLERANCE.get(y.dtype, 2e-2) * max(float(y.detach().abs().max()), 1e-30)
                if new.shape != y.shape or not torch.allclose(new.detach(), y.detach(), rtol=0, atol=tol):
                    raise MMNError(f"layer {layer}: the experts recomputed eagerly differ from "
                                   f"{type(block.experts).__name__}'s output; method='grad' cannot score them")
                return new

            hooks.enter_context(_removing(adapter.mlps[layer].register_forward_pre_hook(width, with_kwargs=True)))
            hooks.enter_context(_removing(block.experts.register_forward_hook(recompute, with_kwargs=True)))
            if block.shared is not None:
                site = HookSite(block.shared.down_proj, pre=True, layer=adapter.layer_modules[layer])
                hooks.enter_context(site.hooked(functools.partial(node, graph.shared, layer)))
        yield graph


# ----------------------------------------------------------------------------------- heatmaps
def check_units(adapter: Adapter, neurons) -> list[tuple[int, int, int]]:
    """The neurons of an MoE model as (layer, expert, index) (a find record's first three fields), checked
    against the model: routed experts 0..E-1, the shared expert E, a dense layer's neurons expert -1."""
    out = []
    for n in neurons:
        if len(n) < 3:
            raise MMNError(f"neuron {tuple(n)}: {type(adapter.model).__name__} has mixture-of-experts layers; name "
                           "each neuron (layer, expert, index) as find's records do (dense layers' expert: -1)")
        layer, expert, index = (int(v) for v in n[:3])
        width = adapter.unit_weight(layer, expert).shape[1]  # MMNError for a unit the model does not have
        if not 0 <= index < width:
            raise MMNError(f"neuron ({layer}, {expert}, {index}) out of range: that unit has neurons 0..{width - 1}")
        out.append((layer, expert, index))
    return out


@contextlib.contextmanager
def moe_recording(adapter: Adapter, neurons: list, select: Selector | None = None):
    """Hooks on the layers of `neurons` [(layer, expert, index)] (removed on exit): at each call, cols[layer] =
    select(activations) [B, ..., n] fp32 on CPU, columns in the order of groups[layer], the positions in
    `neurons` of that layer's neurons; activation as defined above (g_e h_{e,i}, 0 where e is not routed).
    Yields (groups, cols)."""
    groups: dict[int, list[int]] = {}
    for k, n in enumerate(neurons):
        groups.setdefault(int(n[0]), []).append(k)
    cols: dict[int, torch.Tensor] = {}

    def put(layer: int, ks: list[int], a: torch.Tensor) -> None:  # a [B, T, len(ks)]: those neurons' columns
        a = (a if select is None else select(a)).float().cpu()  # [B, ..., len(ks)]
        if layer not in cols:
            cols[layer] = torch.zeros(*a.shape[:-1], len(groups[layer]))
        cols[layer][..., [groups[layer].index(k) for k in ks]] = a

    def units(layer: int, expert: int, h: torch.Tensor) -> None:  # h [B, T, F] of a dense layer or shared expert
        ks = [k for k in groups[layer] if neurons[k][1] == expert]
        if ks:
            put(layer, ks, h.detach()[..., [int(neurons[k][2]) for k in ks]])

    with contextlib.ExitStack() as hooks:
        for layer, ks in groups.items():
            block = adapter.experts[layer]
            if block is None:
                hooks.enter_context(adapter.hook_site(layer).hooked(functools.partial(units, layer, DENSE)))
                continue
            shape: list = []

            def start(_m, args, kwargs, layer=layer, shape=shape):  # a new call: fresh columns
                shape[:] = [tuple(call_args(args, kwargs)[0].shape[:2])]
                cols.pop(layer, None)

            def routed(x, idx, w, layer=layer, block=block, shape=shape):  # x [N, d], idx / w [N, k]
                for e in sorted({neurons[k][1] for k in groups[layer] if neurons[k][1] < block.n_experts}):
                    ks = [k for k in groups[layer] if neurons[k][1] == e]
                    a = x.new_zeros(x.shape[0], len(ks), dtype=torch.float64 if x.dtype == torch.float64 else
                                    torch.float32)  # [N, n]: 0 where e is not routed (fp32, as find scores)
                    rows, slot = torch.where(idx == e)  # [R], [R]
                    with torch.no_grad():
                        a[rows] = block.activation(x[rows], e, w[rows, slot], a.dtype)[:, [int(neurons[k][2]) for k in ks]]
                    put(layer, ks, a.reshape(*shape[0], len(ks)))

            hooks.enter_context(_removing(adapter.mlps[layer].register_forward_pre_hook(start, with_kwargs=True)))
            for handle in block.routing_hooks(routed):
                hooks.enter_context(_removing(handle))
            if block.shared is not None:
                site = HookSite(block.shared.down_proj, pre=True, layer=adapter.layer_modules[layer])
                hooks.enter_context(site.hooked(functools.partial(units, layer, block.n_experts)))
        yield groups, cols
