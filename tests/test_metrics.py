"""Property metrics: the measures themselves, the shuffle experiment's hook, and on the demo model the
paper's qualitative findings (top neurons far above random neurons) through `mmn metrics`."""
from __future__ import annotations

import contextlib
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.errors import MMNError
from mmn_fast.find.heatmap import language_model
from mmn_fast.edit.methods import suppress
from mmn_fast.explain import metrics as metrics_mod
from mmn_fast.explain.metrics import (MetricOptions, RunModelWarning, auroc, compute_metrics, jaccard, rbo,
                                      shuffled_image_tokens, summary_table)
from mmn_fast.run.runner import run_find


# ------------------------------------------------------------------------------------ measures
def test_jaccard_and_rbo():
    a = [(0, 1), (0, 2), (1, 3), (2, 4)]
    assert jaccard(a, a) == 1 and jaccard(a, [(9, 9)]) == 0
    assert jaccard(a, [(0, 1), (5, 5)]) == pytest.approx(1 / 5)
    assert rbo(a, a) == pytest.approx(1) and rbo(a, [(9, i) for i in range(4)]) == 0
    b = [(0, 2), (0, 1), (1, 3), (2, 4)]  # top two swapped
    p = 0.9
    want = (1 - p) / (1 - p ** 4) * (0 + p * 1 + p ** 2 * 1 + p ** 3 * 1)
    assert rbo(a, b, p) == pytest.approx(want)
    assert rbo(a, list(reversed(a))) < rbo(a, b) < 1  # rank-biased: agreement at the top counts most


def test_auroc_is_mann_whitney():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1 and auroc([0, 1], [2, 3]) == 0
    assert auroc([1, 1], [1, 1]) == 0.5 and auroc([], [1]) is None
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30), rng.integers(0, 4, 40)  # many ties
    brute = np.mean([(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)])
    assert auroc(pos, neg) == pytest.approx(brute)


def test_shuffle_permutes_image_token_embeddings_only(demo):
    imgs = [im for im, _ in make_examples(3, seed=2)]
    inputs = demo.encode(imgs, "Describe the image.", None)
    mask = inputs["input_ids"] == demo.adapter.image_token_id
    seen = []  # the first decoder layer's input: the embeddings as the decoder sees them

    def keep(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    layer0 = demo.model.model.language_model.layers[0]
    h = layer0.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            demo.model(**inputs)
            with shuffled_image_tokens(demo, seed=0):
                demo.model(**inputs)
            demo.model(**inputs)  # hooks gone again
    finally:
        h.remove()
    plain, shuf, after = seen
    assert torch.equal(plain, after) and torch.equal(plain[~mask], shuf[~mask])
    for b in range(len(imgs)):
        p, s = plain[b][mask[b]], shuf[b][mask[b]]
        assert not torch.equal(p, s)
        assert torch.equal(p[p[:, 0].argsort()], s[s[:, 0].argsort()])  # the same rows in another order
    assert not language_model(demo)._forward_pre_hooks


# ------------------------------------------------------------------------------------ the science
@pytest.fixture(scope="module")
def demo_run(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics_run")
    manifest = save_examples(make_examples(150, seed=4321), root / "images")
    run_find(demo, manifest, root / "run", progress=False, concepts="all", top_k=20, max_new_tokens=12,
             batch_size=32, num_workers=0, overwrite=True)
    return root / "run"


def test_metrics_show_the_papers_findings_on_the_demo(demo, demo_run):
    m = compute_metrics(demo, demo_run, n=10, k=1, random_sets=2, causal_images=10, batch_size=32)
    print("\n" + summary_table(m))
    s = {k: (v["top"], v["random"]) for k, v in m["summary"].items()}
    assert len(m["concepts"]) == 9 and m["records"] == 150
    # The demo model is trained on the machine that runs the tests, and float training differs across
    # CPUs (vector widths), so the bars below are the paper's findings with margins that hold for the
    # models trained on the machines we have seen, not one model's exact figures.
    # Semantic: each neuron's promoted end given its activation's sign (0.56 / 0.09 and 0.66 / 0.23 here;
    # the sign-blind top end gave 0.22 / 0.04 and 0.37 / 0.17).
    assert s["semantic_hit_rate"][0] >= 0.4 and s["semantic_hit_rate"][0] >= 4 * s["semantic_hit_rate"][1]
    assert s["semantic_cosine"][0] >= 0.5 and s["semantic_cosine"][0] >= 2 * s["semantic_cosine"][1]
    assert s["region_jaccard"][0] >= 0.4 and s["region_jaccard"][0] >= 10 * s["region_jaccard"][1]
    assert s["region_rbo"][0] >= 0.5 and s["region_rbo"][0] >= 10 * s["region_rbo"][1]
    assert s["cross_image_jaccard"][0] >= 3 * s["cross_image_jaccard"][1]
    assert s["cross_image_rbo"][0] >= 4 * s["cross_image_rbo"][1]
    assert s["specificity_auroc"][0] >= 0.7 and s["specificity_auroc"][0] >= s["specificity_auroc"][1] + 0.15
    for mode in ("zero", "noise"):
        top, rnd = s[f"causal_{mode}_disappear"]
        assert top >= 0.1 and top >= 3 * rnd and rnd <= 0.05, (mode, top, rnd)
        top, rnd = s[f"causal_{mode}_prob_drop"]
        assert top >= 0.4 and top >= 5 * max(rnd, 0.01), (mode, top, rnd)
    red = m["concepts"]["red"]
    assert red["specificity"]["positives"] + red["specificity"]["negatives"] == 150
    assert red["cross_image"]["within"]["pairs"] > 0 and red["causal"]["images"] == 10
    assert set(m["seconds"]) == {"semantic", "cross_image", "specificity", "region", "causal"}


def test_metrics_subset_and_errors(demo, demo_run):
    m = compute_metrics(demo, demo_run, concepts=["circle", "red"], metrics=("semantic", "cross_image"), n=5)
    assert list(m["concepts"]) == ["circle", "red"] and set(m["seconds"]) == {"semantic", "cross_image"}
    assert "specificity" not in m["concepts"]["red"]
    corpus = demo_run.parent / "images" / "manifest.jsonl"  # images read from the corpus, matched by id
    m2 = compute_metrics(demo, demo_run, images=str(corpus), concepts=["red"], metrics=("specificity",), n=5)
    m3 = compute_metrics(demo, demo_run, concepts=["red"], metrics=("specificity",), n=5)
    assert m2["concepts"]["red"]["specificity"] == m3["concepts"]["red"]["specificity"]
    with pytest.raises(MMNError, match="not in the run"):
        compute_metrics(demo, demo_run, concepts=["zebra"])
    with pytest.raises(MMNError, match="unknown metric"):
        compute_metrics(demo, demo_run, metrics=("beauty",))


def test_cli_metrics(demo_path, demo_run, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["metrics", "--results", str(demo_run), "--out", str(out), "--neurons", "5", "--top-tokens", "1",
                 "--concepts", "red,blue", "--causal-images", "4", "--causal-modes", "zero", "--random-sets", "1",
                 "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["concepts"]) == {"red", "blue"} and "noise" not in m["concepts"]["red"]["causal"]
    assert "specificity: AUROC" in capsys.readouterr().out
    assert main(["metrics", "--results", str(tmp_path / "nothing")]) == 2
    assert main(["metrics", "--results", str(demo_run), "--metrics", "semantic,vibes", "--out", str(out)]) == 2


# ------------------------------------------------------------------------------------ regressions
@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=-1), dict(max_images=-1), dict(causal_images=0),
                                 dict(max_concepts=0)])
def test_metric_options_refuse_bad_values(bad):
    with pytest.raises(MMNError, match=next(iter(bad))):
        MetricOptions(**bad).validate()
    MetricOptions(max_images=0).validate()  # 0 and None: every record
    MetricOptions(max_images=None).validate()
    MetricOptions(max_concepts=None).validate()  # every concept


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--max-images", "-1"),
                                        ("--causal-images", "0"), ("--max-concepts", "0")])
def test_cli_metrics_bad_values_are_one_error_line(demo_run, tmp_path, capsys, flag, value):
    assert main(["metrics", "--results", str(demo_run), "--out", str(tmp_path), "--metrics", "semantic", "--quiet",
                 flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmn: error:") and flag in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


def test_region_compares_at_most_the_runs_top_k(demo, demo_run, monkeypatch):
    """n larger than the run's top_k (20): both rankings are cut at 20, so with no shuffle at all
    (identical inputs) the shuffled and in-order lists are equal: Jaccard and RBO exactly 1."""
    monkeypatch.setattr(metrics_mod, "shuffled_image_tokens", lambda engine, seed=0: contextlib.nullcontext())
    m = compute_metrics(demo, demo_run, n=40, concepts=["red", "circle"], metrics=("region",), random_sets=1)
    for w in ("red", "circle"):
        top = m["concepts"][w]["region"]["top"]
        assert top["images"] > 0
        # Not exactly 1: the run decoded with the KV cache, the metric re-scores teacher-forced in one
        # pass, and the two round differently, which may swap near-tied neurons at the cut. Compared at
        # depth 40 against the run's 20 (the bug this guards against), Jaccard would be about 0.5.
        assert top["jaccard"] >= 0.99 and top["rbo"] >= 0.99, (w, top)
        assert top.get("depth") == 20


def test_metrics_refuse_a_model_of_other_shapes(llava, llava_path, demo_run, tmp_path, capsys):
    with pytest.raises(MMNError, match="4 layers x 64 MLP neurons.*2 x 96"):
        compute_metrics(llava, demo_run, metrics=("semantic",), k=1)
    assert main(["metrics", "--results", str(demo_run), "--model", str(llava_path), "--out", str(tmp_path),
                 "--metrics", "semantic", "--quiet"]) == 2
    assert "Load the run's checkpoint" in capsys.readouterr().err and not (tmp_path / "metrics.json").exists()


def test_metrics_warn_on_other_weights_and_record_the_engine(demo, demo_run):
    run = json.loads((demo_run / "run.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunModelWarning)  # the run's own model: no warning
        m = compute_metrics(demo, demo_run, metrics=("semantic",), k=1, concepts=["red"])
    assert m["model"] == str(demo.source) and m["weight_fingerprint"] == demo.fingerprint
    assert m["run"]["weight_fingerprint"] == run["weight_fingerprint"] and "warning" not in m
    with demo.patched(suppress(demo, [(0, 1), (2, 3)], 0.0)):  # same shapes, other weights
        edited = demo.fingerprint
        with pytest.warns(RunModelWarning, match="weights"):
            m = compute_metrics(demo, demo_run, metrics=("semantic",), k=1, concepts=["red"])
    assert edited != run["weight_fingerprint"]
    assert m["weight_fingerprint"] == edited and m["run"]["weight_fingerprint"] == run["weight_fingerprint"]
    assert m["run"]["model"] == run["model"] and "weights" in m["warning"]


def test_cli_metrics_says_which_concepts_it_left_out(demo_run, tmp_path, capsys):
    """Concepts under --min-images (or past --max-concepts) are named in the output and in metrics.json."""
    out = tmp_path / "m"
    counts = {w: c["images"] for w, c in json.loads((demo_run / "concepts.json").read_text()).items()}
    cut = sorted(set(counts.values()))[1]  # at least one concept falls under it
    assert main(["metrics", "--results", str(demo_run), "--out", str(out), "--metrics", "semantic", "--min-images",
                 str(cut), "--quiet"]) == 0
    few = sorted(w for w, c in counts.items() if c < cut)
    m = json.loads((out / "metrics.json").read_text())
    assert few and m["left_out"]["fewer_images"] == few and not set(few) & set(m["concepts"])
    assert f"left out {len(few)} concept(s) named in fewer than {cut} images" in capsys.readouterr().out
