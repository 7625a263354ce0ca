"""Edits of expert neurons in mixture-of-experts models: patch format version 2 ([layer, expert] units), applied
and reverted bit for bit, stacked, baked into a checkpoint (experts stored fused [E, d, F] as Qwen3-VL-MoE saves
them, or one tensor per expert as DeepSeek-style checkpoints do) and reloaded; the methods pick expert neurons
from find's records; what cannot take expert neurons refuses them by name."""
import base64
import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmn_fast
from mmn_fast import DEFAULT_PROMPT, MMNError
from mmn_fast.cli.main import main
from mmn_fast.edit import concept_neurons, random_neurons, suppress, swap
from mmn_fast.edit.bake import bake
from mmn_fast.edit.export import export_peft
from mmn_fast.edit.methods import optimize, word_token
from mmn_fast.model.live import apply_patch
from mmn_fast.model.patch_file import PatchError, gather_rows, hashes_by_dtype, load_patch, make_patch
from mmn_fast.run.aggregate import open_results
from mmn_fast.serve.app import ServeSettings, create_app
from mmn_fast.testing import random_images
from mmn_fast.testing.llava import llava_model

NEEDS_TORCHVISION = ("qwen3_vl_moe", "glm4v_moe")  # their saved processors reload only with torchvision (video)


@pytest.fixture(scope="module")
def images():
    return random_images(2, size=32, seed=3)


@pytest.fixture(scope="module")
def moe(moe_checkpoint):
    name, path, processor = moe_checkpoint
    return name, path, processor, mmn_fast.load(path, processor=processor, device="cpu")


def _expert_units(ad):
    """(routed unit, shared unit or None, a dense layer or None) of the model."""
    moe_layer = next(l for l, b in enumerate(ad.experts) if b is not None)
    block = ad.experts[moe_layer]
    shared = (moe_layer, block.n_experts) if block.shared is not None else None
    dense = next((l for l, b in enumerate(ad.experts) if b is None), None)
    return (moe_layer, 1), shared, dense


def test_expert_patch_round_trip_apply_revert_stack_and_bake(moe, tmp_path):
    name, path, processor, engine = moe
    ad = engine.adapter
    routed, shared, dense = _expert_units(ad)
    before = {u: ad.unit_weight(*u).clone() for u in ad.units()}
    g = torch.Generator().manual_seed(0)
    d = ad.unembed_weight().shape[1]
    vectors = {routed: (torch.tensor([0, 7]), torch.randn(2, d, generator=g))}
    if shared is not None:
        vectors[shared] = (torch.tensor([3]), torch.randn(1, d, generator=g))
    if dense is not None:
        vectors[dense] = (torch.tensor([2]), torch.randn(1, d, generator=g))
    patch = make_patch(ad, vectors, "test")
    assert patch.version == "2" and set(patch.expert_entries) == {u for u in vectors if isinstance(u, tuple)}
    assert (routed[0], routed[1], 7) in patch.neurons

    file = patch.save(tmp_path / "p.mmnpatch.safetensors")
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["format_version"] == "2"
        assert f"{routed[0]}.{routed[1]}.vectors" in f.keys()
    loaded = load_patch(file)
    assert loaded.neurons == patch.neurons
    assert "expert" in loaded.describe()

    handle = engine.apply(file)
    w = ad.unit_weight(*routed)  # a view into the fused [E, d, F] experts tensor
    assert torch.equal(w[:, 7], loaded.expert_entries[routed].vectors[1])
    other = ad.unit_weight(routed[0], 0)
    assert torch.equal(other, before[(routed[0], 0)])  # expert 0 of the same tensor untouched
    with pytest.raises(PatchError, match="conflict"):  # the same neurons again, not made on top of it
        engine.apply(make_patch_like(ad, patch, before))
    on_top = make_patch(ad, {routed: (torch.tensor([7]), torch.zeros(1, d))}, "on top")
    top = engine.apply(on_top)
    with pytest.raises(PatchError, match="revert it first"):
        handle.revert()
    top.revert()
    handle.revert()
    assert all(torch.equal(ad.unit_weight(*u), w0) for u, w0 in before.items())

    bake(path, [file, on_top.save(tmp_path / "top.mmnpatch.safetensors")], tmp_path / "baked")
    baked = mmn_fast.load(tmp_path / "baked", processor=processor, device="cpu").adapter
    assert torch.equal(baked.unit_weight(*routed)[:, 0], loaded.expert_entries[routed].vectors[0])
    assert torch.equal(baked.unit_weight(*routed)[:, 7], torch.zeros(d))
    for u, w0 in before.items():
        if u not in vectors and u[0] not in vectors:
            assert torch.equal(baked.unit_weight(*u), w0), u


def make_patch_like(ad, patch, before):
    """A patch of the same neurons made on the unpatched weights (so not on top of `patch`)."""
    entry = next(iter(patch.expert_entries.values()))
    p = make_patch(ad, {entry.unit: (entry.indices, entry.vectors + 1)}, "again")
    live = ad.unit_weight(*entry.unit)
    p.expert_entries[entry.unit].orig_sha256 = hashes_by_dtype(gather_rows(before[entry.unit], entry.indices))
    assert not torch.equal(gather_rows(live, entry.indices), gather_rows(before[entry.unit], entry.indices))
    return p


def test_methods_take_expert_neurons_from_find(moe, images):
    name, path, processor, engine = moe
    ad = engine.adapter
    found = engine.find(images, concepts="all", top_k=20, max_new_tokens=5, batch_size=2)
    word = next(c.word for r in found for c in r.concepts if any(n[1] >= 0 for n in c.neurons))
    neurons = concept_neurons(engine, word, 4, results=found)
    assert all(len(n) == 3 for n in neurons)
    patch = suppress(engine, neurons, source=word)
    assert patch.n_neurons == 4
    with engine.patched(patch):
        for layer, expert, index in neurons:
            assert torch.count_nonzero(ad.unit_weight(layer, expert)[:, index]) == 0
    other = next(c.word for r in found for c in r.concepts if c.token_id != next(
        x.token_id for r2 in found for x in r2.concepts if x.word == word))
    moved = swap(engine, neurons, word, other)
    assert moved.n_neurons == 4 and moved.expert_entries
    rand = random_neurons(engine, 50, seed=1)
    assert len(set(rand)) == 50 and any(n[1] >= 0 for n in rand)
    assert rand == random_neurons(engine, 50, seed=1)
    with pytest.raises(MMNError, match="optimize.*dense layers' neurons only"):
        optimize(engine, [n for n in neurons if n[1] >= 0], word, "blue", images)


def test_expert_patches_are_refused_where_they_cannot_go(moe, tmp_path):
    name, path, processor, engine = moe
    ad = engine.adapter
    routed, *_ = _expert_units(ad)
    d = ad.unembed_weight().shape[1]
    patch = make_patch(ad, {routed: (torch.tensor([1]), torch.randn(1, d))}, "test")
    file = patch.save(tmp_path / "e.mmnpatch.safetensors")
    with pytest.raises(PatchError, match="per-request patches take dense"):
        engine.patches.load("e", file)
    with pytest.raises(MMNError, match="PEFT's LoRA cannot express this patch: it edits expert neurons"):
        export_peft(file, engine, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    rc = main(["patch", "export", "--patch", str(file), "--format", "peft", "--model", str(path),
               "--out", str(tmp_path / "lora2")])
    assert rc == 2 and not (tmp_path / "lora2").exists()


def test_expert_patches_fit_only_models_with_those_experts_and_dense_patches_stay_version_1(moe, tmp_path):
    name, path, processor, engine = moe
    ad = engine.adapter
    routed, *_ = _expert_units(ad)
    patch = make_patch(ad, {routed: (torch.tensor([1]), torch.randn(1, ad.unembed_weight().shape[1]))}, "t")
    assert patch.base["d_model"] == ad.unembed_weight().shape[1]
    dense_model, _ = llava_model()
    with pytest.raises(PatchError, match="which this model does not have"):
        apply_patch(dense_model, patch, force=True)
    _, _, dense = _expert_units(ad)
    if dense is not None:  # a patch of dense neurons only is written as version 1, which older readers take
        plain = make_patch(ad, {dense: (torch.tensor([1]), torch.randn(1, ad.unembed_weight().shape[1]))}, "t")
        file = plain.save(tmp_path / "dense.mmnpatch.safetensors")
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["format_version"] == "1" and set(f.keys()) == {f"{dense}.indices", f"{dense}.vectors"}
    if dense is not None:
        with pytest.raises(MMNError, match="given twice"):
            make_patch(ad, {dense: (torch.tensor([1]), torch.zeros(1, 64)), (dense, -1): (torch.tensor([2]),
                                                                                        torch.zeros(1, 64))}, "t")
    with pytest.raises(MMNError, match="mixture-of-experts block: name its neurons as"):
        make_patch(ad, {_expert_units(ad)[0][0]: (torch.tensor([1]), torch.randn(1, ad.unembed_weight().shape[1]))}, "t")


def test_mmn_edit_and_bake_on_an_moe_model(moe, images, tmp_path, capsys):
    """The CLI end to end: neurons picked by find on the edit images (expert neurons among them), a swap
    patch evaluated and written as version 2, baked into a checkpoint that loads with the edit in it."""
    name, path, processor, engine = moe
    if name in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"the saved {name} processor needs torchvision to reload (the CLI loads it from disk)")
    folder = tmp_path / "images"
    folder.mkdir()
    for k, im in enumerate(images * 2):
        im.save(folder / f"{k}.png")
    found = engine.find(images, concepts="all", top_k=20, max_new_tokens=8)
    words = list(dict.fromkeys(c.word for r in found for c in r.concepts))
    assert len(words) >= 2
    out = tmp_path / "e.mmnpatch.safetensors"
    rc = main(["edit", "--model", str(path), "--images", str(folder), "--source", words[0], "--target", words[1],
               "--method", "swap", "--neurons", "3", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    patch = load_patch(out)
    assert patch.n_neurons == 3
    rc = main(["patch", "bake", "--model", str(path), "--patch", str(out), "--out", str(tmp_path / "baked")])
    assert rc == 0, capsys.readouterr().err
    baked = mmn_fast.load(tmp_path / "baked", processor=processor, device="cpu").adapter
    for e in patch.units():
        assert torch.equal(baked.unit_weight(e.layer, e.expert)[:, e.indices].t(), e.vectors)


def test_per_request_patches_of_dense_layers_work_on_an_moe_model(moe, images):
    """A patch of an MoE model's dense layer served per request: each row as with the patch in place."""
    name, path, processor, engine = moe
    ad = engine.adapter
    _, _, dense = _expert_units(ad)
    if dense is None:
        pytest.skip("every layer of this model is a mixture of experts")
    g = torch.Generator().manual_seed(2)
    patch = make_patch(ad, {dense: (torch.arange(10), 5 * torch.randn(10, ad.unembed_weight().shape[1], generator=g))},
                       "test")
    engine.patches.load("dense", patch)
    try:
        mixed = engine.caption(images, patches=[None, "dense"], max_new_tokens=8)
    finally:
        engine.patches.unload("dense")
    base = engine.caption(images, max_new_tokens=8)
    with engine.patched(patch):
        in_place = engine.caption(images, max_new_tokens=8)
    assert in_place[1] != base[1], "the patch must change the caption for this test to mean anything"
    assert mixed == [base[0], in_place[1]]


def test_a_corpus_run_on_an_moe_model_then_an_edit_from_its_concepts(moe, images, tmp_path, capsys):
    """`mmn find --aggregate sparse` on an MoE model: results.jsonl holds [layer, expert, index, score] records
    equal to engine.find's, concepts.json names each neuron's expert, the aggregates reload; `mmn edit
    --results` edits the concept's top (expert) neurons. Dense aggregates are refused before anything is
    written."""
    name, path, processor, engine = moe
    if name in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"the saved {name} processor needs torchvision to reload (the CLI loads it from disk)")
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = random_images(4, size=32, seed=8)
    for k, im in enumerate(pictures):
        im.save(folder / f"im{k}.png")
    args = ["find", "--model", str(path), "--images", str(folder), "--concepts", "all", "--top-k", "12",
            "--max-new-tokens", "6", "--num-workers", "0", "--quiet"]
    rc = main(args + ["--out", str(tmp_path / "dense")])
    assert rc == 2 and "--aggregate sparse" in capsys.readouterr().err and not (tmp_path / "dense").exists()
    run = tmp_path / "run"
    assert main(args + ["--out", str(run), "--aggregate", "sparse"]) == 0, capsys.readouterr().err
    got = {r["id"]: r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())}
    want = engine.find([str(folder / f"im{k}.png") for k in range(4)], concepts="all", top_k=12, max_new_tokens=6)
    assert len(got) == 4
    for w in want:
        g = got[Path(w.image).stem]
        assert g["output_ids"] == w.output_ids
        for cg, cw in zip(g["concepts"], w.concepts, strict=True):
            assert [n[:3] for n in cg["neurons"]] == [n[:3] for n in cw.neurons]
    assert any(n[1] >= 0 for r in got.values() for c in r["concepts"] for n in c["neurons"])
    concepts = json.loads((run / "concepts.json").read_text())
    word = next(w for w, c in concepts.items() if any(n["expert"] >= 0 for n in c["neurons"][:3]))
    stats = open_results(run).stats
    assert {n[:2] for n in stats.sparse[word]} and all(len(key) == 3 for key in stats.sparse[word])
    target = next(w for w in concepts if w != word and word_token(engine.tokenizer, w) != word_token(engine.tokenizer, word))
    out = tmp_path / "e.mmnpatch.safetensors"
    rc = main(["edit", "--model", str(path), "--results", str(run), "--source", word, "--target", target,
               "--method", "swap", "--neurons", "3", "--max-new-tokens", "6", "--no-eval", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    picked = [(n["layer"], n["expert"], n["index"]) for n in concepts[word]["neurons"][:3]]
    assert sorted(load_patch(out).neurons) == sorted((l, i) if e == -1 else (l, e, i) for l, e, i in picked)


def test_the_neurons_endpoint_on_an_moe_model(moe, images):
    """`POST /v1/neurons` on an MoE model: each neuron with its expert, label and top tokens (of the expert's
    own output vector), equal to engine.find's records."""
    name, path, processor, engine = moe
    app = create_app(engine, ServeSettings(served_model_name="m"))
    buf = io.BytesIO()
    images[0].save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "m", "max_tokens": 6, "top_k": 4, "concepts": "all", "top_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": DEFAULT_PROMPT}]}]}
    with TestClient(app) as client:
        r = client.post("/v1/neurons", json=body)
    assert r.status_code == 200, r.text
    want = engine.find([images[0]], concepts="all", top_k=4, max_new_tokens=6)[0]
    got = r.json()["concepts"]
    assert [[(n["layer"], n["expert"], n["index"]) for n in c["neurons"]] for c in got] == \
        [[tuple(x[:3]) for x in c.neurons] for c in want.concepts]
    for c in got:
        for n in c["neurons"]:
            assert len(n["top_tokens"]) == 2
            assert n["neuron"] == (f"L{n['layer']}.{n['index']}" if n["expert"] < 0 else
                                   f"L{n['layer']}.E{n['expert']}.{n['index']}")


def test_top_tokens_of_an_expert_neuron(moe, capsys):
    """`mmn top-tokens --neuron L1.E2.5`: the tokens expert 2's neuron 5 promotes (its own output vector);
    the table of every neuron is refused by name on an MoE model."""
    name, path, processor, engine = moe
    if name in NEEDS_TORCHVISION and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"the saved {name} processor needs torchvision to reload (the CLI loads it from disk)")
    layer = next(l for l, b in enumerate(engine.adapter.experts) if b is not None)
    rc = main(["top-tokens", "--model", str(path), "--neuron", f"L{layer}.E2.5", "-k", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and f"L{layer}.E2.5 fires positive" in out
    logits = engine.adapter.unembed_weight().detach() @ engine.adapter.unit_weight(layer, 2)[:, 5].detach()
    best = engine.tokenizer.convert_ids_to_tokens([int(logits.argmax())])[0]
    assert repr(best) in out.split("fires negative")[0]
    rc = main(["top-tokens", "--model", str(path), "--quiet"])
    assert rc == 2 and "without --neuron" in capsys.readouterr().err


def test_bake_into_experts_stored_transposed(moe_checkpoint, tmp_path):
    """A checkpoint may store fused experts transposed from the live model (transformers transposes
    Qwen3-VL-MoE's down_proj [E, F, d] on load): bake finds the expert's vectors either way."""
    name, path, processor = moe_checkpoint
    if name != "qwen3_vl_moe":
        pytest.skip("the transposed layout is Qwen3-VL-MoE's")
    engine = mmn_fast.load(path, processor=processor, device="cpu")
    ad = engine.adapter
    flipped = tmp_path / "flipped"
    shutil.copytree(path, flipped)
    tensors = load_file(str(flipped / "model.safetensors"))
    keys = [k for k in tensors if k.endswith("experts.down_proj")]
    assert keys
    for k in keys:
        tensors[k] = tensors[k].transpose(1, 2).contiguous()  # [E, F, d] on disk
    save_file(tensors, str(flipped / "model.safetensors"), metadata={"format": "pt"})
    reloaded = mmn_fast.load(flipped, processor=processor, device="cpu").adapter
    if not torch.equal(reloaded.unit_weight(1, 2), ad.unit_weight(1, 2)):
        pytest.skip("this transformers does not transpose Qwen3-VL-MoE's experts on load")
    g = torch.Generator().manual_seed(5)
    patch = make_patch(ad, {(1, 2): (torch.tensor([4, 9]), torch.randn(2, 64, generator=g))}, "t")
    bake(flipped, patch.save(tmp_path / "p.mmnpatch.safetensors"), tmp_path / "baked")
    baked = mmn_fast.load(tmp_path / "baked", processor=processor, device="cpu").adapter
    assert torch.equal(baked.unit_weight(1, 2)[:, [4, 9]].t(), patch.expert_entries[(1, 2)].vectors)
    assert torch.equal(baked.unit_weight(1, 1), ad.unit_weight(1, 1))
    assert torch.equal(baked.unit_weight(1, 2)[:, 5], ad.unit_weight(1, 2)[:, 5])
