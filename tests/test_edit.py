"""Edit methods (tiny random LLaVA), neuron selection, and the demo model's red -> blue edit."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch

from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.edit.methods import (concept_neurons, make_edit, optimize, perturb, random_neurons, suppress, swap,
                           unembed_directions, word_token)
from mmn_fast.edit.evaluate import EditEval, report_table
from mmn_fast.errors import MMNError
from mmn_fast.model.patch_file import gather_rows, load_patch
from test_patch import model_sha  # tests/ is on sys.path

NEURONS = [(0, 3), (0, 10), (1, 4), (1, 50)]


def _originals(engine, patch):
    return {l: gather_rows(engine.adapter.out_weight(l), e.indices) for l, e in patch.entries.items()}


def test_suppress_and_perturb_change_only_the_selected_vectors(llava):
    p = suppress(llava, NEURONS, scale=0.25, source="red")
    assert p.neurons == sorted(NEURONS) and p.method == "suppress" and p.params["scale"] == 0.25
    for l, orig in _originals(llava, p).items():
        assert torch.equal(p.entries[l].vectors, orig * 0.25)
    a, b, c = (perturb(llava, NEURONS, sigma=0.3, seed=s) for s in (1, 1, 2))
    orig = _originals(llava, a)
    for l in a.entries:
        assert torch.equal(a.entries[l].vectors, b.entries[l].vectors)  # seeded
        assert not torch.equal(a.entries[l].vectors, c.entries[l].vectors)
    noise = torch.cat([a.entries[l].vectors - orig[l] for l in a.entries])
    assert 0.2 < float(noise.std()) < 0.4


def test_swap_is_the_documented_closed_form(llava64):
    eng, strength = llava64, 0.7
    p = swap(eng, NEURONS, "red", "blue", strength=strength)
    s, t = word_token(eng.tokenizer, "red"), word_token(eng.tokenizer, "blue")
    assert (p.params["source_token"], p.params["target_token"]) == (s, t) and s != t
    u = unembed_directions(eng, [s, t])  # [d, 2]
    for l, w in _originals(eng, p).items():
        new = p.entries[l].vectors
        c, c_new = w @ u, new @ u  # [n, 2]
        assert torch.allclose(c_new[:, 0], (1 - strength) * c[:, 0], atol=1e-9)
        assert torch.allclose(c_new[:, 1], c[:, 1] + strength * c[:, 0], atol=1e-9)
        delta = new - w  # lies in span{u_s, u_t}: the minimal change
        resid = delta - (delta @ u) @ torch.linalg.pinv(u.t() @ u) @ u.t()
        assert float(resid.abs().max()) < 1e-9


def test_optimize_learns_deltas_for_the_selected_vectors_only(llava, images):
    model_before = model_sha(llava.model)
    flags = [p.requires_grad for p in llava.model.parameters()]
    imgs = images[:4]
    captions = ["a red dog", "a red cat", "a dog", "the red car and the red bus"]
    p = optimize(llava, NEURONS, "red", "blue", imgs, captions=captions, steps=5, margin=100.0, max_new_tokens=6)
    assert model_sha(llava.model) == model_before  # the live model is untouched
    assert [q.requires_grad for q in llava.model.parameters()] == flags
    assert p.neurons == sorted(NEURONS) and p.params["steps"] == 5 and p.params["n_edit"] == 3
    for l, orig in _originals(llava, p).items():
        assert not torch.equal(p.entries[l].vectors, orig)
    blue = word_token(llava.tokenizer, "blue")

    def blue_logprob():  # teacher-forced "a blue dog": log p(blue) at its position
        inputs = llava.encode(imgs[:1], "Describe the image.", None)
        full, index = llava.teacher_forced(inputs, [llava._caption_ids("a blue dog")])
        with torch.no_grad():
            logits = llava.model(**full).logits[0, index[0, 1]]
        return float(torch.log_softmax(logits.float(), -1)[blue])

    before = blue_logprob()
    with llava.patched(p):
        after = blue_logprob()
    assert after > before


def test_selection_from_results_dir_with_exclusions(llava, tmp_path):
    concepts = {"red": {"images": 3, "neurons": [{"layer": l, "index": i, "count": 3, "mean_score": 1.0}
                                                 for l, i in [(1, 5), (0, 2), (1, 6), (0, 9), (1, 7)]]}}
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    assert concept_neurons(llava, "red", 3, results=tmp_path) == [(1, 5), (0, 2), (1, 6)]
    assert concept_neurons(llava, "Red", 2, results=tmp_path, exclude_layers=[1]) == [(0, 2), (0, 9)]
    with pytest.raises(MMNError, match="only 2 neurons"):
        concept_neurons(llava, "red", 3, results=tmp_path, exclude_layers=[1])
    with pytest.raises(MMNError, match="not in"):
        concept_neurons(llava, "zebra", 3, results=tmp_path)
    r = random_neurons(llava, 50, exclude_layers=[0], seed=3)
    assert len(set(r)) == 50 and all(l == 1 for l, _ in r) and r == random_neurons(llava, 50, [0], seed=3)
    with pytest.raises(MMNError, match="needs a target"):
        make_edit(llava, "swap", NEURONS, "red")
    with pytest.raises(MMNError, match="unknown edit method"):
        make_edit(llava, "ablate", NEURONS, "red", "blue")


def test_selection_refuses_a_run_of_another_model_shape(llava, tmp_path):
    concepts = {"red": {"images": 3, "neurons": [{"layer": 3, "index": 900, "count": 3, "mean_score": 1.0}]}}
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    (tmp_path / "run.json").write_text(json.dumps({"model": "other", "adapter": {"n_layers": 4, "d_mlp": 1024}}))
    with pytest.raises(MMNError, match="do not fit"):
        concept_neurons(llava, "red", 1, results=tmp_path)


def test_demo_red_to_blue(demo):
    """The issue's acceptance bar: optimize with 20 neurons reaches success and generality >= 90% and
    locality >= 95% on held-out images; its random-neuron control does not; the others reported."""
    edit = [img for img, _ in make_examples(48, seed=11)]
    heldout = [img for img, _ in make_examples(96, seed=12)]
    top = concept_neurons(demo, "red", 20, images=edit, max_new_tokens=12, batch_size=16)
    rand = random_neurons(demo, 20, seed=0)
    ev = EditEval(demo, "red", "blue", edit, heldout, max_new_tokens=12, batch_size=16)
    assert sum("red" in c.split() for c in ev.edit_base) >= 10
    rows, patches = [], {}
    for method, params in (("optimize", {}), ("swap", {}), ("suppress", {}), ("perturb", {"sigma": 2.0})):
        for name, neurons in (("top", top), ("random", rand)):
            patch = make_edit(demo, method, neurons, "red", "blue", edit, ev.edit_base, max_new_tokens=12, **params)
            patches[method, name] = patch
            rows.append({"method": method, "neurons": f"{name}-20", **ev.score(patch)})
    print("\n" + report_table(rows))
    res = {(r["method"], r["neurons"]): r for r in rows}
    opt = res["optimize", "top-20"]
    assert patches["optimize", "top"].n_neurons <= 20
    assert opt["n_generality"] >= 15 and opt["n_locality"] >= 50
    assert opt["success"] >= 0.9 and opt["generality"] >= 0.9 and opt["locality"] >= 0.95, opt
    assert res["optimize", "random-20"]["generality"] <= 0.2  # the control
    assert res["swap", "top-20"]["generality"] >= 0.8 and res["swap", "random-20"]["generality"] <= 0.2
    for method in ("suppress", "perturb"):  # causal effect: the top neurons carry the colour, random ones do not
        assert res[method, "top-20"]["generality"] >= res[method, "random-20"]["generality"] + 0.5


def test_cli_edit_from_images_and_from_results(demo_path, tmp_path, capsys):
    images = tmp_path / "images"
    save_examples(make_examples(48, seed=21), images)
    out = tmp_path / "r2b.mmnpatch.safetensors"
    rc = main(["edit", "--model", str(demo_path), "--images", str(images / "manifest.jsonl"), "--source", "red",
               "--target", "blue", "--method", "swap", "--neurons", "10", "--out", str(out), "--max-new-tokens", "12",
               "--exclude-layers", "0"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "swap" in stdout and "top-10" in stdout and "random-10" in stdout and "patch written to" in stdout
    patch = load_patch(out)
    assert patch.n_neurons == 10 and 0 not in patch.entries and patch.concepts == {"source": "red", "target": "blue"}
    assert [r["neurons"] for r in patch.params["evaluation"]] == ["top-10", "random-10"]
    results = tmp_path / "found"
    assert main(["find", "--model", str(demo_path), "--images", str(images / "manifest.jsonl"), "--out", str(results),
                 "--concepts", "red", "--top-k", "20", "--max-new-tokens", "12", "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["edit", "--model", str(demo_path), "--results", str(results), "--source", "red", "--target", "blue",
               "--method", "optimize", "--neurons", "20", "--out", str(out), "--max-new-tokens", "12", "--no-eval",
               "--overwrite"])
    assert rc == 0 and load_patch(out).method == "optimize"
    assert main(["edit", "--model", str(demo_path), "--results", str(results), "--source", "red", "--method", "swap",
                 "--out", str(out)]) == 2
    assert "needs --target" in capsys.readouterr().err


def test_cli_edit_reads_its_images_like_find(demo_path, tmp_path):
    """`mmn edit` reads --images and --eval-images through the corpus reader of `mmn find`: a WebDataset
    tar shard and a CSV manifest give the evaluation that JSONL manifests of the same images give."""
    images = tmp_path / "images"
    manifest = save_examples(make_examples(24, seed=21), images)
    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    edit, held = recs[:12], recs[12:]
    with tarfile.open(tmp_path / "edit.tar", "w") as tf:
        for r in edit:
            tf.add(images / r["image"], arcname=f"{r['id']}.png")
    (tmp_path / "held.csv").write_text("image,id\n" + "".join(f"images/{r['image']},{r['id']}\n" for r in held))
    for name, part in (("edit", edit), ("held", held)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(dict(r, image=f"images/{r['image']}")) + "\n" for r in part))

    def evaluation(from_, eval_images):
        out = tmp_path / "p.mmnpatch.safetensors"
        assert main(["edit", "--model", str(demo_path), "--images", str(tmp_path / from_), "--eval-images",
                     str(tmp_path / eval_images), "--source", "red", "--target", "blue", "--method", "swap",
                     "--neurons", "6", "--out", str(out), "--max-new-tokens", "12", "--overwrite"]) == 0
        return load_patch(out).params["evaluation"]

    want = evaluation("edit.jsonl", "held.jsonl")
    assert want[0]["n_success"] > 0 and want[0]["n_generality"] + want[0]["n_locality"] == len(held)
    assert evaluation("edit.tar", "held.csv") == want


@pytest.mark.parametrize("method", ["optimize", "swap"])
@pytest.mark.parametrize("role", ["--source", "--target"])
def test_cli_edit_refuses_a_word_the_tokenizer_cannot_spell(demo_path, tmp_path, capsys, method, role):
    """'zebra' is <unk> to the demo tokenizer: the edit is refused like find refuses it, and no patch
    is written (before, a useless patch was written and the command exited 0)."""
    images = tmp_path / "images"
    save_examples(make_examples(4, seed=3), images)
    words = {"--source": "red", "--target": "blue", role: "zebra"}
    out = tmp_path / "p.mmnpatch.safetensors"
    rc = main(["edit", "--model", str(demo_path), "--images", str(images / "manifest.jsonl"), "--method", method,
               "--neurons", "5", "--out", str(out), *[x for kv in words.items() for x in kv]])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown concept word 'zebra'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_cli_edit_never_replaces_a_patch_silently(demo_path, tmp_path, capsys):
    images = tmp_path / "images"
    save_examples(make_examples(4, seed=3), images)
    out = tmp_path / "p.mmnpatch.safetensors"
    out.write_bytes(b"someone's earlier patch")
    argv = ["edit", "--model", str(demo_path), "--images", str(images / "manifest.jsonl"), "--source", "red",
            "--method", "suppress", "--neurons", "3", "--no-eval", "--out", str(out)]
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"someone's earlier patch"
    assert main([*argv, "--overwrite"]) == 0 and load_patch(out).n_neurons == 3


def test_cli_old_spellings_still_work_with_a_note(demo_path, tmp_path, capsys):
    """`--from` (edit) and a positional patch file (patch inspect) still work, each with one deprecation note."""
    images = tmp_path / "images"
    save_examples(make_examples(4, seed=3), images)
    out = tmp_path / "p.mmnpatch.safetensors"
    assert main(["edit", "--model", str(demo_path), "--from", str(images / "manifest.jsonl"), "--source", "red",
                 "--method", "suppress", "--neurons", "3", "--no-eval", "--out", str(out)]) == 0
    assert "mmn: note: --from is deprecated" in capsys.readouterr().err
    assert main(["patch", "inspect", str(out)]) == 0
    assert "mmn: note: a positional patch file is deprecated" in capsys.readouterr().err


def test_cli_edit_from_an_unfinished_run_says_so(demo_path, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "parts").mkdir(parents=True)
    assert main(["edit", "--model", str(demo_path), "--results", str(run), "--source", "red", "--method", "suppress",
                 "--neurons", "3", "--no-eval", "--out", str(tmp_path / "p.mmnpatch.safetensors")]) == 2
    assert "not finished" in capsys.readouterr().err
