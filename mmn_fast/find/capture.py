"""Activation capture with forward hooks that exist only inside a `with` block.

Only the rows the score needs are kept: the last position of every forward call during
generation (one row per decoding step), or given positions in a teacher-forced pass. Image
positions, when asked for, are reduced on the fly (sum, max, min) so a 576-token image never
sits in memory for every layer.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch

from ..errors import MMNError
from ..model.adapters import Adapter

Selector = Callable[[torch.Tensor], torch.Tensor]  # [B, T, X] -> [B, S, X]


def last_position(t: torch.Tensor) -> torch.Tensor:
    return t[:, -1:]


def gather_positions(index: torch.Tensor) -> Selector:
    """Selector for a teacher-forced pass: index [B, S] of positions to keep."""

    def select(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.to(t.device)[:, :, None].expand(-1, -1, t.shape[-1]))

    select.index = index  # the fused capture turns it into row indices
    return select


class CaptureStore:
    """What the hooks collected. Call `.acts()` etc. after the `with` block."""

    def __init__(self, n_layers: int):
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # per layer: [B, S_call, F]
        self.norm_rows: list[torch.Tensor] = []  # [B, S_call, d] inputs of the final norm
        self.image: list[dict[str, torch.Tensor] | None] = [None] * n_layers
        self.leaves: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]  # grad mode: full h

    def acts(self) -> torch.Tensor:
        """[B, S, L, F]: activations of every layer at every captured step."""
        if not self.rows[0]:
            raise MMNError("no activations were captured: the model never called the hooked MLP modules")
        per_layer = [torch.cat(r, dim=1) for r in self.rows]  # L x [B, S, F], each on its layer's device
        dev = per_layer[-1].device
        return torch.stack([p.to(dev) for p in per_layer], dim=2)

    def norm_inputs(self) -> torch.Tensor:
        """[B, S, d]: final-norm inputs at the same rows."""
        return torch.cat(self.norm_rows, dim=1)

    def image_stats(self) -> dict[str, torch.Tensor]:
        """{'sum','max','min' (those collected): [B, L, F], 'count': [B]} over the image positions."""
        if any(s is None for s in self.image):
            raise MMNError("no image positions were seen: the prompt carries no image tokens")
        keys = [k for k in ("sum", "max", "min") if k in self.image[0]]
        dev = self.image[-1][keys[0]].device  # layers of a device_map split sit on several devices
        out = {k: torch.stack([s[k].to(dev) for s in self.image], dim=1) for k in keys}
        out["count"] = self.image[0]["count"].to(dev)
        if bool((out["count"] == 0).any()):  # a mean would be 0/0 -> 0, a max -inf: say so instead
            raise MMNError("positions='image': a sample's prompt holds no image tokens (its processor or template "
                           "left the image placeholder out); check the prompt, or use positions='last'")
        return out


def image_reduce(h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """h [B, T, F], mask [B, T] bool -> sum/max/min over the masked positions, fp32."""
    m = mask[:, :, None]
    hf = h if h.dtype == torch.float64 else h.float()
    return {
        "sum": (hf * m).sum(1),
        "max": hf.masked_fill(~m, float("-inf")).amax(1),
        "min": hf.masked_fill(~m, float("inf")).amin(1),
        "count": mask.sum(1),
    }


@contextlib.contextmanager
def capture(
    adapter: Adapter,
    activation: str = "down_proj_input",
    select: Selector = last_position,
    fold_norm: bool = False,
    image_mask: torch.Tensor | None = None,
    keep_graph: bool = False,
) -> Iterator[CaptureStore]:
    """Hook every layer's `Adapter.hook_site`, yield the store, remove every hook on exit (even on error).

    activation: "down_proj_input" hooks the output projection's input h (exact); "act_fn" hooks
        the activation module's output (the paper's released code).
    image_mask: [B, T] bool of image positions in the first (prefill) call; reduced there.
    keep_graph: keep the full h of each layer with its autograd graph (gradient baseline).
    """
    store = CaptureStore(adapter.n_layers)

    def record(layer: int, h: torch.Tensor) -> torch.Tensor | None:
        if keep_graph:
            if not h.requires_grad:  # first layer: make it a leaf so later layers carry a graph
                h = h.detach().requires_grad_(True)
            store.leaves[layer].append(h)
        store.rows[layer].append(select(h).detach())
        if image_mask is not None and store.image[layer] is None and h.shape[1] == image_mask.shape[1]:
            store.image[layer] = image_reduce(h.detach(), image_mask.to(h.device))
        return h if keep_graph else None

    with contextlib.ExitStack() as hooks:
        for layer in range(adapter.n_layers):
            hooks.enter_context(adapter.hook_site(layer, activation).hooked(functools.partial(record, layer)))
        if fold_norm:
            hooks.enter_context(adapter.final_norm_site().hooked(
                lambda x: store.norm_rows.append(select(x).detach())))
        yield store
