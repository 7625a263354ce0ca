"""Per-request patches: the rows of one batch run with different patches (and none) in one forward.

No weight is copied or changed. A patch gives neurons S of a layer the output vectors V; for a row
carrying it, the output projection's result gets `h[:, S] @ (V - W_out[:, S])^T` added
(`mmn_fast.kernels.neuron_delta`), through forward hooks on the patched layers' output projections
that exist only while a batch runs (`PatchRegistry.active`), under the model's swap lock.

A row carries None (the base model), one patch, or a list applied in order under `apply`'s stacking
rule: a later patch touching a neuron of an earlier one must have been made on top of it. A patch is
a `Patch`, a file path, or the name of a patch loaded into the registry (`engine.patches`). Every
batch is checked against the weights as they are when it runs: base hashes, shapes, finiteness, and
no neuron that an in-place applied patch (`engine.apply`) changed.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import MMNError
from ..kernels import NeuronDeltas, neuron_delta
from .adapters import Adapter, HookSite
from .live import active_patches, base_matches, model_lock, prepare_patch
from .patch_file import Patch, PatchError, gather_rows, load_patch

Stack = tuple  # tuple[Patch, ...]: what one row carries, applied in order; () is the base model


@dataclass(frozen=True)
class LayerEdit:
    """One row state's edit of one layer: neurons idx get the rows `new` (the weight's dtype)."""

    idx: torch.Tensor  # [n] int64 on the weight's device
    new: torch.Tensor  # [n, d] new output vectors, the weight's dtype
    delta: torch.Tensor  # [n, d] new - current, fp32 (fp64 for fp64 weights)


def _label(patch: Patch, names: dict[int, str]) -> str:
    """How errors name a patch: its registered name, else its method and concepts."""
    name = names.get(id(patch))
    if name is not None:
        return repr(name)
    return f"<{patch.method} patch {patch.concepts}>"


def _effective(adapter: Adapter, stack: Stack, in_place: dict, names: dict[int, str],
               force: frozenset[int] = frozenset()) -> dict[int, LayerEdit]:
    """The combined edit of a stack of patches per layer, checked against the current weights.
    in_place: neuron -> the in-place handle that changed it. force: ids of patches loaded with
    force=True (base hashes not checked)."""
    rows: dict[int, dict[int, torch.Tensor]] = {}  # layer -> neuron -> new row [d] (weight dtype)
    owner: dict[tuple[int, int], Patch] = {}
    base: dict[int, torch.Tensor] = {}  # layer -> weight [d, F] as it is
    for patch in stack:
        if patch.expert_entries:
            raise PatchError(f"patch {_label(patch, names)} edits expert neurons of mixture-of-experts layers "
                             f"({sorted(patch.expert_entries)[:3]} as (layer, expert)): per-request patches take dense "
                             "layers' neurons only; apply it in place (engine.apply) or bake it (mmn patch bake)")
        for l, w, idx, new, e, *_ in prepare_patch(adapter, patch):
            base[l] = w
            neurons = e.indices.tolist()
            clash = [(l, i) for i in neurons if (l, i) in in_place]
            if clash:
                raise PatchError(f"per-request patch {_label(patch, names)} changes neuron L{clash[0][0]}.{clash[0][1]}, "
                                 f"which the in-place patch {in_place[clash[0]]!r} changed: revert that one first, or "
                                 "serve both per request")
            cur = gather_rows(w, idx)  # [n, d] as the row sees them before this patch
            layer_rows = rows.setdefault(l, {})
            earlier = [k for k, i in enumerate(neurons) if i in layer_rows]
            for k in earlier:
                cur[k] = layer_rows[neurons[k]]
            if id(patch) not in force and not base_matches(e, cur):
                if earlier:
                    i = neurons[earlier[0]]
                    raise PatchError(f"patches {_label(owner[(l, i)], names)} and {_label(patch, names)} on one row "
                                     f"both change neuron L{l}.{i}, and the later was not made on top of the earlier: "
                                     "give the row one of them, or make the second on top of the first")
                raise PatchError(f"patch {_label(patch, names)} does not fit this model: the output vectors of layer "
                                 f"{l} do not match its recorded originals (made on {patch.base.get('architecture')} "
                                 f"{patch.base.get('source') or ''}; if it was made on top of another patch, list that "
                                 "one first on the row)")
            for k, i in enumerate(neurons):
                layer_rows[i] = new[k]
                owner[(l, i)] = patch
    edits = {}
    for l, layer_rows in sorted(rows.items()):
        w = base[l]
        idx = torch.tensor(sorted(layer_rows), dtype=torch.int64, device=w.device)
        new = torch.stack([layer_rows[i] for i in idx.tolist()])  # [n, d]
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        edits[l] = LayerEdit(idx, new, new.to(acc) - gather_rows(w, idx).to(acc))
    return edits


class BatchPatches:
    """The per-row edits of one batch: which state each row has, each state's edits per layer, and the
    `NeuronDeltas` the hooks hand the kernel (built once per layer for the batch)."""

    def __init__(self, stacks: list[Stack], edits: list[dict[int, LayerEdit]], row_state: list[int]):
        self.stacks, self.edits, self.row_state = stacks, edits, row_state  # row_state: -1 = base
        self.layers = sorted({l for e in edits for l in e})

    def row_edits(self, row: int) -> dict[int, LayerEdit]:
        """{layer: LayerEdit} of a row ({} for a base row): what scoring needs for patched vectors."""
        s = self.row_state[row]
        return self.edits[s] if s >= 0 else {}

    def layer_deltas(self, layer: int) -> NeuronDeltas:
        """All states' edits of `layer`, padded to the most neurons (a state that leaves it alone: 0)."""
        per = [e.get(layer) for e in self.edits]
        some = next(e for e in per if e is not None)
        n, d = max(int(e.idx.numel()) for e in per if e is not None), some.new.shape[1]
        p = len(per)
        idx = torch.zeros(p, n, dtype=torch.int64, device=some.idx.device)
        delta = torch.zeros(p, n, d, dtype=some.delta.dtype, device=some.idx.device)
        counts = []
        for s, e in enumerate(per):
            c = 0 if e is None else int(e.idx.numel())
            if c:
                idx[s, :c], delta[s, :c] = e.idx, e.delta
            counts.append(c)
        return NeuronDeltas(idx, delta, torch.tensor(counts, device=idx.device), tuple(counts))


class PatchRegistry:
    """Named patches an engine serves per request (`engine.patches`): `load`, `unload`, `list`.

    Loading validates exactly as `apply` does, against the weights as they are. A request resolves
    its names when it starts and keeps the patches it got: unloading one while a request that uses it
    is in flight lets that request finish with it.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, backend: str = "torch"):
        self.model, self.adapter, self.backend = model, adapter, backend
        self._lock = threading.Lock()  # the name table only; never held while waiting for the swap lock
        self._patches: dict[str, Patch] = {}
        self._forced: set[str] = set()

    def load(self, name: str, patch, force: bool = False) -> Patch:
        """Register `patch` (a Patch or a file path) under `name`; returns the Patch. force=True skips
        the base-hash check only (deliberate cross-model use), as `apply(force=True)` does."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise MMNError(f"a patch name must be a non-empty string without surrounding spaces, got {name!r}")
        patch = patch if isinstance(patch, Patch) else load_patch(patch)
        with model_lock(self.model):
            _effective(self.adapter, (patch,), self._in_place(), {id(patch): name},
                       frozenset({id(patch)}) if force else frozenset())
        with self._lock:
            if name in self._patches:
                raise MMNError(f"a patch named {name!r} is already loaded; unload it first or pick another name")
            self._patches[name] = patch
            if force:
                self._forced.add(name)
        return patch

    def unload(self, name: str) -> Patch:
        """Remove a registered patch; returns it. Requests already running keep using it."""
        with self._lock:
            if name not in self._patches:
                raise MMNError(self._unknown(name))
            self._forced.discard(name)
            return self._patches.pop(name)

    def list(self) -> list[dict]:
        """The registered patches: name, method, concepts, neurons, layers; sorted by name."""
        with self._lock:
            items = sorted(self._patches.items())
        return [{"name": n, "method": p.method, "concepts": dict(p.concepts), "n_neurons": p.n_neurons,
                 "layers": sorted(p.entries)} for n, p in items]

    def get(self, name: str) -> Patch:
        with self._lock:
            if name not in self._patches:
                raise MMNError(self._unknown(name))
            return self._patches[name]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._patches

    def _unknown(self, name) -> str:
        known = ", ".join(map(repr, sorted(self._patches))) or "none"
        return f"unknown patch name {name!r} (loaded: {known}); load it with engine.patches.load(name, path)"

    def _in_place(self) -> dict:
        return {n: h for h in active_patches(self.model) for n in h.neurons}

    # ------------------------------------------------------------------ requests
    def resolve(self, patches: Sequence | None, n_rows: int) -> list[Stack] | None:
        """One stack per row from a request's `patches` (None, or one entry per row: None, a registered
        name, a path, a Patch, or a list of those). Names are looked up now, files read now."""
        if patches is None:
            return None
        if isinstance(patches, (str, Path, Patch)):
            raise MMNError("patches must be a list with one entry per image (None for the base model)")
        patches = list(patches)
        if len(patches) != n_rows:
            raise MMNError(f"{len(patches)} patch entries for {n_rows} images: give one per image (None for the "
                           "base model)")
        loaded: dict[str, Patch] = {}  # one file read once per request
        return [self._stack(entry, loaded) for entry in patches]

    def _stack(self, entry, loaded: dict) -> Stack:
        if entry is None:
            return ()
        items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        out = []
        for item in items:
            if isinstance(item, Patch):
                out.append(item)
            elif isinstance(item, str) and item in self:
                out.append(self.get(item))
            elif isinstance(item, (str, Path)):
                if isinstance(item, str) and not Path(item).exists():
                    raise MMNError(self._unknown(item) + ", or give a patch file path")
                key = str(item)
                if key not in loaded:
                    loaded[key] = load_patch(item)
                out.append(loaded[key])
            else:
                raise MMNError(f"a patch entry is None, a name, a path or a Patch, not {type(item).__name__}")
        if len({id(p) for p in out}) != len(out):
            raise MMNError("one row lists the same patch twice")
        return tuple(out)

    def plan(self, stacks: list[Stack]) -> BatchPatches | None:
        """Check a batch's stacks against the weights as they are now (call under the swap lock) and
        build its edits; None when no row carries a patch."""
        if not any(stacks):
            return None
        with self._lock:
            names = {id(p): n for n, p in self._patches.items()}
            forced = frozenset(id(self._patches[n]) for n in self._forced)
        distinct: dict[tuple, int] = {}
        states, row_state = [], []
        for stack in stacks:
            if not stack:
                row_state.append(-1)
                continue
            key = tuple(id(p) for p in stack)
            if key not in distinct:
                distinct[key] = len(states)
                states.append(stack)
            row_state.append(distinct[key])
        in_place = self._in_place()
        edits = [_effective(self.adapter, s, in_place, names, forced) for s in states]
        return BatchPatches(states, edits, row_state)

    @contextlib.contextmanager
    def active(self, patches) -> Iterator[BatchPatches | None]:
        """Run the model with per-row patches inside the block: `patches` are a request's entries (or
        stacks from `resolve`), one per row of every forward in the block. Holds the swap lock; the hooks
        are removed on exit, also on error. Yields the batch's edits (None when no row has a patch)."""
        stacks = patches if patches is None or all(isinstance(s, tuple) and all(isinstance(p, Patch) for p in s)
                                                   for s in patches) else self.resolve(patches, len(patches))
        with model_lock(self.model):
            plan = self.plan(stacks) if stacks is not None else None
            if plan is None:
                yield None
                return
            with contextlib.ExitStack() as hooks:
                for layer in plan.layers:
                    hooks.enter_context(self._hook(plan, layer))
                yield plan

    def _hook(self, plan: BatchPatches, layer: int):
        """A forward hook on `layer`'s output projection adding each row's edit to its output."""
        out_proj = self.adapter.out_projs[layer]
        deltas = plan.layer_deltas(layer)
        row_state = torch.tensor(plan.row_state, dtype=torch.int64, device=deltas.idx.device)
        n_rows, backend = len(plan.row_state), self.backend

        def fix(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if h.shape[0] % n_rows or y.shape[0] != h.shape[0]:
                raise MMNError(f"per-request patches: layer {layer}'s output projection saw {h.shape[0]} rows for a "
                               f"batch of {n_rows}; this model does not keep the batch dimension first")
            h3 = h.reshape(n_rows, -1, h.shape[-1])  # [B, T, F] (models that flatten positions: [B*T, F])
            y3 = y.reshape(n_rows, -1, y.shape[-1])  # [B, T, d]
            return neuron_delta(h3, y3, row_state, deltas, backend).reshape(y.shape)

        return HookSite(out_proj, pre=True).hooked(fix, output=True)
