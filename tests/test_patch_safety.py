"""Patches that must not corrupt or mislead: non-finite vectors, modules replaced under a cached
adapter, missing dtype hashes, Hugging Face cache snapshots (symlinked shards), the engine's
weight fingerprint under a patch, and file modes of what mmn_fast writes."""
from __future__ import annotations

import copy
import os
import pickle
import stat
import threading

import pytest
import torch
from torch import nn

import mmn_fast
from mmn_fast.edit.bake import bake
from mmn_fast.edit.methods import perturb, replace_word, suppress
from mmn_fast.io import atomic_open, save_safetensors, tensor_fingerprint, umask, write_json
from mmn_fast.model.live import active_patches, apply_patch, model_lock, resolve_target
from mmn_fast.model.patch_file import PatchError, make_patch
from mmn_fast.find.vocab import vocab_table

NEURONS = [(0, 1), (0, 5), (1, 7)]


@pytest.fixture(scope="module")
def eng(llava_path):
    """A private engine: these tests write into its weights (always restoring them)."""
    return mmn_fast.load(llava_path, device="cpu")


def _weights(engine):
    return [engine.adapter.out_weight(l).detach().clone() for l in range(engine.adapter.n_layers)]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused_everywhere(eng, tmp_path, value):
    """make_patch refuses them; a Patch edited in memory is refused by apply (nothing written) and save."""
    before = _weights(eng)
    with pytest.raises(PatchError, match="NaN or infinity"):
        suppress(eng, NEURONS, scale=value)
    patch = perturb(eng, NEURONS, sigma=0.5)
    patch.entries[0].vectors[0, 0] = value
    with pytest.raises(PatchError, match="NaN or infinity"):
        eng.apply(patch)
    assert _same(_weights(eng), before) and active_patches(eng) == []
    with pytest.raises(PatchError, match="NaN or infinity"):
        patch.save(tmp_path / "bad.mmnpatch.safetensors")
    assert not (tmp_path / "bad.mmnpatch.safetensors").exists()


def _plain_model(d=8, f=12, n_layers=2):
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.Module()
        block.mlp = nn.Module()
        block.mlp.up_proj, block.mlp.down_proj = nn.Linear(d, f), nn.Linear(f, d)
        model.layers.append(block)
    model.lm_head = nn.Linear(d, 10)
    return model


SPEC = dict(layers="layers", mlp="mlp", out_proj="down_proj", gated=False)


def test_plain_module_patch_follows_a_replaced_output_projection():
    """The adapter cached for a plain module is rebuilt when a module was swapped: the patch must
    land in the live module, not in the detached one."""
    torch.manual_seed(0)
    model = _plain_model()
    adapter = mmn_fast.model.live.resolve_target(model, SPEC)[1]
    first = apply_patch(model, make_patch(adapter, {1: (torch.tensor([3]), torch.randn(1, 8))}, "first"))
    first.revert()
    model.layers[1].mlp.down_proj = nn.Linear(12, 8)  # replaced after the adapter was cached
    live = model.layers[1].mlp.down_proj
    adapter = mmn_fast.model.live.resolve_target(model, {})[1]  # rebuilt with the paths it was first given
    vec = torch.randn(1, 8)
    handle = apply_patch(model, make_patch(adapter, {1: (torch.tensor([3]), vec)}, "second"))
    assert torch.equal(live.weight[:, 3], vec[0])
    handle.revert()


def test_patch_state_lives_on_the_model():
    """One state per model, whichever thread reaches it first; a copy of a patched model gets its own
    (no lock or handles of the original's) and keeps a single forward guard when patched itself."""
    torch.manual_seed(0)
    model = _plain_model()
    start, locks = threading.Barrier(8), []

    def first_use():
        start.wait()
        locks.append(model_lock(model))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(locks) == 8 and all(lock is locks[0] for lock in locks)
    adapter = resolve_target(model, SPEC)[1]
    vec = torch.randn(2, 8)
    handle = apply_patch(model, make_patch(adapter, {1: (torch.tensor([3, 5]), vec)}, "orig"))
    assert [(l, tuple(o.shape)) for l, o, _ in handle.saved_rows] == [(1, (2, 8))]
    assert torch.equal(handle.saved_rows[0][2], vec)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert model_lock(twin) is not model_lock(model) and active_patches(twin) == []
        twin_adapter = resolve_target(twin, SPEC)[1]
        other = apply_patch(twin, make_patch(twin_adapter, {0: (torch.tensor([1]), torch.randn(1, 8))}, "twin"))
        assert len(twin._forward_pre_hooks) == len(twin._forward_hooks) == 1
        other.revert()
    assert active_patches(model) == [handle]
    handle.revert()
    assert handle.saved_rows == []


def test_engine_refuses_to_patch_a_detached_output_projection(llava_path):
    eng = mmn_fast.load(llava_path, device="cpu")
    patch = perturb(eng, NEURONS, sigma=0.5)
    layers = eng.model.model.language_model.layers
    old = layers[1].mlp.down_proj
    layers[1].mlp.down_proj = nn.Linear(old.in_features, old.out_features, bias=False)
    with pytest.raises(PatchError, match=r"layer\(s\) \[1\] was replaced"):
        eng.apply(patch)
    assert active_patches(eng) == []


def test_missing_dtype_hash_is_named_not_called_a_wrong_base(eng):
    patch = perturb(eng, NEURONS, sigma=0.5)
    for e in patch.entries.values():
        e.orig_sha256 = {"float16": e.orig_sha256["float16"]}  # the format allows any non-empty subset
    with pytest.raises(PatchError, match=r"only, not for this model's float32"):
        eng.apply(patch)
    eng.apply(patch, force=True).revert()


def test_bake_a_hugging_face_cache_snapshot(eng, tmp_path):
    """Hub cache snapshots hold relative symlinks into ../../blobs: the baked copy must hold files."""
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    sharded = tmp_path / "sharded"
    eng.model.save_pretrained(sharded, max_shard_size="150KB")
    eng.processor.save_pretrained(sharded)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(sharded.iterdir()):
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    patch = perturb(eng, [(1, 3)], sigma=0.5)
    done = bake(snap, patch, tmp_path / "baked")
    assert done["linked"]
    for name in os.listdir(tmp_path / "baked"):
        assert not (tmp_path / "baked" / name).is_symlink()
    with eng.patched(patch):
        fresh = mmn_fast.load(tmp_path / "baked", device="cpu")
        live, baked = eng.model.state_dict(), fresh.model.state_dict()
        assert all(torch.equal(live[k], baked[k]) for k in live)


def test_engine_fingerprint_follows_patches(eng, tmp_path):
    base = eng.fingerprint
    with eng.patched(perturb(eng, NEURONS, sigma=0.5)):
        patched = eng.fingerprint
        table = vocab_table(eng, k=5, cache_dir=tmp_path)
    assert patched != base and eng.fingerprint == base
    fresh = vocab_table(eng, k=5, cache_dir=tmp_path)  # the unpatched table, not the cached one
    assert not torch.equal(table[0][0], fresh[0][0])


def test_engine_fingerprint_sees_edits_through_data(eng):
    """`.data` writes bypass version counters: the fingerprint is computed afresh, never cached."""
    base = eng.fingerprint
    w = eng.adapter.out_weight(0)
    old = w.data[:, 3].clone()
    w.data[:, 3] += 1.0
    try:
        assert eng.fingerprint != base
    finally:
        w.data[:, 3] = old
    assert eng.fingerprint == base
    assert base in eng.fingerprints_of_this_model() and len(eng.fingerprints_of_this_model()) <= 2


def test_fingerprint_sees_every_column():
    """A stride that divides the row length would sample a few columns only (LLaMA-7B: 11008 = 256 x 43)."""
    w = torch.randn(64, 48)
    base = tensor_fingerprint([w], max_elems=64)  # stride 48 before the fix: column 0 only
    for col in range(48):
        v = w.clone()
        v[:, col] += 1.0
        assert tensor_fingerprint([v], max_elems=64) != base, col


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_open(tmp_path / "b.txt") as f:
            f.write("b")
        save_safetensors(tmp_path / "c.safetensors", {"t": torch.zeros(2)}, {})
    finally:
        os.umask(old)
    for name in ("a.json", "b.txt", "c.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640, name


def test_replace_word_keeps_the_case():
    assert replace_word("Red apples, a red cup. RED!", "red", "blue") == "Blue apples, a blue cup. BLUE!"
    assert replace_word("a reddish cup", "red", "blue") == "a reddish cup"


def test_swap_refuses_words_sharing_their_first_token(eng):
    from mmn_fast.edit.methods import swap
    from mmn_fast.errors import MMNError

    with pytest.raises(MMNError, match="same token"):
        swap(eng, NEURONS, "red", "red")


def test_a_run_recorded_with_the_old_fingerprint_is_recognised(eng, tmp_path):
    """Runs written before the sampling fix hold the old hash of the same weights: no false alarm."""
    import types
    import warnings

    from mmn_fast.explain.metrics import RunModelWarning, check_run_model

    ad = eng.adapter
    old = tensor_fingerprint([ad.out_weight(l) for l in range(ad.n_layers)] + [ad.unembed_weight()], version=1)
    shape = {"n_layers": ad.n_layers, "d_mlp": ad.d_mlp}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunModelWarning)
        check_run_model(types.SimpleNamespace(run={"adapter": shape, "weight_fingerprint": old}, path=tmp_path), eng)
    with pytest.warns(RunModelWarning):
        check_run_model(types.SimpleNamespace(run={"adapter": shape, "weight_fingerprint": "0" * 16}, path=tmp_path), eng)
