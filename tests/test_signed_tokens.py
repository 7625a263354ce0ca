"""The tokens a neuron promotes follow the sign of its activation: the top of W_U W_out[:, i] when it
fires positive, the bottom when it fires negative. Shown for a concept (demo, report, semantic metric)
the sign is its activation's there; shown alone (`mmn top-tokens`) both ends, labelled."""
from __future__ import annotations

import html
import json
import re

import pytest
import torch
from safetensors import safe_open

import mmn_fast
from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.explain.metrics import compute_metrics
from mmn_fast.explain.report import build_report
from mmn_fast.find.heatmap import trace
from mmn_fast.find.scoring import Scorer
from mmn_fast.find.vocab import (activation_signs, both_ends, concept_tokens, promoted_ids, promoted_tokens,
                                 vocab_table)
from mmn_fast.kernels import interpreter_on
from mmn_fast.model.inputs import load_image
from mmn_fast.run.runner import run_find


def _logits(engine, layer, index):
    return engine.adapter.unembed_weight().double() @ engine.adapter.out_weight(layer)[:, index].double()  # [V]


# ------------------------------------------------------------------------------------ library
def test_both_ends_are_the_top_and_bottom_of_the_projection(llava):
    ends = both_ends(llava, 1, 5, k=6)
    logits = _logits(llava, 1, 5)
    assert [tid for _, tid, _ in ends["positive"]] == logits.topk(6).indices.tolist()
    assert [tid for _, tid, _ in ends["negative"]] == logits.topk(6, largest=False).indices.tolist()
    assert all(v < 0 for _, _, v in ends["negative"][:1])
    assert [t for t, _, _ in ends["negative"]] == llava.tokenizer.convert_ids_to_tokens(
        [tid for _, tid, _ in ends["negative"]])


def test_promoted_tokens_follow_the_sign(llava):
    neurons, signs = [(0, 1), (1, 5), (1, 5), (1, 7)], [1, -1, 1, -1]
    got = promoted_ids(llava, neurons, signs, 4)
    for (l, i), s, ids in zip(neurons, signs, got):
        assert ids == _logits(llava, l, i).topk(4, largest=s > 0).indices.tolist()
    assert promoted_tokens(llava, neurons, signs, 4)[1] == llava.tokenizer.convert_ids_to_tokens(got[1])


@pytest.mark.parametrize("fold", [False, True])
def test_activation_signs_are_the_scores_factors(llava, fold):
    """sign(a) = sign(score) x sign(P(t)), with P(t) the projection the run scored with (final norm folded or not)."""
    t, neurons = 7, [(l, i) for l in range(llava.adapter.n_layers) for i in range(0, llava.adapter.d_mlp, 5)]
    proj = Scorer(llava.adapter, fold_norm=fold).projection([t])[0]  # [L, F]
    for score_sign in (1.0, -1.0):
        scores = [score_sign * (0.5 + j) for j in range(len(neurons))]
        want = [int(torch.sign(proj[l, i]).item() * score_sign) or 1 for l, i in neurons]
        assert activation_signs(llava, t, neurons, scores, fold_final_norm=fold) == want
    assert len(set(want)) == 2  # both signs occur: the check means something
    assert activation_signs(llava, t, neurons[:2], [0.0, 0.0]) == [1, 1]


def test_vocab_table_caches_both_ends(llava, tmp_path):
    top_only = vocab_table(llava, k=3, cache_dir=tmp_path)
    table = vocab_table(llava, k=3, cache_dir=tmp_path, both=True)  # the top-only file lacks the bottom: computed
    for layer in range(llava.adapter.n_layers):
        full = llava.adapter.out_weight(layer).double().t() @ llava.adapter.unembed_weight().double().t()  # [F, V]
        assert torch.equal(table.bottom_ids[layer], full.topk(3, dim=1, largest=False).indices)
    assert torch.equal(table.top_ids, top_only[1])
    again = vocab_table(llava, k=3, cache_dir=tmp_path)  # the file with both ends still serves top-only callers
    assert isinstance(again, tuple) and len(again) == 2 and torch.equal(again[1], top_only[1])


def test_top_tokens_command_labels_both_ends_and_caches_them(llava_path, llava, tmp_path, capsys):
    assert main(["top-tokens", "--model", str(llava_path), "--neuron", "L1.5", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("promoted when L1.5 fires positive")
    assert lines[4].startswith("promoted when L1.5 fires negative")
    want = _logits(llava, 1, 5).topk(3, largest=False).indices.tolist()
    assert [int(x.split()[-2]) for x in lines[5:]] == want
    assert main(["top-tokens", "--model", str(llava_path), "--cache-dir", str(tmp_path), "--quiet"]) == 0
    assert "bottom-10" in capsys.readouterr().out
    (path,) = tmp_path.glob("vocab-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert {"values", "token_ids", "bottom_values", "bottom_token_ids"} <= set(f.keys())


def test_both_ends_on_the_triton_backend_match_torch(llava_path, llava):
    if not interpreter_on():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    fast = mmn_fast.load(llava_path, device="cpu", backend="triton")
    ids = [[t[1] for t in both_ends(e, 1, 3, k=5)["negative"]] for e in (fast, llava)]
    assert ids[0] == ids[1]
    got, want = vocab_table(fast, k=4, both=True), vocab_table(llava, k=4, both=True)
    assert torch.equal(got.bottom_ids, want.bottom_ids) and torch.equal(got.top_ids, want.top_ids)


# ------------------------------------------------------------------------------------ on the demo
@pytest.fixture(scope="module")
def signed_run(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("signed_run")
    manifest = save_examples(make_examples(60, seed=1357), root / "images")
    run_find(demo, manifest, root / "run", progress=False, concepts="all", top_k=10, max_new_tokens=12,
             batch_size=30, num_workers=0, overwrite=True)
    return root / "run"


def test_the_sign_rule_gives_the_activations_sign(demo, signed_run):
    """The sign read off the score's factors is the sign of the neuron's actual activation at the step
    that predicts the concept (a teacher-forced trace of the same captions), and negative ones occur."""
    recs = [json.loads(line) for line in (signed_run / "results.jsonl").read_text().splitlines()[:12]]
    seen = []
    for rec in recs:
        for c in rec["concepts"]:
            neurons = [tuple(x[:2]) for x in c["neurons"][:5]]
            t = trace(demo, [load_image(rec["image"])], neurons, [rec["output_ids"]])
            acts = t.acts[0, t.index[0, c["step"]]]  # [N] at the position predicting the concept token
            signs = activation_signs(demo, c["token_id"], neurons, [x[2] for x in c["neurons"][:5]])
            assert signs == [1 if a >= 0 else -1 for a in acts.tolist()], (rec["id"], c["word"])
            seen += signs
    assert seen.count(-1) >= 10 and seen.count(1) >= 10


def test_demo_shows_what_each_top_neuron_promotes_given_its_sign(demo_path, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--cache-dir", str(demo_path.parent), "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\w+) +(L\d.*)$", out, re.M)
    assert len(rows) == 9, out
    named, signs = 0, []
    for word, rest in rows:
        shown = re.findall(r"L\d+\.\d+ ([+-]) \[([^\]]*)\]", rest)
        assert len(shown) == 3, rest
        named += word in shown[0][1].split()  # the concept's first neuron promotes the concept
        signs += [s for s, _ in shown]
    assert named >= 7, out  # sign-blind top tokens: 3 to 5 of 9
    assert "-" in signs and "+" in signs


def test_report_shows_tokens_by_activation_sign(demo, signed_run):
    text = build_report(signed_run, engine=demo, neurons=3, examples=0)
    summary = json.loads((signed_run / "concepts.json").read_text())
    tokens = concept_tokens(json.loads(line) for line in (signed_run / "results.jsonl").read_text().splitlines())
    named, minus = 0, 0
    for word, info in summary.items():
        x = info["neurons"][0]
        (sign,) = activation_signs(demo, tokens[word], [(x["layer"], x["index"])], [x["mean_score"]])
        (toks,) = promoted_tokens(demo, [(x["layer"], x["index"])], [sign], 8)
        cell = ("+" if sign > 0 else "&minus;") + "</td><td>"
        cell += "".join(f'<span class="tok">{html.escape(t)}</span>' for t in toks)
        assert cell in text, word
        named += word in toks[:3]
        minus += sign < 0
    print(f"\n{named} of {len(summary)} concepts named by their first neuron's promoted tokens, {minus} negative")
    assert named >= 0.7 * len(summary) and minus >= 1, (named, minus, len(summary))


def test_semantic_metric_uses_the_promoted_end(demo, signed_run, tmp_path):
    m = compute_metrics(demo, signed_run, n=5, k=1, metrics=("semantic",))
    for word, v in m["concepts"].items():
        sem = v["semantic"]
        assert sem["random_signs"] == "run"
        assert set(sem["signs"]) == set(sem["promoted_tokens"]) == set(sem["top_tokens"])
        for key, sign in sem["signs"].items():
            l, i = map(int, key.split("."))
            (want,) = promoted_tokens(demo, [(l, i)], [sign], 1)
            assert sem["promoted_tokens"][key] == want
            assert sem["top_tokens"][key] == promoted_tokens(demo, [(l, i)], [1], 1)[0]  # kept: the top end
    s = m["summary"]
    hit = s["semantic_hit_rate"]
    print(f"\nsemantic hit rate {hit['top']:.3f} vs {hit['random']:.3f}")
    assert hit["top"] >= 0.4 and hit["top"] >= 3 * hit["random"]
    # a sparse run keeps no statistics of random neurons: their two ends weigh half each
    sparse = tmp_path / "sparse"
    manifest = signed_run.parent / "images" / "manifest.jsonl"
    run_find(demo, manifest, sparse, progress=False, concepts="all", top_k=10, max_new_tokens=12, batch_size=30,
             num_workers=0, overwrite=True, aggregate="sparse")
    ms = compute_metrics(demo, sparse, n=5, k=1, metrics=("semantic",))
    assert {v["semantic"]["random_signs"] for v in ms["concepts"].values()} == {"both ends"}
    assert ms["summary"]["semantic_hit_rate"]["top"] == pytest.approx(s["semantic_hit_rate"]["top"])
