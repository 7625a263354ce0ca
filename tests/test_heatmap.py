"""Heatmaps and masks: image maths, patch grids, the demo generator's object masks, and on the demo
model that the maps land on the objects (a planted neuron; the found neurons by occlusion)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mmn_fast
from mmn_fast.cli.main import main
from mmn_fast.demo import COLOURS, make_examples
from mmn_fast.demo.data import make_examples_with_masks
from mmn_fast.errors import MMNError
from mmn_fast.find.heatmap import (DEFAULT_CMAP, Trace, bilinear, binary_mask, colourise, maps, normalise, patch_grid, render,
                                      read_heatmaps, trace, unique_name, view_box, write_heatmaps)
from mmn_fast.find.scoring import Scorer


def _iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _random_mask_iou(mask, obj, rng) -> float:
    flat = np.zeros(mask.size, bool)
    flat[rng.choice(mask.size, int(mask.sum()), replace=False)] = True
    return _iou(flat.reshape(mask.shape), obj)


def _singles(colour: str, n: int, seed: int):
    """(image, caption, object mask) of single-object images of `colour`."""
    out, s = [], seed
    while len(out) < n:
        for img, cap, masks in make_examples_with_masks(64, seed=s):
            words = cap.split()
            if len(words) == 3 and words[1] == colour:
                out.append((img, cap, masks[0]))
        s += 1
    return out[:n]


# ------------------------------------------------------------------------------------ image maths
@pytest.mark.parametrize("shape,out", [((4, 4), (32, 32)), ((3, 5), (17, 40)), ((24, 24), (336, 336)), ((2, 7), (2, 7))])
def test_bilinear_matches_torch(shape, out):
    g = np.random.default_rng(0).normal(size=shape)
    ref = torch.nn.functional.interpolate(torch.tensor(g)[None, None], size=out, mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(bilinear(g, *out), ref, atol=1e-10)


def test_normalise_colourise_and_mask():
    x = np.linspace(-3, 5, 1000).reshape(20, 50)
    n = normalise(x)
    assert n.min() == 0 and n.max() == 1
    assert normalise(np.full((3, 3), 2.0)).max() == 0
    rgb = colourise(n, "jet")
    assert rgb.shape == (20, 50, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (0, 0, 128) and tuple(rgb[-1, -1]) == (128, 0, 0)
    assert tuple(colourise(np.array([[1.0]]), "viridis")[0, 0]) == (253, 231, 37)
    m = binary_mask(x, 95)
    assert abs(m.mean() - 0.05) < 0.002 and m[-1, -1] and not m[0, 0]
    with pytest.raises(MMNError):
        colourise(n, "nope")
    with pytest.raises(MMNError):
        binary_mask(x, 120)


def test_view_box_is_the_centre_crop():
    ip = SimpleNamespace(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True)
    assert view_box(ip, 640, 480) == (80, 0, 560, 480)
    assert view_box(SimpleNamespace(size={"height": 224, "width": 224}), 640, 480) == (0, 0, 640, 480)


# ------------------------------------------------------------------------------------ patch grids
def _fake(cls_name: str, **cfg):
    model = type(cls_name, (), {})()
    model.config = SimpleNamespace(**cfg)
    return SimpleNamespace(model=model)


def test_patch_grid_from_configs(demo):
    assert patch_grid(demo, 16) == (4, 4, 0)
    llava15 = _fake("LlavaForConditionalGeneration", vision_config=SimpleNamespace(image_size=336, patch_size=14),
                    vision_feature_select_strategy="default")
    assert patch_grid(llava15, 576) == (24, 24, 0)
    full = _fake("LlavaForConditionalGeneration", vision_config=SimpleNamespace(image_size=336, patch_size=14),
                 vision_feature_select_strategy="full")
    assert patch_grid(full, 577) == (24, 24, 1)
    with pytest.raises(MMNError, match="not the 24x24 patch grid"):
        patch_grid(llava15, 577)
    qwen = _fake("Qwen2VLForConditionalGeneration", vision_config=SimpleNamespace(spatial_merge_size=2))
    thw = {"image_grid_thw": torch.tensor([[1, 28, 40], [1, 20, 20]])}
    assert patch_grid(qwen, 280, thw, 0) == (14, 20, 0)
    assert patch_grid(qwen, 100, thw, 1) == (10, 10, 0)
    with pytest.raises(MMNError, match="image_grid_thw"):
        patch_grid(qwen, 99, thw, 1)
    nogrid = _fake("SomeVLM", vision_config=SimpleNamespace())
    with pytest.raises(MMNError, match="no image_size"):
        patch_grid(nogrid, 64)


def test_instructblip_has_no_patch_grid(instructblip_path):
    eng = mmn_fast.load(instructblip_path, device="cpu")
    img = make_examples(1, seed=3)[0][0]
    with pytest.raises(MMNError, match="Q-Former"):
        maps(eng, [img], [(0, [(0, 0)], None, None, None)])
    assert main(["heatmap", "--model", str(instructblip_path), "--image", _png(img, instructblip_path / "x.png"),
                 "--concept", "red", "--neuron", "0.0", "--out", str(instructblip_path / "hm")]) == 2


def _png(img, path: Path) -> str:
    img.save(path)
    return str(path)


def test_grid_orientation_is_row_major(demo):
    img = make_examples(1, seed=5)[0][0]
    hm = render(demo, img, np.arange(16.0))  # token k sits at row k // 4, column k % 4
    assert hm.grid[0, 3] == 3 and hm.grid[3, 0] == 12
    assert hm.mask[-4:, -4:].all() and not hm.mask[:16].any()  # the top 5% is in the bottom-right corner


# ------------------------------------------------------------------------------------ demo data
@pytest.mark.parametrize("seed", [0, 17])
def test_examples_with_masks_are_make_examples(seed):
    plain = make_examples(150, seed=seed)
    masked = make_examples_with_masks(150, seed=seed)
    for (im, cap), (im2, cap2, masks) in zip(plain, masked):
        assert cap == cap2 and im.tobytes() == im2.tobytes()
        objects = cap.split(" and ")
        assert len(masks) == len(objects)
        pixels = np.asarray(im, dtype=float)
        for obj, m in zip(objects, masks):
            colour = obj.split()[1]
            assert m.dtype == bool and m.shape == (32, 32) and m.sum() >= 40
            assert np.abs(pixels[m].mean(0) - COLOURS[colour]).max() < 25  # the pixels really are that object's


# ------------------------------------------------------------------------------------ trace
def test_trace_matches_find_scores_and_probabilities(demo):
    imgs = [im for im, _ in make_examples(6, seed=21)]
    res = demo.find(imgs, concepts="all", top_k=3, max_new_tokens=12)
    neurons = [tuple(c.neurons[0][:2]) for r in res for c in r.concepts[:1]]
    t = trace(demo, imgs, neurons, [r.output_ids for r in res], probs=True)
    assert isinstance(t, Trace) and t.acts.shape[2] == len(neurons) and int(t.image_mask[0].sum()) == 16
    scorer = Scorer(demo.adapter)
    for b, r in enumerate(res):
        c = r.concepts[0]
        l, i, score = c.neurons[0]
        a = t.acts[b, t.index[b, c.step], b]
        assert float(a * scorer.projection([c.token_id])[0, l, i]) == pytest.approx(score, rel=1e-4, abs=1e-5)
        # greedy captions: each caption token is the argmax, so its probability is the largest
        inputs = demo.encode([imgs[b]], mmn_fast.DEFAULT_PROMPT, None)
        full, index = demo.teacher_forced(inputs, [r.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(demo.model(**full).logits[0, index[0]].float(), -1)
        want = logp.gather(-1, torch.tensor(r.output_ids)[:, None])[:, 0].exp()
        np.testing.assert_allclose(t.token_probs[b, : len(r.output_ids)].numpy(), want.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------ the science
def _mlp_inputs(eng, layer, images):
    """Input of `layer`'s MLP at the 16 image tokens: [n, 16, d]."""
    rows = []
    h = eng.adapter.mlps[layer].register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    try:
        inputs = eng.encode(images, mmn_fast.DEFAULT_PROMPT, None)
        with torch.no_grad():
            eng.model(**inputs)
    finally:
        h.remove()
    mask = inputs["input_ids"] == eng.adapter.image_token_id
    return torch.stack([rows[0][b][mask[b]] for b in range(len(images))])


def test_planted_neuron_heatmap_and_mask_cover_the_object(demo_path):
    """A neuron planted to fire on red patches: its activation heatmap's mask must sit on the red object."""
    eng = mmn_fast.load(demo_path, device="cpu")  # private copy: its weights are edited
    layer, idx = 0, 5
    train = _singles("red", 16, seed=300)
    x = _mlp_inputs(eng, layer, [im for im, _, _ in train])  # [n, 16, d]
    cover = torch.tensor(np.stack([m.reshape(4, 8, 4, 8).mean((1, 3)).reshape(16) for _, _, m in train]))
    red, other = x[cover > 0.5], x[cover < 0.05]
    v = red.mean(0) - other.mean(0)
    v = v / v.norm()
    mlp = eng.adapter.mlps[layer]
    with torch.no_grad():
        mlp.gate_proj.weight[idx] = 4.0 * v / float((red @ v).mean())
        mlp.up_proj.weight[idx] = v
    test = _singles("red", 12, seed=400)
    hms = maps(eng, [im for im, _, _ in test], [(b, [(layer, idx)], None, None, None) for b in range(len(test))],
               orient=False)
    rng = np.random.default_rng(0)
    iou = np.mean([_iou(hm.mask, m) for hm, (_, _, m) in zip(hms, test)])
    chance = np.mean([_random_mask_iou(hm.mask, m, rng) for hm, (_, _, m) in zip(hms, test)])
    precision = np.mean([(hm.mask & m).sum() / hm.mask.sum() for hm, (_, _, m) in zip(hms, test)])
    print(f"planted neuron: mask IoU {iou:.3f} vs random mask {chance:.3f}; {100 * precision:.0f}% of mask on the object")
    assert precision > 0.9 and iou > 3 * chance


@pytest.mark.parametrize("colour", ["red", "blue", "green"])
def test_concept_top_neurons_mask_overlaps_the_object(demo, colour):
    """The activation maps (the paper's heatmaps) and the occlusion maps of a colour's top-10 neurons
    (each image's own ranking) land on the object: IoU with the object's true pixels far above a
    random mask of the same area; the occlusion maps also above those of 10 random neurons."""
    data = _singles(colour, 12, seed=600)
    imgs = [im for im, _, _ in data]
    res = demo.find(imgs, concepts=[colour], top_k=10, max_new_tokens=12)
    items = [(b, [tuple(x[:2]) for x in r.concepts[0].neurons], r.concepts[0].token_id, r.output_ids, r.concepts[0].step)
             for b, r in enumerate(res)]
    rnd = random.Random(0)
    everyone = [(l, i) for l in range(demo.adapter.n_layers) for i in range(demo.adapter.d_mlp)]
    controls = [(b, rnd.sample(everyone, 10), tok, cap, step) for b, _, tok, cap, step in items]
    rng = np.random.default_rng(1)
    figures = {}
    for name, its, method in (("top", items, "occlusion"), ("random neurons", controls, "occlusion"),
                              ("top, activation", items, "activation")):
        hms = maps(demo, imgs, its, method)
        figures[name] = np.mean([_iou(hm.mask, m) for hm, (_, _, m) in zip(hms, data)])
        if name == "top":
            figures["random mask"] = np.mean([_random_mask_iou(hm.mask, m, rng) for hm, (_, _, m) in zip(hms, data)])
    print(colour, {k: round(float(v), 3) for k, v in figures.items()})
    assert figures["top"] > 3 * figures["random mask"]
    assert figures["top"] > figures["random neurons"] + 0.03
    assert figures["top, activation"] > 3 * figures["random mask"]


# ------------------------------------------------------------------------------------ files and CLI
def test_write_heatmaps_for_a_find_batch(demo, tmp_path):
    imgs = [im for im, _ in make_examples(5, seed=8)]
    res = demo.find(imgs, concepts="all", top_k=10, max_new_tokens=12)
    written = write_heatmaps(demo, imgs, res, tmp_path, n=5)
    assert len(written) == sum(len({c.word for c in r.concepts}) for r in res)
    from PIL import Image

    for rec in written:
        d = tmp_path / rec["id"]
        info = next(x for x in json.loads((d / "heatmaps.json").read_text()) if x["concept"] == rec["concept"])
        assert info["neurons"] == rec["neurons"] and len(info["neurons"]) == 5
        assert 0.03 < info["mask_fraction"] < 0.08 and np.array(info["grid"]).shape == (4, 4)
        with Image.open(d / info["heatmap"]) as im:
            assert im.size == (32 + 2 + 6, 32) and im.mode == "RGB"  # the view, a gap and the colour key
        with Image.open(d / info["mask"]) as im:
            assert im.size == (32, 32) and set(np.unique(np.asarray(im))) <= {0, 255}
    assert len(read_heatmaps(tmp_path)) == len(written)
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(MMNError):
        write_heatmaps(demo, imgs[:2], res, tmp_path)


def test_cli_heatmap(demo_path, tmp_path, capsys):
    img, cap = make_examples(1, seed=11)[0]
    path = _png(img, tmp_path / "shape.png")
    colour = cap.split()[1]
    out = tmp_path / "out"
    assert main(["heatmap", "--model", str(demo_path), "--image", path, "--concept", colour, "--neurons", "5",
                 "--out", str(out)]) == 0
    info = json.loads((out / f"shape.{colour}.json").read_text())
    assert len(info["neurons"]) == 5 and info["caption"] == cap
    assert (out / f"shape.{colour}.heatmap.png").is_file() and (out / f"shape.{colour}.mask.png").is_file()
    from PIL import Image

    with Image.open(out / f"shape.{colour}.heatmap.png") as im:
        # the 32-px demo view enlarged to 224 px for viewing, then a 3-px gap and a 14-px colour key
        assert im.size == (224 + 3 + 14, 224)
        key = np.asarray(im.convert("RGB"))[:, -7]  # [H, 3] down the middle of the key
    assert (key[0] == colourise(np.ones((1, 1)), DEFAULT_CMAP)[0, 0]).all()  # top: the map's highest value
    assert (key[-1] == colourise(np.zeros((1, 1)), DEFAULT_CMAP)[0, 0]).all()  # bottom: its lowest
    assert main(["heatmap", "--model", str(demo_path), "--image", path, "--concept", colour, "--neuron", "1.7",
                 "--method", "occlusion", "--cmap", "viridis", "--out", str(out / "one")]) == 0
    assert json.loads((out / "one" / f"shape.{colour}.json").read_text())["neurons"] == [[1, 7]]
    other = next(c for c in COLOURS if c not in cap.split())
    capsys.readouterr()
    assert main(["heatmap", "--model", str(demo_path), "--image", path, "--concept", other, "--out", str(out)]) == 2
    assert "does not name" in capsys.readouterr().err
    assert main(["heatmap", "--model", str(demo_path), "--image", path, "--concept", colour, "--neuron", "99.0",
                 "--out", str(out)]) == 2
    assert main(["heatmap", "--model", str(demo_path), "--image", path, "--concept", colour, "--neuron", "x",
                 "--out", str(out)]) == 2


def test_random_llava_maps_and_act_fn_trace(llava, images):
    """The same path on a random-weight LLaVA checkpoint (the tiny factory model): maps, masks, act_fn."""
    items = [(b, [(0, 1), (1, 2)], None, None, None) for b in range(3)]
    hms = maps(llava, images[:3], items)
    assert all(hm.grid.shape == (4, 4) and hm.heat.shape == (32, 32) and hm.mask.any() for hm in hms)
    t = trace(llava, images[:2], [(1, 3), (0, 0)], activation="act_fn")
    h = trace(llava, images[:2], [(1, 3), (0, 0)])
    assert t.acts.shape == h.acts.shape and not torch.equal(t.acts, h.acts)


def test_unique_name_keeps_safe_names_and_separates_the_rest():
    for plain in ("shape_0001", "a_b", "img-3.v2", "x" * 80):
        assert unique_name(plain) == plain  # existing layouts stay as they were
    ids = ["a b", "a_b", "a/b", "a\\b", "\u732b", "\u72ac", ".", "..", "../etc", "x" * 81, "x" * 82, ""]
    names = [unique_name(i) for i in ids]
    assert len(set(names)) == len(ids), names
    assert names == [unique_name(i) for i in ids]  # stable
    for n in names:
        assert n and len(n) <= 80 and "/" not in n and "\\" not in n and n not in (".", "..")
    assert unique_name("a b").startswith("a_b-")


def test_cli_heatmap_refuses_a_run_of_other_shapes(llava_path, demo, tmp_path, capsys):
    """--results of a demo-model run with another checkpoint: one error line, not an IndexError."""
    from mmn_fast.demo import save_examples
    from mmn_fast.run.runner import run_find

    manifest = save_examples(make_examples(6, seed=3), tmp_path / "images")
    run_find(demo, manifest, tmp_path / "run", progress=False, concepts="all", top_k=5, max_new_tokens=12,
             num_workers=0, overwrite=True)
    colour = next(w for w in COLOURS if (tmp_path / "run" / "concepts.json").read_text().count(f'"{w}"'))
    capsys.readouterr()
    assert main(["heatmap", "--model", str(llava_path), "--image", str(tmp_path / "images" / "shape_0000.png"),
                 "--concept", colour, "--results", str(tmp_path / "run"), "--out", str(tmp_path / "hm")]) == 2
    err = capsys.readouterr().err
    assert "mmn: error:" in err and "2 x 96" in err and "Traceback" not in err and not (tmp_path / "hm").exists()


def test_write_heatmaps_ids_with_one_safe_name_keep_their_own_folders(demo, tmp_path):
    imgs = [im for im, _ in make_examples(4, seed=8)]
    ids = ["a b", "a_b", "\u732b", "\u72ac"]  # "a b" and "a_b", and two non-ASCII ids, sanitise alike
    res = demo.find(imgs, concepts="all", top_k=10, max_new_tokens=12, ids=ids)
    written = write_heatmaps(demo, imgs, res, tmp_path, n=5)
    assert len(written) == sum(len({c.word for c in r.concepts}) for r in res)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(unique_name(i) for i in ids)
    assert (tmp_path / "a_b").is_dir()  # a plain id keeps its folder name
    for r in res:
        d = tmp_path / unique_name(r.id)
        recs = json.loads((d / "heatmaps.json").read_text())
        assert {x["id"] for x in recs} == {r.id}
        assert sorted(x["concept"] for x in recs) == sorted({c.word.lower() for c in r.concepts})
        assert all((d / x["heatmap"]).is_file() and (d / x["mask"]).is_file() for x in recs)
    back = read_heatmaps(tmp_path)
    assert sorted((x["id"], x["concept"]) for x in back) == sorted((x["id"], x["concept"]) for x in written)
    assert all(Path(x["_dir"]).name == unique_name(x["id"]) for x in back)
