"""Mixture-of-experts MLP blocks: where their expert neurons' activations and output vectors are.

In an MoE layer, neuron i of expert e writes `g_e(x) * h_{e,i}(x) * W_out^{l,e}[:, i]` into the residual
stream (g_e the router weight, 0 when the expert is not chosen), so its direct contribution to token t is
`g_e * h_{e,i} * <W_out^{l,e}[:, i], W_U[t]>`. Shared experts always run, with weight 1.

The layout understood is transformers' fused experts module (5.x: DeepSeek-V3, Qwen3-MoE, Qwen3-VL-MoE,
GLM-4-MoE ...): `experts.gate_up_proj` [E, 2F, d] (gate rows, then up rows), `experts.down_proj` [E, d, F],
`experts.act_fn`, called as `experts(hidden [N, d], top_k_index [N, k], top_k_weights [N, k])`, so the
routing of every token is read off that call; a shared expert, when there is one, is a plain gated MLP
`shared_experts` (or `shared_expert`) with `down_proj`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MMNError

SHARED_NAMES = ("shared_experts", "shared_expert")
DENSE = -1  # the expert number of a dense layer's neurons: [layer, -1, index]


@dataclass(frozen=True)
class ExpertBlock:
    """One MoE block: its fused experts and its shared expert (None when it has none)."""

    block: nn.Module
    experts: nn.Module
    shared: nn.Module | None

    @property
    def n_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def d_expert(self) -> int:
        return int(self.experts.down_proj.shape[2])

    def expert_h(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [R, d] -> h [R, F]: expert e's activation, the input of its down projection, computed as the
        experts module computes it."""
        gate, up = nn.functional.linear(x, self.experts.gate_up_proj[e]).chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def expert_out(self, e: int) -> torch.Tensor:
        """Expert e's output vectors as [d, F] (column i is neuron i's)."""
        return self.experts.down_proj[e]

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
    e, d, f = down.shape
    if gu.dim() != 3 or tuple(gu.shape) != (e, 2 * f, d) or (d_model is not None and d != d_model):
        raise MMNError(f"{name}: expert weights gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are "
                       f"not the [E, 2F, d] / [E, d, F] layout mmn_fast reads")
    shared = next((getattr(module, n) for n in SHARED_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    if shared is not None and not isinstance(getattr(shared, "down_proj", None), nn.Linear):
        raise MMNError(f"{name}: its shared expert {type(shared).__name__} has no down_proj linear layer")
    if hasattr(module, "shared_expert_gate"):
        raise MMNError(f"{name}: a gated shared expert (shared_expert_gate) is not scored yet")
    return ExpertBlock(module, experts, shared)


def is_moe(module: nn.Module) -> bool:
    """A mixture-of-experts block: it holds experts (a list of MLPs, or fused expert weights)."""
    return hasattr(module, "experts") or hasattr(module, "local_experts")
