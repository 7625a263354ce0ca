"""Patches on a live model: applied in place without reloading, all-or-nothing, stackable, revertible.

Thread safety: every model has one re-entrant swap lock (`model_lock(model)`, `engine.swap_lock`).
A forward pre-hook and an always-called forward hook on the model's top module hold it for each
forward pass, and applying or reverting writes under it, so no forward pass ever sees half a
patch. A whole `generate` call (many forward passes) sees one state only while its caller holds
the lock: `Engine.find` (per batch) and `Engine.caption` do; raw `model.generate` calls need
`with engine.swap_lock: ...` around them. (A forward pass interrupted by KeyboardInterrupt skips
the releasing hook, as torch runs always-called hooks on Exception only: that thread then keeps
the lock.)

Stacking: a model keeps its applied handles in order. A patch whose neurons an applied patch
changed must have been made on top of it (its recorded original hashes then match the current
vectors), and the later one must be reverted first.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref

import torch
from torch import nn

from ..errors import MMNError
from .adapters import Adapter, spec_for, unit_matrix
from .moe import ExpertSlot
from .patch_file import DENSE, Entry, Patch, PatchError, as_patch, gather_rows, rows_sha256, write_rows


class _Guard:
    """Forward pre-hook (enter=True) / always-called forward hook (enter=False) holding the swap lock.
    A module-level class, not a closure, so that models stay picklable and deep-copyable."""

    def __init__(self, enter: bool):
        self.enter = enter

    def __call__(self, module, *args):
        st = _state(module, install=False)
        depth = getattr(st.local, "depth", 0)
        if self.enter:
            st.lock.acquire()
            st.local.depth = depth + 1
        elif depth > 0:  # a pre-hook before ours raised: we never acquired
            st.local.depth = depth - 1
            st.lock.release()


class _State:
    """A model's patch state: its swap lock and applied handles. Lives on the model itself (attribute
    `STATE_ATTR`), so it goes when the model goes. A copy or unpickled model gets a fresh state (no
    lock or handles of the original's); whether the guard hooks are installed travels with the hooks."""

    def __init__(self, guarded: bool = False):
        self.lock = threading.RLock()
        self.local = threading.local()  # forward-pass depth per thread
        self.guarded = guarded  # the _Guard hooks are on the model
        self.handles: list[PatchHandle] = []  # applied, in order
        self.adapter: Adapter | None = None  # for plain modules: built from spec_overrides
        self.spec_overrides: dict = {}

    def __reduce__(self):
        return _State, (self.guarded,)


STATE_ATTR = "_mmn_patch_state"  # the attribute of an nn.Module holding its _State


def _key(w: torch.Tensor):
    return (w.device, w.untyped_storage().data_ptr())


def _state(model: nn.Module, install: bool = True) -> _State:
    """The model's state, made on first use. `dict.setdefault` on the instance dict is atomic, so two
    threads reaching a model for the first time get the same state (and lock)."""
    st = vars(model).get(STATE_ATTR)
    if st is None:
        st = vars(model).setdefault(STATE_ATTR, _State())
    if install and not st.guarded:
        with st.lock:
            if not st.guarded:
                model.register_forward_pre_hook(_Guard(True), prepend=True)
                model.register_forward_hook(_Guard(False), always_call=True)
                st.guarded = True
    return st


def model_lock(model: nn.Module) -> threading.RLock:
    """The model's swap lock. The forward-pass guard (hooks that hold it during each forward) is
    installed by the first `apply_patch`, so a model that is never patched carries no hooks."""
    return _state(model, install=False).lock


def active_patches(target) -> list["PatchHandle"]:
    """The handles applied to this model (engine or module), in application order."""
    model = target if isinstance(target, nn.Module) else target.model
    return list(_state(model, install=False).handles)


def resolve_target(target, spec_overrides: dict | None = None) -> tuple[nn.Module, Adapter]:
    """(model, adapter) of a patch target: an Engine, an Adapter, or an nn.Module (its adapter built
    from `spec_overrides`, kept on the model and rebuilt when the overrides or its modules change)."""
    if isinstance(target, Adapter):
        return target.model, target
    if hasattr(target, "adapter") and isinstance(getattr(target, "model", None), nn.Module):  # an Engine
        return target.model, target.adapter
    if isinstance(target, nn.Module):
        st = _state(target)
        spec_overrides = spec_overrides or st.spec_overrides  # a rebuild keeps the paths it was given
        if (st.adapter is None or (spec_overrides and spec_overrides != st.spec_overrides)
                or _detached_layers(target, st.adapter)):  # a module was replaced since: find them again
            st.adapter, st.spec_overrides = Adapter(target, spec_for(target, spec_overrides)), dict(spec_overrides)
        return target, st.adapter
    raise MMNError(f"patches apply to an Engine, an nn.Module or an Adapter, not {type(target).__name__}")


def _detached_layers(model: nn.Module, adapter: Adapter, present=None) -> list[int]:
    """Layers whose output projection, or experts (as the adapter found them), are no longer part of the
    model. present: ids of the model's modules, when the caller has walked them already."""
    present = present if present is not None else {id(m) for m in model.modules()}
    return sorted({l for l, e in adapter.units() if id(adapter.unit(l, e)[0]) not in present})


def _check_attached(model: nn.Module, adapter: Adapter, present=None) -> None:
    detached = _detached_layers(model, adapter, present)
    if detached:
        raise PatchError(f"the output projection of layer(s) {detached[:8]} was replaced since the engine or adapter "
                         "was built: a write would go to the detached module; load the engine again")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class PatchHandle:
    """An applied patch. `revert()` restores the original bytes; usable as a context manager."""

    def __init__(self, patch: Patch, model: nn.Module, saved: list):
        self.patch = patch
        self._model = weakref.ref(model)
        # [(unit label, module holding the vectors (weakref), its qualified name, slot (a fused experts
        #   tensor's expert, else None), (weight shape, storage key), idx [n], original rows [n, d],
        #   new rows [n, d])]: no reference to the weight itself, which a later cast or move replaces
        self._saved = saved
        self.neurons = frozenset(patch.neurons)
        self.active = True

    def __repr__(self) -> str:
        state = "applied" if self.active else "reverted"
        return (f"<PatchHandle {self.patch.method} {self.patch.concepts} {len(self.neurons)} neurons, {state}>")

    @property
    def saved_rows(self) -> list[tuple]:
        """(unit, original rows [n, d], patched rows [n, d]) per patched unit (a dense layer's number, or
        (layer, expert)): what the handle keeps (in the weight's dtype and device at apply time) to revert
        and to check; empty once reverted."""
        return [(unit, orig, new) for unit, *_, orig, new in self._saved]

    def revert(self, force: bool = False) -> None:
        """Restore the original vectors exactly. Refused (nothing changes) when a patch applied later
        changes some of the same neurons (revert that one first), when the neurons were changed
        since by other means (force=True discards those changes), or when a patched output
        projection was replaced, reshaped or offloaded since (force=True then restores the layers
        it still can, drops the patch with a warning, and so unblocks the patches under it)."""
        model = self._model()
        if model is None:
            raise PatchError("the model this patch was applied to no longer exists")
        st = _state(model)
        with st.lock:
            if not self.active:
                raise PatchError("this patch was already reverted")
            later = st.handles[st.handles.index(self) + 1:]
            blocking = [h for h in later if h.neurons & self.neurons]
            if blocking:
                raise PatchError(f"revert refused: {blocking[0]!r}, applied later, changes "
                                 f"{len(blocking[0].neurons & self.neurons)} of the same neurons; revert it first")
            now, lost = [], []  # the weights as they are now; layers that cannot be restored
            for item in self._saved:
                try:
                    now.append(_current(model, *item))
                except PatchError as e:
                    if not force:
                        raise PatchError(f"revert refused: {e}; revert(force=True) restores the other layers "
                                         "and drops this patch") from None
                    lost.append(str(e))
            # Always compared: a version-counter shortcut cannot see `model.half(); model.float()`
            # (the counter survives `param.data = ...`, and the allocator may reuse the address).
            changed = [l for l, w, idx, _, new, _ in now if not _same_bits(gather_rows(w, idx), new)]
            if changed and not force:
                moved = any(item[5] for item in now if item[0] in changed)
                raise PatchError(f"revert refused: the patched neurons of {_units(changed)} were changed since "
                                 "the patch was applied" + (" (the weights were also cast or moved since: a round "
                                 "trip through a lower precision changes them too)" if moved else "") +
                                 "; force=True overwrites them with the originals")
            for _, w, idx, orig, _, _ in now:
                write_rows(w, idx, orig)
            if lost:
                warnings.warn("patch dropped without restoring: " + "; ".join(lost), stacklevel=2)
            st.handles.remove(self)
            self.active = False
            self._saved = []

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.revert()


def _current(model: nn.Module, layer, module_ref, name: str | None, slot, where: tuple, idx, orig, new):
    """(unit, weight, idx, original rows, new rows, moved) as the model holds them now.
    `model.half()` or `.to(device)` after the patch gives the weight new storage (GPT-2's Conv1D
    view then points at the old one): the weight is looked up again and the saved rows are cast
    and moved to match. A cast is elementwise, so the reverted weight is exactly the unpatched one,
    cast. moved: the weight's dtype, device or storage changed (for the error message)."""
    shape, key = where
    mod = module_ref()
    try:
        now = model.get_submodule(name) if name is not None else mod
    except AttributeError:
        now = None
    if mod is None or now is not mod:
        raise PatchError(f"layer {layer}: the output projection this patch was applied to "
                         f"({name or 'unnamed'}) was replaced or removed since")
    cur = unit_matrix(mod, slot)
    if tuple(cur.shape) != shape:
        raise PatchError(f"layer {layer}: the output projection is {tuple(cur.shape)} now, "
                         f"{shape} when the patch was applied; cannot revert")
    if cur.device.type == "meta":
        raise PatchError(f"layer {layer}: weights are offloaded (meta device) now; load them back to revert")
    moved = cur.dtype != orig.dtype or cur.device != orig.device or _key(cur) != key
    if cur.dtype != orig.dtype or cur.device != orig.device:
        orig, new = orig.to(cur.device, cur.dtype), new.to(cur.device, cur.dtype)
        idx = idx.to(cur.device)
    return layer, cur, idx, orig, new, moved


def _units(labels) -> str:
    """'layer(s) [1, 3]', or with experts 'unit(s) [1, (2, 0)]' ((layer, expert))."""
    labels = list(labels)
    return f"{'layer' if all(isinstance(x, int) for x in labels) else 'unit'}(s) {labels[:8]}"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal says NaN != NaN and -0.0 == 0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check_layer(layer: int, n_layers: int) -> None:
    """A patch entry's layer must be one of the model's decoder layers."""
    if not 0 <= layer < n_layers:
        raise PatchError(f"patch edits layer {layer}, but the model has {n_layers} decoder layers")


def unit_label(e: Entry):
    """How handles and messages name an entry's unit: its layer (dense), or (layer, expert)."""
    return e.layer if e.expert == DENSE else e.unit


def entry_unit(adapter: Adapter, e: Entry) -> tuple[nn.Module, ExpertSlot | None]:
    """The (module, slot) an entry writes into (Adapter.unit), as a PatchError when the model has no such unit
    (a patch for experts on a dense layer, or the reverse: made for another model)."""
    check_layer(e.layer, adapter.n_layers)
    try:
        return adapter.unit(e.layer, e.expert)
    except MMNError as err:
        raise PatchError(f"the patch edits {e.where()}, which this model does not have ({err}): it was made for "
                         "another model") from None


def fit_rows(layer: int, e: Entry, w: torch.Tensor) -> torch.Tensor:
    """Checks of an entry against the output matrix w [d, F] it goes into that never depend on the
    current values (force does not skip them): shapes, index range, device, dtype. Shared by apply
    and bake, so both refuse the same patches. Returns the new rows [n, d] cast and moved to w's."""
    d, f = w.shape
    n = e.indices.numel()
    where = e.where()
    if tuple(e.vectors.shape) != (n, d):
        raise PatchError(f"{where}: patch vectors are {tuple(e.vectors.shape)}, the model's output vectors "
                         f"have d_model={d}: this patch was made for another model shape")
    if int(e.indices.max()) >= f or int(e.indices.min()) < 0:
        raise PatchError(f"{where}: neuron index {int(e.indices.max())} out of range (the unit has {f})")
    if w.device.type == "meta":
        raise PatchError(f"{where}: weights are offloaded (meta device); load the model onto devices to "
                         "patch it live, or bake the patch into a checkpoint")
    if not w.is_floating_point() or _dtype_name(w.dtype) not in ("float16", "bfloat16", "float32", "float64"):
        raise PatchError(f"{where}: cannot patch weights of dtype {w.dtype} (quantized?)")
    new = e.vectors.to(device=w.device, dtype=w.dtype)  # [n, d]
    if not bool(torch.isfinite(new).all()):  # a file's are checked on load; a Patch built in memory may not be
        raise PatchError(f"{where}: the patch vectors " + ("contain NaN or infinity" if not bool(
            torch.isfinite(e.vectors).all()) else f"overflow {w.dtype}"))
    return new


def base_matches(e: Entry, rows: torch.Tensor, force: bool = False) -> bool:
    """Whether rows [n, d] (a weight's current vectors, in its dtype) hash to the entry's recorded
    originals. A dtype the patch records no hash for is refused unless force."""
    dt = _dtype_name(rows.dtype)
    if dt not in e.orig_sha256 and not force:
        raise PatchError(f"the patch records its original vectors for {sorted(e.orig_sha256)} only, not for "
                         f"this model's {dt}: load the model in one of those, or pass force=True")
    return e.orig_sha256.get(dt) == rows_sha256(rows)


def prepare_patch(adapter: Adapter, patch: Patch) -> list:
    """apply's checks that never depend on the current values (entry_unit, fit_rows).
    Returns [(unit label, weight [d, F], idx, new rows, entry, module, slot)], cast and moved."""
    out = []
    for e in patch.units():
        module, slot = entry_unit(adapter, e)
        w = unit_matrix(module, slot)  # [d, F]
        out.append((unit_label(e), w, e.indices.to(w.device), fit_rows(e.layer, e, w), e, module, slot))
    return out


def apply_patch(target, patch, force: bool = False, **spec_overrides) -> PatchHandle:
    """Write a patch (a Patch or a file path) into a live model in place; returns its handle.

    target: an Engine, an nn.Module (with adapter overrides such as layers="model.layers" where
    discovery does not find the MLPs) or an Adapter. All-or-nothing: if any check fails, no weight
    changes. The current vectors must hash to the patch's recorded originals (it was made on this
    model, or on top of the patches already applied); force=True skips that check only, for
    deliberate cross-model use.
    """
    patch = as_patch(patch)
    model, adapter = resolve_target(target, spec_overrides)
    st = _state(model)
    prepared = prepare_patch(adapter, patch)
    with st.lock:
        touched = {n: h for h in st.handles for n in h.neurons}
        names = {id(m): name for name, m in model.named_modules()}  # to find the module again at revert
        _check_attached(model, adapter, names)
        saved, problems = [], []
        for l, w, idx, new, e, module, slot in prepared:
            cur = gather_rows(w, idx)  # [n, d] in the model's dtype
            if not base_matches(e, cur, force):
                problems.append((l, [n for n in e.neurons if n in touched]))
            saved.append((l, weakref.ref(module), names.get(id(module)), slot, w, idx, cur, new))
        if problems and not force:
            conflicts = [n for _, o in problems for n in o]
            if conflicts:
                raise PatchError(f"conflict: neuron(s) {conflicts[:5]} are already changed by {touched[conflicts[0]]!r}; "
                                 "a patch touching the same neurons must be made on top of it (stacked in order)")
            raise PatchError(f"wrong base model: the output vectors of {_units(l for l, _ in problems)} do not "
                             f"match the patch's recorded originals (patch made on {patch.base.get('architecture')} "
                             f"{patch.base.get('source') or ''}); pass force=True to apply it anyway")
        done = []
        try:
            for item in saved:
                *_, w, idx, _, new = item
                write_rows(w, idx, new)
                done.append(item)
        except BaseException:  # e.g. out of device memory halfway: put back what was written
            for *_, w, idx, cur, _ in done:
                write_rows(w, idx, cur)
            raise
        handle = PatchHandle(patch, model, [(l, ref, name, slot, (tuple(w.shape), _key(w)), idx, cur, new)
                                            for l, ref, name, slot, w, idx, cur, new in saved])
        st.handles.append(handle)
    return handle


def check_patch(target, patch, **spec_overrides) -> list[dict]:
    """Per layer: {"layer", "n", "status"} with status "base" (the patch applies), "applied" (the
    vectors already equal the patch's) or "mismatch"; shape problems raise PatchError."""
    patch = as_patch(patch)
    model, adapter = resolve_target(target, spec_overrides)
    rows = []
    with _state(model, install=False).lock:
        _check_attached(model, adapter)
        for _, w, idx, new, e, *_ in prepare_patch(adapter, patch):
            cur = gather_rows(w, idx)
            status = ("base" if e.orig_sha256.get(_dtype_name(w.dtype)) == rows_sha256(cur)
                      else "applied" if _same_bits(cur, new) else "mismatch")
            rows.append({"layer": e.layer, **({} if e.expert == DENSE else {"expert": e.expert}),
                         "n": int(idx.numel()), "status": status})
    return rows


@contextlib.contextmanager
def patched(target, patch, force: bool = False, **spec_overrides):
    """`with patched(engine, "p.mmnpatch.safetensors") as handle: ...`: reverted on exit."""
    handle = apply_patch(target, patch, force=force, **spec_overrides)
    try:
        yield handle
    finally:
        if handle.active:
            handle.revert()
