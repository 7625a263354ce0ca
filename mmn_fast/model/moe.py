"""Mixture-of-experts MLP blocks: where their expert neurons' activations and output vectors are.

In an MoE layer, neuron i of expert e writes `g_e(x) * h_{e,i}(x) * W_out^{l,e}[:, i]` into the residual
stream (g_e the router weight, 0 when the expert is not chosen), so its direct contribution to token t is
`g_e * h_{e,i} * <W_out^{l,e}[:, i], W_U[t]>`. Shared experts always run, with weight 1.

Two forms of transformers' fused experts modules are understood:

- output-gated (5.x: DeepSeek-V3, Qwen3-MoE, Qwen3-VL-MoE, GLM-4V-MoE ...): `experts.gate_up_proj` [E, 2F, d]
  (gate rows, then up rows), `experts.down_proj` [E, d, F], called as `experts(hidden [N, d], top_k_index
  [N, k], top_k_weights [N, k])`, so the routing of every token is read off that call; an expert's output
  is scaled by its router weight: a = g_e * h_{e,i}(x).
- input-gated (Llama 4): `experts.gate_up_proj` [E, d, 2F], `experts.down_proj` [E, F, d], called on the
  block's rows already scaled by each expert's router score (`experts(x * g [E*N, d])`, g = 0 where the
  expert is not chosen); the routing is read off the block's `router` (it returns the scores and logits).
  The gate sits inside the activation: a = h_{e,i}(g_e x).

Either way the activation a of neuron (e, i) times `<W_out^{l,e}[:, i], W_U[t]>` is its direct
contribution. A shared expert, when there is one, is a plain gated MLP `shared_experts` (or
`shared_expert`) with `down_proj`, weight 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MMNError

SHARED_NAMES = ("shared_experts", "shared_expert")
EXPERTS_CALL = ("hidden_states", "top_k_index", "top_k_weights")  # an output-gated experts module's arguments
DENSE = -1  # the expert number of a dense layer's neurons: [layer, -1, index]


def call_args(args: tuple, kwargs: dict, names: tuple = ("hidden_states",)) -> tuple:
    """A module call's arguments `names`, given by position or by keyword (what a pre-hook sees)."""
    return tuple(args[k] if len(args) > k else kwargs[n] for k, n in enumerate(names))


@dataclass(frozen=True)
class ExpertSlot:
    """Where expert `index`'s output vectors sit in a fused experts module's down_proj: [E, d, F] (slot
    `index`, neurons are columns) or, `transposed`, [E, F, d] (neurons are rows)."""

    index: int
    transposed: bool = False

    def matrix(self, experts: nn.Module) -> torch.Tensor:
        """[d, F] view of the expert's output vectors (writes reach the model)."""
        w = experts.down_proj[self.index]
        return w.t() if self.transposed else w


@dataclass(frozen=True)
class ExpertBlock:
    """One MoE block: its fused experts, its shared expert (None when it has none), how its router weights
    enter ("output" or "input", see the module docstring) and, for input gating, its router."""

    block: nn.Module
    experts: nn.Module
    shared: nn.Module | None
    gating: str = "output"
    router: nn.Module | None = None

    @property
    def n_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def d_expert(self) -> int:
        return int(self.experts.down_proj.shape[1 if self.gating == "input" else 2])

    def slot(self, e: int) -> ExpertSlot:
        return ExpertSlot(e, self.gating == "input")

    def expert_h(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [R, d] (for input gating, already scaled by the router score) -> h [R, F]: expert e's
        activation, the input of its down projection, computed as the experts module computes it."""
        w = self.experts.gate_up_proj[e]
        gate, up = (x @ w if self.gating == "input" else nn.functional.linear(x, w)).chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def activation(self, x: torch.Tensor, e: int, g: torch.Tensor, acc: torch.dtype | None = None) -> torch.Tensor:
        """x [R, d] block rows, g [R] expert e's router weights there -> a [R, F], the activation whose
        product with an output vector is the neuron's direct contribution: g h(x) (in `acc`, e.g. fp32), or
        h(g x) (input gating: the product the model itself forms, then cast to `acc`)."""
        acc = acc or x.dtype
        if self.gating == "input":
            return self.expert_h(x * g[:, None], e).to(acc)
        return self.expert_h(x, e).to(acc) * g.to(acc)[:, None]

    def expert_out(self, e: int) -> torch.Tensor:
        """Expert e's output vectors as [d, F] (column i is neuron i's)."""
        return self.slot(e).matrix(self.experts)

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """h [R, F] -> expert e's output rows [R, d], as the experts module computes them (before any gate)."""
        w = self.experts.down_proj[e]
        return h @ w if self.gating == "input" else nn.functional.linear(h, w)

    def routing_hooks(self, on_route) -> list:
        """Hooks (their handles returned: remove them) calling on_route(x [N, d], idx [N, k], g [N, k]) at each
        call of the block: its rows, each row's chosen experts and their router weights."""
        if self.gating == "output":
            def routed(_m, args, kwargs):
                on_route(*call_args(args, kwargs, EXPERTS_CALL))
            return [self.experts.register_forward_pre_hook(routed, with_kwargs=True)]
        rows: list = []

        def block_in(_m, args, kwargs):
            (x,) = call_args(args, kwargs)
            rows[:] = [x.reshape(-1, x.shape[-1])]

        def scored(_m, _args, out):
            scores = out[0]  # [N, E]: sigmoid of the chosen experts' logits, 0 elsewhere (out: scores, logits)
            idx = torch.topk(scores, self.router.top_k, dim=1).indices  # [N, k]: the chosen experts (scores > 0)
            on_route(rows[0], idx, scores.gather(1, idx))
        return [self.block.register_forward_pre_hook(block_in, with_kwargs=True),
                self.router.register_forward_hook(scored)]

    def shared_out(self) -> torch.Tensor:
        """The shared expert's output vectors [d, F_s]."""
        return self.shared.down_proj.weight


def expert_block(module: nn.Module, d_model: int | None = None) -> ExpertBlock:
    """The ExpertBlock of an MoE block; MMNError naming what is not understood."""
    experts = getattr(module, "experts", None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    name = type(module).__name__
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or not hasattr(experts, "act_fn"):
        raise MMNError(f"{name}: mmn_fast scores experts stored fused (experts.gate_up_proj [E, 2F, d], "
                       "experts.down_proj [E, d, F], experts.act_fn, as transformers 5 stores them); this block's "
                       f"experts are {type(experts).__name__}")
    router = getattr(module, "router", None)
    e, d, f = down.shape
    gating = "output"
    if gu.dim() == 3 and tuple(gu.shape) == (e, f, 2 * d) and router is not None and hasattr(router, "top_k") \
            and (d_model is None or f == d_model):  # Llama 4: [E, d, 2F] / [E, F, d], the router scales the input
        gating = "input"
    elif gu.dim() != 3 or tuple(gu.shape) != (e, 2 * f, d) or (d_model is not None and d != d_model):
        raise MMNError(f"{name}: expert weights gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are "
                       f"not a layout mmn_fast reads ([E, 2F, d] / [E, d, F], or Llama 4's [E, d, 2F] / [E, F, d] "
                       "with a router)")
    shared = next((getattr(module, n) for n in SHARED_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    if shared is not None and not isinstance(getattr(shared, "down_proj", None), nn.Linear):
        raise MMNError(f"{name}: its shared expert {type(shared).__name__} has no down_proj linear layer")
    if hasattr(module, "shared_expert_gate"):
        raise MMNError(f"{name}: a gated shared expert (shared_expert_gate) is not scored yet")
    return ExpertBlock(module, experts, shared, gating, router if gating == "input" else None)


def is_moe(module: nn.Module) -> bool:
    """A mixture-of-experts block: it holds experts (a list of MLPs, or fused expert weights)."""
    return hasattr(module, "experts") or hasattr(module, "local_experts")
