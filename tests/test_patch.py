"""Patch files and live patching: format, validation, bit-exact round trips, all-or-nothing,
stacking and conflicts, dtypes, thread safety while generating, baking."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mmn_fast
from mmn_fast.edit.bake import bake
from mmn_fast.cli.main import main
from mmn_fast.edit.methods import perturb, random_neurons
from mmn_fast.errors import MMNError
from mmn_fast.model.live import active_patches, apply_patch
from mmn_fast.model.patch_file import PatchError, load_patch, make_patch
from mmn_fast.testing import llava_model

NEURONS = [(0, 1), (0, 5), (1, 7)]


@pytest.fixture(scope="module")
def eng(llava_path):
    """A private engine: these tests write into its weights (always restoring them)."""
    return mmn_fast.load(llava_path, device="cpu")


def out_sha(engine) -> str:
    """SHA-256 of every output projection's bytes."""
    h = hashlib.sha256()
    for l in range(engine.adapter.n_layers):
        h.update(engine.adapter.out_weight(l).detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def model_sha(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def noise_patch(engine, neurons=NEURONS, seed=0, sigma=0.5):
    return perturb(engine, neurons, sigma=sigma, seed=seed)


def other_engine(**shape):
    model, processor = llava_model(**shape)
    return mmn_fast.load(model, processor=processor, device="cpu")


# ------------------------------------------------------------------------------- format, round trip
def test_round_trip_is_bit_exact(eng, tmp_path):
    before, whole = out_sha(eng), model_sha(eng.model)
    patch = noise_patch(eng)
    path = patch.save(tmp_path / "p.mmnpatch.safetensors")
    loaded = load_patch(path)
    assert loaded.neurons == sorted(NEURONS) and loaded.method == "perturb" and loaded.base["d_mlp"] == 96
    for l, e in patch.entries.items():
        assert torch.equal(e.indices, loaded.entries[l].indices) and torch.equal(e.vectors, loaded.entries[l].vectors)
        assert e.orig_sha256 == loaded.entries[l].orig_sha256 and e.name == loaded.entries[l].name
    originals = {l: eng.adapter.out_weight(l).detach().clone() for l in loaded.entries}
    handle = mmn_fast.apply_patch(eng, path)
    assert out_sha(eng) != before and active_patches(eng) == [handle]
    for l, e in loaded.entries.items():
        w = eng.adapter.out_weight(l)
        assert torch.equal(w[:, e.indices].t(), e.vectors)
        untouched = torch.ones(w.shape[1], dtype=torch.bool)
        untouched[e.indices] = False
        assert torch.equal(w[:, untouched], originals[l][:, untouched])
    handle.revert()
    assert out_sha(eng) == before and model_sha(eng.model) == whole and active_patches(eng) == []
    with pytest.raises(PatchError, match="already reverted"):
        handle.revert()


def test_scoped_use_and_engine_api(eng, tmp_path, images):
    before = out_sha(eng)
    path = noise_patch(eng, sigma=3.0, neurons=random_neurons(eng, 150)).save(tmp_path / "p.mmnpatch.safetensors")
    base = eng.caption(images[:2], max_new_tokens=6)
    with eng.patched(str(path)) as handle:
        assert handle.active and out_sha(eng) != before
        edited = eng.caption(images[:2], max_new_tokens=6)
    assert not handle.active and out_sha(eng) == before and edited != base
    handle = eng.apply(path)
    handle.revert()
    assert out_sha(eng) == before


def _save_variant(src, dst, edit):
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata=meta)


def _entries(meta, fn):
    entries = json.loads(meta["entries"])
    fn(entries)
    meta["entries"] = json.dumps(entries)


def _rename_unit(t, m, old, new):
    """Entry `old` renamed `new` in the metadata and the tensor names (version left as it is)."""
    _entries(m, lambda e: e.update({new: e.pop(old)}))
    for part in ("indices", "vectors"):
        t[f"{new}.{part}"] = t.pop(f"{old}.{part}")


def _set_idx(t, k, v):
    t[k] = t[k].clone()
    t[k][0] = v


CASES = {
    "no format": (lambda t, m: m.pop("format"), "'format'"),
    "future version": (lambda t, m: m.update(format_version="3"), "unsupported format version '3'"),
    "expert in version 1": (lambda t, m: _rename_unit(t, m, "1", "1.0"), "format version 1 does not have"),
    "expert layout on a dense unit": (lambda t, m: _entries(m, lambda e: e["0"].update(layout="experts")),
                                      "unknown layout"),
    "bad json": (lambda t, m: m.update(entries="{not json"), "not valid JSON"),
    "deep json": (lambda t, m: m.update(params="[" * 200000 + "]" * 200000), "not valid JSON"),
    "base shape": (lambda t, m: m.update(base=json.dumps({"n_layers": 2, "d_model": 64})), "'base' must record"),
    "concepts type": (lambda t, m: m.update(concepts="[1]"), "'concepts' must be an object"),
    "int32 indices": (lambda t, m: t.update({"0.indices": t["0.indices"].int()}), "int64"),
    "index too big": (lambda t, m: _set_idx(t, "0.indices", 96), r"must lie in \[0, 96\)"),
    "negative index": (lambda t, m: _set_idx(t, "0.indices", -1), "must lie in"),
    "repeated index": (lambda t, m: _set_idx(t, "0.indices", 5), "repeat"),
    "vector shape": (lambda t, m: t.update({"0.vectors": t["0.vectors"][:, :-1]}), "shape"),
    "vector dtype": (lambda t, m: t.update({"0.vectors": t["0.vectors"].long()}), "float16, bfloat16"),
    "nan": (lambda t, m: t["0.vectors"].view(-1).__setitem__(0, float("nan")), "NaN or infinity"),
    "inf": (lambda t, m: t["1.vectors"].view(-1).__setitem__(3, float("inf")), "NaN or infinity"),
    "missing tensor": (lambda t, m: t.pop("1.vectors"), "missing"),
    "extra tensor": (lambda t, m: t.update(payload=torch.zeros(3)), "unexpected tensors"),
    "bad hash": (lambda t, m: _entries(m, lambda e: e["0"]["orig_sha256"].update(float32="xyz")), "orig_sha256"),
    "hash dtype": (lambda t, m: _entries(m, lambda e: e["0"]["orig_sha256"].update(int8="0" * 64)), "orig_sha256"),
    "layer key": (lambda t, m: _entries(m, lambda e: e.update({"7": e.pop("1")})), "not a layer number"),
    "layout": (lambda t, m: _entries(m, lambda e: e["0"].update(layout="pickle")), "unknown layout"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_validation_failure_is_a_clear_error(eng, tmp_path, case):
    good = noise_patch(eng).save(tmp_path / "good.mmnpatch.safetensors")
    edit, message = CASES[case]
    bad = tmp_path / "bad.mmnpatch.safetensors"
    _save_variant(good, bad, edit)
    with pytest.raises(PatchError, match=message):
        load_patch(bad)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "empty", "huge header", "missing"])
def test_hostile_files_never_execute_code(tmp_path, kind):
    marker, path = tmp_path / "pwned", tmp_path / "p.mmnpatch.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_Evil(str(marker))))
    elif kind == "torch.save":
        torch.save({"0.indices": _Evil(str(marker))}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge header":
        path.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(PatchError, match="not found" if kind == "missing" else "not a safetensors file"):
        load_patch(path)
    assert not marker.exists()


def test_unknown_metadata_keys_warn_and_load(eng, tmp_path):
    good = noise_patch(eng).save(tmp_path / "good.mmnpatch.safetensors")
    odd = tmp_path / "odd.mmnpatch.safetensors"
    _save_variant(good, odd, lambda t, m: m.update(note="from the future"))
    with pytest.warns(UserWarning, match="note"):
        patch = load_patch(odd)
    assert patch.extra == {"note": "from the future"} and "note" in patch.describe()


# ------------------------------------------------------------------------- checks, all-or-nothing
@pytest.mark.parametrize("shape, message", [
    ({"hidden_size": 32}, "d_model=32"),
    ({"num_layers": 1}, "has 1 decoder layers"),
    ({"intermediate_size": 4}, "out of range"),
])
def test_shape_misfits_are_refused_even_with_force(eng, shape, message):
    other = other_engine(**shape)
    before = out_sha(other)
    for force in (False, True):
        with pytest.raises(PatchError, match=message):
            apply_patch(other, noise_patch(eng), force=force)
    assert out_sha(other) == before and active_patches(other) == []


def test_wrong_base_is_refused_unless_forced(eng):
    other = other_engine(seed=1)
    before = out_sha(other)
    patch = noise_patch(eng)
    with pytest.raises(PatchError, match="wrong base model"):
        other.apply(patch)
    assert out_sha(other) == before
    handle = other.apply(patch, force=True)
    assert out_sha(other) != before
    handle.revert()
    assert out_sha(other) == before


def test_one_bad_layer_leaves_every_layer_unchanged(eng):
    patch = noise_patch(eng)  # layers 0 and 1
    w = eng.adapter.out_weight(1)
    saved = w[:, 7].clone()
    with torch.no_grad():
        w[:, 7] += 1.0  # layer 1 no longer matches the patch's base; layer 0 does
    try:
        before = out_sha(eng)
        with pytest.raises(PatchError, match=r"layer\(s\) \[1\]"):
            eng.apply(patch)
        assert out_sha(eng) == before
    finally:
        with torch.no_grad():
            w[:, 7] = saved


def test_overflowing_cast_is_refused_before_writing(llava_path):
    half = mmn_fast.load(llava_path, device="cpu", dtype="float16")
    patch = noise_patch(half)
    patch.entries[1].vectors = patch.entries[1].vectors.float() * 1e6  # fine in the file, inf in fp16
    before = out_sha(half)
    with pytest.raises(PatchError, match="overflow"):
        half.apply(patch, force=True)
    assert out_sha(half) == before


# --------------------------------------------------------------------------- stacking, conflicts
def test_stacking_conflicts_and_revert_order(eng):
    base = out_sha(eng)
    a = noise_patch(eng, [(0, 1), (1, 7)], seed=1)
    b = noise_patch(eng, [(0, 2), (1, 8)], seed=2)  # disjoint from a
    c = noise_patch(eng, [(1, 7), (1, 9)], seed=3)  # overlaps a, made on the base model
    ha = eng.apply(a)
    hb = eng.apply(b)
    with_ab = out_sha(eng)
    with pytest.raises(PatchError, match="conflict"):
        eng.apply(c)
    assert out_sha(eng) == with_ab
    d = noise_patch(eng, [(1, 7), (1, 9)], seed=4)  # overlaps a, made on top of it: stacks
    hd = eng.apply(d)
    assert active_patches(eng) == [ha, hb, hd]
    with pytest.raises(PatchError, match="revert it first"):
        ha.revert()
    assert ha.active
    hb.revert()  # disjoint: any order
    hd.revert()
    ha.revert()
    assert out_sha(eng) == base and active_patches(eng) == []


def test_revert_refuses_to_discard_outside_changes(eng):
    base = out_sha(eng)
    handle = eng.apply(noise_patch(eng))
    w = eng.adapter.out_weight(0)
    with torch.no_grad():
        w[3, 1] += 1.0
    with pytest.raises(PatchError, match="changed since"):
        handle.revert()
    handle.revert(force=True)
    assert out_sha(eng) == base


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_patch_made_in_fp32_applies_in_half_precision(eng, llava_path, dtype):
    half = mmn_fast.load(llava_path, device="cpu", dtype=dtype)
    before = out_sha(half)
    patch = noise_patch(eng)
    handle = half.apply(patch)  # the recorded hash of the fp32 originals cast to this dtype matches
    for l, e in patch.entries.items():
        assert torch.equal(half.adapter.out_weight(l)[:, e.indices].t(), e.vectors.to(half.adapter.out_weight(l).dtype))
    handle.revert()
    assert out_sha(half) == before
    back = noise_patch(half)  # made on rounded weights: does not match the fp32 originals
    with pytest.raises(PatchError, match="wrong base"):
        eng.apply(back)


def _conv1d_model(d=16, f=24, n_layers=2):
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.c_fc, self.mlp.c_proj = Conv1D(f, d), Conv1D(d, f)  # c_proj.weight [F, d]

    model = nn.Module()
    model.layers = nn.ModuleList([Block() for _ in range(n_layers)])
    model.lm_head = nn.Linear(d, 10)
    return model


def test_gpt2_conv1d_layout_and_plain_module_with_spec():
    torch.manual_seed(0)
    model = _conv1d_model()
    spec = dict(layers="layers", mlp="mlp", out_proj="c_proj", gated=False)
    adapter = mmn_fast.model.live.resolve_target(model, spec)[1]
    w0 = adapter.out_weight(1).clone()
    patch = make_patch(adapter, {1: (torch.tensor([2, 5]), torch.randn(2, 16))}, "test")
    assert patch.entries[1].layout == "conv1d" and patch.entries[1].name == "layers.1.mlp.c_proj.weight"
    handle = apply_patch(model, patch)
    assert torch.equal(model.layers[1].mlp.c_proj.weight[[2, 5]], patch.entries[1].vectors)  # rows of [F, d]
    handle.revert()
    assert torch.equal(adapter.out_weight(1), w0)
    model.layers[1].mlp.c_proj.weight = nn.Parameter(torch.empty(24, 16, device="meta"))  # offloaded
    with pytest.raises(PatchError, match="offloaded"):
        apply_patch(model, patch, force=True)


@pytest.mark.parametrize("conv1d", [True, False])
def test_revert_after_the_model_was_cast(conv1d):
    """model.half() after a patch gives the weights new storage (a Conv1D's [d, F] view then points
    at the old one). Revert finds the current weights and writes the originals cast: exactly the
    model that was never patched, cast."""
    torch.manual_seed(1)
    if conv1d:
        model, spec = _conv1d_model(), dict(layers="layers", mlp="mlp", out_proj="c_proj", gated=False)
    else:
        model = nn.Module()
        model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
        for b in model.layers:
            b.mlp = nn.Module()
            b.mlp.up_proj, b.mlp.down_proj = nn.Linear(16, 24), nn.Linear(24, 16)
        model.lm_head = nn.Linear(16, 10)
        spec = dict(layers="layers", mlp="mlp", out_proj="down_proj", gated=False)
    adapter = mmn_fast.model.live.resolve_target(model, spec)[1]
    never_patched = [adapter.out_weight(l).detach().half() for l in range(2)]
    patch = make_patch(adapter, {1: (torch.tensor([2, 5, 7]), torch.randn(3, 16))}, "test")
    handle = apply_patch(model, patch)
    model.half()
    assert adapter.out_weight(1).dtype == torch.float16
    assert torch.equal(adapter.out_weight(1)[:, [2, 5, 7]].t(), patch.entries[1].vectors.half())
    handle.revert()
    for l in range(2):
        assert torch.equal(adapter.out_weight(l), never_patched[l])
    # changed by other means after the cast: refused, as without one
    handle = apply_patch(model, patch, force=True)
    model.float()
    with torch.no_grad():
        adapter.out_weight(1)[:, 2] += 1
    with pytest.raises(PatchError, match="changed since"):
        handle.revert()
    handle.revert(force=True)
    assert torch.equal(adapter.out_weight(1), never_patched[1].float())
    # a round trip through half precision changes the patched values: refused, with the reason
    handle = apply_patch(model, patch, force=True)
    model.half()
    model.float()
    with pytest.raises(PatchError, match="changed since"):  # whatever address the allocator gave
        handle.revert()
    handle.revert(force=True)
    assert torch.equal(adapter.out_weight(1), never_patched[1].float())


def test_revert_after_the_output_projection_was_replaced():
    """A replaced out_proj cannot be restored: revert refuses (naming the module); force restores
    the other layers, drops the patch with a warning and unblocks the patch under it."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    model = _conv1d_model()
    spec = dict(layers="layers", mlp="mlp", out_proj="c_proj", gated=False)
    adapter = mmn_fast.model.live.resolve_target(model, spec)[1]
    before = [adapter.out_weight(l).detach().clone() for l in range(2)]
    under = apply_patch(model, make_patch(adapter, {1: (torch.tensor([4]), torch.randn(1, 16))}, "under"))
    top = apply_patch(model, make_patch(adapter, {0: (torch.tensor([1]), torch.randn(1, 16)),
                                                  1: (torch.tensor([4]), torch.randn(1, 16))}, "top"))
    model.layers[1].mlp.c_proj = Conv1D(16, 24)  # a fresh module where the patched one was
    with pytest.raises(PatchError, match="layers.1.mlp.c_proj.*replaced"):
        top.revert()
    assert top.active and torch.equal(adapter.out_weight(0)[:, 1], top.patch.entries[0].vectors[0])
    with pytest.raises(PatchError, match="revert it first"):
        under.revert()
    with pytest.warns(UserWarning, match="dropped without restoring"):
        top.revert(force=True)
    assert not top.active and torch.equal(adapter.out_weight(0), before[0])  # layer 0 restored
    with pytest.raises(PatchError, match="replaced"):  # `under` patched the same replaced module
        under.revert()
    with pytest.warns(UserWarning):
        under.revert(force=True)
    assert mmn_fast.model.live.active_patches(model) == []


# ------------------------------------------------------------------------------------ concurrency
def test_no_forward_or_caption_sees_half_a_patch(llava_path, images):
    e = mmn_fast.load(llava_path, device="cpu")
    patch = noise_patch(e, random_neurons(e, 192), sigma=2.0)
    imgs = images[:2]
    inputs = e.encode(imgs, mmn_fast.DEFAULT_PROMPT, None)
    with torch.no_grad():
        base_logits = e.model(**inputs).logits
        base_caps = tuple(e.caption(imgs, max_new_tokens=8))
        with e.patched(patch):
            new_logits = e.model(**inputs).logits
            new_caps = tuple(e.caption(imgs, max_new_tokens=8))
    assert base_caps != new_caps and not torch.equal(base_logits, new_logits)
    owned = []
    generate = e.model.generate
    e.model.generate = lambda *a, **k: (owned.append(e.swap_lock._is_owned()), generate(*a, **k))[1]
    try:
        e.find(imgs[:1], concepts="all", max_new_tokens=3)
    finally:
        del e.model.generate
    assert owned == [True]  # find holds the swap lock around generation

    stop, caps, logits_ok, finds = threading.Event(), [], [], []

    def captioner():
        while not stop.is_set():
            caps.append(tuple(e.caption(imgs, max_new_tokens=8)))
            finds.append(tuple(r.caption for r in e.find(imgs, concepts="all", max_new_tokens=8)))

    def forwarder():  # raw forward passes, no lock taken by the caller: the hooks take it
        while not stop.is_set():
            with torch.no_grad():
                out = e.model(**inputs).logits
            logits_ok.append(torch.equal(out, base_logits) or torch.equal(out, new_logits))

    threads = [threading.Thread(target=captioner), threading.Thread(target=forwarder)]
    for t in threads:
        t.start()
    deadline, swaps = time.time() + 20, 0
    try:
        while time.time() < deadline and (swaps < 50 or len(set(caps)) < 2):
            handle = e.apply(patch)
            time.sleep(0.005)
            handle.revert()
            time.sleep(0.005)
            swaps += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(caps) == {base_caps, new_caps}, set(caps)  # both states seen, nothing else
    assert set(finds) <= {base_caps, new_caps}
    assert logits_ok and all(logits_ok)


# ------------------------------------------------------------------------------------------ baking
def _loaded_equal(live_model, path):
    fresh = mmn_fast.load(path, device="cpu")
    live, baked = live_model.state_dict(), fresh.model.state_dict()
    assert live.keys() == baked.keys()
    assert all(torch.equal(live[k], baked[k]) for k in live)
    return fresh


def test_bake_equals_live_patch(eng, llava_path, tmp_path, images, capsys):
    patch = noise_patch(eng, random_neurons(eng, 40), sigma=2.0)
    path = patch.save(tmp_path / "p.mmnpatch.safetensors")
    rc = main(["patch", "bake", "--model", str(llava_path), "--patch", str(path), "--out", str(tmp_path / "baked")])
    assert rc == 0 and "rewrote model.safetensors" in capsys.readouterr().out
    with eng.patched(patch):
        fresh = _loaded_equal(eng.model, tmp_path / "baked")
        assert fresh.caption(images[:2], max_new_tokens=6) == eng.caption(images[:2], max_new_tokens=6)
    assert json.loads((tmp_path / "baked" / "mmn_bake.json").read_text())["patches"][0]["method"] == "perturb"
    assert main(["patch", "verify", "--model", str(tmp_path / "baked"), "--patch", str(path)]) == 0
    assert "already applied" in capsys.readouterr().out
    with pytest.raises(MMNError, match="not empty"):
        bake(llava_path, patch, tmp_path / "baked")
    with pytest.raises(PatchError, match="does not hold"):  # baked twice: the base no longer matches
        bake(tmp_path / "baked", patch, tmp_path / "again")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))


def test_bake_sharded_checkpoint_links_untouched_shards(eng, tmp_path):
    sharded = tmp_path / "sharded"
    eng.model.save_pretrained(sharded, max_shard_size="150KB")
    eng.processor.save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    a = noise_patch(eng, [(1, 3), (1, 4)], seed=5)
    ha = eng.apply(a)
    d = noise_patch(eng, [(1, 4)], seed=6)  # stacked on a
    hd = eng.apply(d)
    try:
        done = bake(sharded, [a, d], tmp_path / "out")
        _loaded_equal(eng.model, tmp_path / "out")
    finally:
        hd.revert()
        ha.revert()
    assert len(done["rewritten"]) == 1 and len(done["linked"]) == len(shards) - 1
    for s in shards:
        same = os.stat(sharded / s).st_ino == os.stat(tmp_path / "out" / s).st_ino
        assert same == (s not in done["rewritten"])
    new_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"] and len(new_index["metadata"]["mmn_patches"]) == 2


def test_cli_inspect_verify_and_bad_files(eng, tmp_path, llava_path, capsys):
    path = noise_patch(eng).save(tmp_path / "p.mmnpatch.safetensors")
    assert main(["patch", "inspect", "--patch", str(path)]) == 0
    out = capsys.readouterr().out
    assert "method=perturb" in out and "layer   0" in out and "layers.1.mlp.down_proj.weight" in out
    assert main(["patch", "verify", "--model", str(llava_path), "--patch", str(path)]) == 0
    assert "applies cleanly" in capsys.readouterr().out
    other = tmp_path / "other"
    model, processor = llava_model(seed=3)
    model.save_pretrained(other)
    processor.save_pretrained(other)
    assert main(["patch", "verify", "--model", str(other), "--patch", str(path)]) == 1
    assert "does NOT match" in capsys.readouterr().out
    bad = tmp_path / "bad.mmnpatch.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    assert main(["patch", "inspect", "--patch", str(bad)]) == 2
    assert "invalid patch file" in capsys.readouterr().err


def test_checkpoint_key_resolution():
    from mmn_fast.edit.bake import checkpoint_key
    from mmn_fast.model.patch_file import Entry

    e = Entry(3, torch.tensor([0]), torch.zeros(1, 4), "model.language_model.layers.3.mlp.down_proj.weight",
              "language_model.model.layers.3.mlp.down_proj.weight")
    keys = [f"{p}.layers.{l}.mlp.down_proj.weight" for p in ("language_model.model", "vision.encoder") for l in (3, 13)]
    assert checkpoint_key(e, keys) == "language_model.model.layers.3.mlp.down_proj.weight"  # recorded name
    e.checkpoint_name = "renamed.elsewhere"
    assert checkpoint_key(e, ["lm.layers.3.mlp.down_proj.weight", "lm.layers.13.mlp.down_proj.weight"]) == \
        "lm.layers.3.mlp.down_proj.weight"  # unique suffix
    with pytest.raises(MMNError, match="several tensors"):
        checkpoint_key(e, keys)
    with pytest.raises(MMNError, match="no tensor"):
        checkpoint_key(e, ["lm.blocks.3.ffn.w2.weight"])


def test_a_model_that_is_never_patched_carries_no_hooks(llava_path):
    """The forward-pass guard arrives with the first patch, not with the engine."""
    import mmn_fast
    from mmn_fast.testing import random_images

    eng = mmn_fast.load(llava_path, device="cpu")
    assert not eng.model._forward_pre_hooks and not eng.model._forward_hooks
    eng.find(random_images(1), concepts="all", max_new_tokens=3)
    assert not eng.model._forward_pre_hooks and not eng.model._forward_hooks


def test_patch_on_a_device_map_model(llava_path, images):
    """A model loaded with device_map (accelerate's dispatch hooks on its modules) patches and
    reverts like any other: captions follow the patch, the bytes come back exactly."""
    pytest.importorskip("accelerate")
    spread = mmn_fast.load(llava_path, device_map="auto")
    plain = mmn_fast.load(llava_path, device="cpu")
    patch = noise_patch(plain, sigma=5.0)
    before = model_sha(spread.model)
    with spread.patched(patch), plain.patched(patch):
        assert model_sha(spread.model) != before
        got = [r.output_ids for r in spread.find(images[:2], concepts="all", max_new_tokens=5)]
        want = [r.output_ids for r in plain.find(images[:2], concepts="all", max_new_tokens=5)]
        assert got == want
    assert model_sha(spread.model) == before
