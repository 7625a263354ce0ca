"""`mmn report`: one self-contained HTML file that parses, embeds every image, and renders."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.edit.methods import suppress
from mmn_fast.errors import MMNError
from mmn_fast.find.heatmap import unique_name, write_heatmaps
from mmn_fast.explain.metrics import RunModelWarning, compute_metrics
from mmn_fast.explain.report import _metrics_section, _ratio, build_report, layer_svg, write_report
from mmn_fast.io import write_json
from mmn_fast.run.runner import run_find

VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "area", "base", "col", "embed", "param", "track"}
SVG_LEAVES = {"rect", "line", "path", "circle"}


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.refs, self.tags = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href", "xlink:href"):
            if key in a and tag != "img":
                self.refs.append(a[key])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def _parse(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    p.close()
    return p


@pytest.fixture(scope="module")
def report_run(demo, tmp_path_factory):
    """A small demo find run with metrics.json, the heatmaps of its first two images on disk and a patch file."""
    root = tmp_path_factory.mktemp("report_run")
    examples = make_examples(40, seed=909)
    manifest = save_examples(examples, root / "images")
    run = root / "run"
    run_find(demo, manifest, run, progress=False, concepts="all", top_k=10, max_new_tokens=12, batch_size=20,
             num_workers=0, overwrite=True)
    write_json(run / "metrics.json", compute_metrics(demo, run, n=5, k=1, metrics=("semantic", "cross_image")))
    ids = [json.loads(line)["id"] for line in (run / "results.jsonl").read_text().splitlines()[:2]]
    res = demo.find([im for im, _ in examples[:2]], concepts="all", top_k=10, max_new_tokens=12, ids=ids)
    write_heatmaps(demo, [im for im, _ in examples[:2]], res, run / "heatmaps", n=5)
    patch = suppress(demo, [(1, 2), (2, 3)], 0.0, source="red")
    patch.save(run / "edits" / "red.mmnpatch.safetensors")
    return run


def test_report_is_self_contained_and_well_formed(demo, report_run):
    path = write_report(report_run, engine=demo, neurons=6, examples=2)
    text = path.read_text()
    p = _parse(text)
    assert not p.errors and not p.stack, (p.errors, p.stack)
    assert p.imgs, "no images in the report"
    from PIL import Image

    for src in p.imgs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert min(im.size) >= 32
    assert all(r.startswith("#") for r in p.refs), p.refs  # no file, server or network reference
    assert "link" not in p.tags and "script" not in p.tags
    for needle in ("Run summary", "Where the multi-modal neurons are", "Property metrics", "red.mmnpatch.safetensors",
                   "semantic: concept among top-k tokens", "<svg", 'class="tok"'):
        assert needle in text, needle
    concepts = [w for w in ("red", "blue", "circle", "square") if f'id="c-{w}"' in text]
    assert len(concepts) >= 3
    assert text.count("<rect x=") == 4  # one bar per layer of the demo model
    assert "figcaption>shape_0000: heatmap" in text  # the heatmaps find wrote for the run's images


def test_report_without_model_and_cli(report_run, tmp_path, capsys):
    text = build_report(report_run, engine=None, examples=2)
    p = _parse(text)
    assert not p.errors and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert 'class="tok"' not in text and "Model not loaded" in text
    out = tmp_path / "r.html"
    assert main(["report", "--results", str(report_run), "--out", str(out), "--no-model"]) == 0
    assert out.is_file() and "report written" in capsys.readouterr().out
    assert main(["report", "--results", str(tmp_path / "missing")]) == 2


def test_layer_svg_is_valid_xml():
    svg = layer_svg([3, 0, 7, 1, 12], "t")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert len([e for e in root.iter() if e.tag.endswith("rect")]) == 6  # background + 5 bars


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_report_renders_in_headless_chromium(demo, report_run, tmp_path):
    path = write_report(report_run, tmp_path / "report.html", engine=demo, examples=1)
    shot = tmp_path / "shot.png"
    subprocess.run([shutil.which("chromium"), "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,1600", path.resolve().as_uri()], check=True, timeout=120,
                   capture_output=True)
    from PIL import Image

    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.std() > 10 and (px < 128).mean() > 0.005  # text and figures, not a blank page


# ------------------------------------------------------------------------------------ regressions
def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_report_refuses_a_model_of_other_shapes(llava, llava_path, report_run, tmp_path, capsys):
    with pytest.raises(MMNError, match="4 layers x 64 MLP neurons.*2 x 96"):
        build_report(report_run, engine=llava, examples=1)
    out = tmp_path / "r.html"
    assert main(["report", "--results", str(report_run), "--model", str(llava_path), "--out", str(out)]) == 2
    assert "Load the run's checkpoint" in capsys.readouterr().err and not out.exists()


def test_report_warns_on_other_weights(demo, report_run):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunModelWarning)
        assert "Note: the loaded model" not in build_report(report_run, engine=demo, examples=0)
    with demo.patched(suppress(demo, [(1, 2)], 0.0)):
        with pytest.warns(RunModelWarning):
            text = build_report(report_run, engine=demo, examples=0)
    assert "Note: the loaded model" in text


@pytest.mark.parametrize("argv,kw", [(["--neurons", "0"], dict(neurons=0)), (["--examples", "-1"], dict(examples=-1))])
def test_report_refuses_bad_counts(report_run, tmp_path, capsys, argv, kw):
    with pytest.raises(MMNError, match=next(iter(kw))):
        build_report(report_run, **kw)
    out = tmp_path / "r.html"
    assert main(["report", "--results", str(report_run), "--no-model", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmn: error:") and argv[0] in err and not out.exists()


def test_ratio_column_is_finite_and_meaningful():
    assert _ratio(0.0, 0.0) == "-"  # nothing happened either way
    assert _ratio(-0.05, 0.0) == "-" and _ratio(0.3, 0.0) == "-"  # a zero control gives no ratio
    assert _ratio(0.01, -0.02) == "-" and _ratio(-0.01, -0.02) == "-"  # nor a negative one
    assert _ratio(None, 0.1) == "-" and _ratio(0.1, None) == "-"
    assert _ratio(0.6, 0.1) == '<span class="good">6.0x</span>'
    assert _ratio(0.12, 0.1) == "1.2x" and _ratio(-0.2, 0.1) == "-2.0x"  # not highlighted
    rows = {"a": {"label": "x", "top": 0.0, "random": 0.0}, "b": {"label": "y", "top": -0.05, "random": 0.0},
            "c": {"label": "z", "top": 0.01, "random": -0.02}}
    html = _metrics_section({"summary": rows, "options": {"n": 10, "random_sets": 3}, "records": 10})
    assert "&infin;" not in html and "good" not in html


def test_report_skips_heatmaps_of_images_not_in_the_run(report_run, tmp_path):
    run = _copy(report_run, tmp_path)
    ghost = run / "heatmaps" / "ghost"  # a discarded run's image: its files are on disk, its id is not in the run
    shutil.copytree(run / "heatmaps" / "shape_0000", ghost)
    recs = json.loads((ghost / "heatmaps.json").read_text())
    (ghost / "heatmaps.json").write_text(json.dumps([dict(r, id="ghost") for r in recs]))
    text = build_report(run, engine=None, examples=3)
    assert "figcaption>shape_0000: heatmap" in text and "figcaption>ghost" not in text
    assert not _parse(text).errors


def test_report_embeds_only_files_inside_the_run(report_run, tmp_path):
    from PIL import Image

    run = _copy(report_run, tmp_path / "in")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(secret)
    d = run / "heatmaps" / "shape_0000"
    recs = json.loads((d / "heatmaps.json").read_text())
    recs[0]["heatmap"] = "../../../../secret.png"  # relative, out of the run directory
    recs[1]["heatmap"] = str(secret)  # absolute
    (d / "heatmaps.json").write_text(json.dumps(recs))
    text = build_report(run, engine=None, examples=3)
    assert base64.b64encode(secret.read_bytes()).decode() not in text
    assert "figcaption>shape_0000: mask" in text  # the records' own files inside the run still show
    assert not _parse(text).errors


def test_report_leaves_out_a_heatmaps_folder_outside_the_run_and_needs_no_results_without_artifacts(report_run,
                                                                                                     tmp_path):
    """A heatmaps/ that links outside the run is not embedded (issue 13: only the run's own files), with a note."""
    import shutil

    run = _copy(report_run, tmp_path / "in")
    shutil.move(run / "heatmaps", tmp_path / "elsewhere")
    (run / "heatmaps").symlink_to(tmp_path / "elsewhere")
    text = build_report(run, engine=None, examples=3)
    assert "figcaption>shape_0000: mask" not in text and "heatmaps/ leads outside the run directory" in text
    (run / "heatmaps").unlink()
    (run / "metrics.json").unlink()
    (run / "results.jsonl").unlink()  # nothing to tell apart: results.jsonl is not read
    assert "<html" in build_report(run, engine=None, examples=0)


@pytest.mark.parametrize("change", ["records", "fingerprint", "ids"])
def test_report_skips_metrics_of_another_run(report_run, tmp_path, change):
    run = _copy(report_run, tmp_path)
    assert "semantic: concept among top-k tokens" in build_report(run, engine=None, examples=0)  # its own: shown
    m = json.loads((run / "metrics.json").read_text())
    if change == "records":
        m["records"] -= 1
    elif change == "fingerprint":
        m["run"]["weight_fingerprint"] = "0" * 16
    else:
        m["run"]["ids_sha1"] = "0" * 16  # the same number of records, other images (find --overwrite)
    (run / "metrics.json").write_text(json.dumps(m))
    text = build_report(run, engine=None, examples=0)
    assert "semantic: concept among top-k tokens" not in text and "is not shown" in text
    assert not _parse(text).errors


def test_report_heatmaps_of_ids_with_one_safe_name(demo, tmp_path):
    """Ids that sanitise to one folder name ("a b" / "a_b", two non-ASCII words): find --heatmaps keeps
    each image's maps apart, and the report shows each image's own."""
    examples = make_examples(4, seed=77)
    ids = ["a b", "a_b", "\u732b", "\u72ac"]
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for k, ((im, _cap), i) in enumerate(zip(examples, ids)):
        im.save(root / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "id": i}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    run_find(demo, root / "manifest.jsonl", run, progress=False, concepts="all", top_k=5, max_new_tokens=12,
             batch_size=4, num_workers=0, overwrite=True, heatmaps="activation")
    folders = sorted(p.name for p in (run / "heatmaps").iterdir())
    assert folders == sorted(unique_name(i) for i in ids) and "a_b" in folders
    recs = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    caps = {r["id"]: r["caption"] for r in recs}
    for i in ids:
        recs = json.loads((run / "heatmaps" / unique_name(i) / "heatmaps.json").read_text())
        assert {r["id"] for r in recs} == {i} and all(r["concept"] in caps[i] for r in recs)
    text = build_report(run, engine=None, examples=4)
    for i in ids:
        assert f"figcaption>{i}: heatmap" in text, i


def test_report_takes_the_run_as_a_positional_too_with_a_note(report_run, tmp_path, capsys):
    assert main(["report", str(report_run), "--out", str(tmp_path / "r.html"), "--no-model"]) == 0
    assert "mmn: note: a positional run directory is deprecated" in capsys.readouterr().err


def test_report_hides_unset_options_and_wraps_patch_descriptions(demo, report_run, tmp_path):
    """An unset option (prefix None) is not a row; a patch's long description wraps inside its card."""
    text = write_report(report_run, tmp_path / "r.html", engine=None).read_text()
    assert "option prefix" not in text and "option top_k" in text
    assert "pre{white-space:pre-wrap" in text and ".card{overflow-x:auto}" in text
