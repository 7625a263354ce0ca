"""`mmn report`: one self-contained HTML file that parses, embeds every image, and renders."""
from __future__ import annotations

import base64
import io
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from mmn_fast.cli import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.edit import suppress
from mmn_fast.explain.heatmap import write_heatmaps
from mmn_fast.explain.metrics import compute_metrics
from mmn_fast.explain.report import build_report, layer_svg, write_report
from mmn_fast.io import write_json
from mmn_fast.runner import run_find

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
    """A small demo find run with metrics.json, two concepts' heatmaps on disk and a patch file."""
    root = tmp_path_factory.mktemp("report_run")
    examples = make_examples(40, seed=909)
    manifest = save_examples(examples, root / "images")
    run = root / "run"
    run_find(demo, manifest, run, progress=False, concepts="all", top_k=10, max_new_tokens=12, batch_size=20,
             num_workers=0, overwrite=True)
    write_json(run / "metrics.json", compute_metrics(demo, run, n=5, k=1, metrics=("semantic", "cross_image")))
    res = demo.find([im for im, _ in examples[:2]], concepts="all", top_k=10, max_new_tokens=12, ids=["a", "b"])
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


def test_report_without_model_and_cli(report_run, tmp_path, capsys):
    text = build_report(report_run, engine=None, examples=2)
    p = _parse(text)
    assert not p.errors and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    assert 'class="tok"' not in text and "Model not loaded" in text
    out = tmp_path / "r.html"
    assert main(["report", str(report_run), "--out", str(out), "--no-model"]) == 0
    assert out.is_file() and "report written" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2


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
