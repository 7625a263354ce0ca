"""Hostile or damaged run directories (issue 13): a run's files are read, embedded and written only
inside the run (no link leads a report, a resume or a merge elsewhere); resume checks everything the
checkpoint records before it touches a file; a malformed file is one MMNError naming file and field."""
from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

import pytest

from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.edit.methods import suppress
from mmn_fast.errors import MMNError
from mmn_fast.explain.metrics import compute_metrics
from mmn_fast.explain.report import build_report
from mmn_fast.io import write_json
from mmn_fast.run.aggregate import open_results
from mmn_fast.run.runner import run_find

OPTS = dict(progress=False, concepts="all", top_k=5, max_new_tokens=12, batch_size=2, num_workers=0, shard_size=4,
            checkpoint_every=2)
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA not for any report\n"


@pytest.fixture(scope="module")
def made(demo, tmp_path_factory):
    """A finished demo run of 10 images in 3 shards (parts/ kept), with heatmaps, metrics.json and a patch."""
    root = tmp_path_factory.mktemp("safety")
    manifest = save_examples(make_examples(10, seed=1313), root / "images")
    run = root / "run"
    run_find(demo, manifest, run, heatmaps="activation", **OPTS)
    write_json(run / "metrics.json", compute_metrics(demo, run, n=3, k=1, metrics=("semantic", "cross_image")))
    suppress(demo, [(1, 2)], 0.0, source="red").save(run / "edits" / "red.mmnpatch.safetensors")
    return run, manifest


@pytest.fixture
def run(made, tmp_path):
    """A fresh copy of the run, to corrupt; `secret`: a private file outside it."""
    dst = tmp_path / "work" / "run"
    shutil.copytree(made[0], dst, symlinks=True)
    (tmp_path / "secret").write_bytes(SECRET)
    return dst


def _secret(run: Path) -> Path:
    return run.parent.parent / "secret"


def _rerun(demo, made, run, **kw):
    return run_find(demo, made[1], run, heatmaps="activation", **dict(OPTS, **kw))


def _last(err: str) -> str:
    """The last line of stderr (a model load draws its progress bar before it)."""
    return err.strip().splitlines()[-1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------ 3: only the run's own files
def test_report_does_not_embed_a_heatmap_that_links_outside_the_run(run):
    png = sorted((run / "heatmaps").rglob("*.heatmap.png"))[0]
    png.unlink()
    png.symlink_to(_secret(run))  # same name the record gives: only the link shows it is not the run's
    text = build_report(run, engine=None, examples=3)
    assert _b64(SECRET)[:40] not in text
    assert "figcaption>" in text  # the run's own figures still show


def test_report_leaves_out_metrics_patches_and_heatmap_records_that_link_outside(run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel in ("metrics.json", "edits/red.mmnpatch.safetensors"):
        shutil.move(run / rel, outside / Path(rel).name)
        (run / rel).symlink_to(outside / Path(rel).name)
    folder = sorted(p for p in (run / "heatmaps").iterdir())[0]
    shutil.move(folder / "heatmaps.json", outside / "heatmaps.json")
    (folder / "heatmaps.json").symlink_to(outside / "heatmaps.json")
    text = html.unescape(build_report(run, engine=None, examples=3))
    assert "metrics.json is not shown: it leads outside the run directory" in text
    assert "semantic: concept among top-k tokens" not in text
    assert "red.mmnpatch.safetensors</b>: not read (it leads outside the run directory)" in text
    assert "suppress" not in text.split('id="edits"')[1]  # the patch itself was not read
    assert f"figcaption>{folder.name}:" not in text


@pytest.mark.parametrize("name", ["run.json", "results.jsonl", "aggregates.json"])
def test_open_results_refuses_run_files_that_link_outside(run, tmp_path, name):
    shutil.move(run / name, tmp_path / name)
    (run / name).symlink_to(tmp_path / name)
    with pytest.raises(MMNError, match=f"{name}' leads outside the run directory"):
        res = open_results(run)
        list(res)
        res.concepts


# ------------------------------------------------------------------ 4: resume trusts nothing
def _parts(run: Path) -> Path:
    return run / "parts"


def _state(run: Path) -> Path:
    return _parts(run) / "rank-000-of-001.state.json"


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_resume_refuses_a_part_file_that_links_outside_and_writes_nothing_there(demo, made, run, tmp_path):
    part = _parts(run) / "shard-00001.jsonl"
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(part.read_bytes() + b"the user's own lines\n" * 50)  # longer: a resume would cut it
    before = victim.read_bytes()
    part.unlink()
    part.symlink_to(victim)
    with pytest.raises(MMNError, match=r"shard-00001.jsonl' is a link.*--overwrite"):
        _rerun(demo, made, run)
    assert victim.read_bytes() == before
    _rerun(demo, made, run, overwrite=True)  # what the message says to do: the link goes, its target stays
    assert victim.read_bytes() == before and not part.is_symlink()
    assert (run / "results.jsonl").read_bytes() == (made[0] / "results.jsonl").read_bytes()


def test_resume_refuses_a_parts_folder_that_links_outside(demo, made, run, tmp_path):
    shutil.move(_parts(run), tmp_path / "parts")
    _parts(run).symlink_to(tmp_path / "parts")
    before = _snapshot(tmp_path / "parts")
    with pytest.raises(MMNError, match=r"parts' is a link to .*a run writes only inside its directory"):
        _rerun(demo, made, run)
    assert _snapshot(tmp_path / "parts") == before


@pytest.mark.parametrize("which", ["heatmaps", "one image's folder"])
def test_resume_with_heatmaps_refuses_heatmap_folders_that_link_outside(demo, made, run, tmp_path, which):
    _state(run).unlink()  # no checkpoint: every image is scored again, and its maps written again
    link = run / "heatmaps" if which == "heatmaps" else sorted((run / "heatmaps").iterdir())[0]
    shutil.move(link, tmp_path / "maps")
    link.symlink_to(tmp_path / "maps")
    before = _snapshot(tmp_path / "maps")
    with pytest.raises(MMNError, match=r"is a link to .*a run writes only inside its directory"):
        _rerun(demo, made, run)
    assert _snapshot(tmp_path / "maps") == before and not list((tmp_path / "maps").glob("**/.*tmp"))


def test_resume_refuses_a_part_file_shorter_than_recorded_and_pads_nothing(demo, made, run):
    part = _parts(run) / "shard-00000.jsonl"
    cut = part.read_bytes()[:-10]
    part.write_bytes(cut)
    with pytest.raises(MMNError, match=r"shard-00000.jsonl' holds \d+ bytes, fewer than the \d+ recorded.*--overwrite"):
        _rerun(demo, made, run)
    assert part.read_bytes() == cut and b"\0" not in (run / "results.jsonl").read_bytes()


@pytest.mark.parametrize("edit", ["fewer results", "done", "counts"])
def test_resume_refuses_a_state_that_does_not_match_the_part_files(demo, made, run, edit):
    state = json.loads(_state(run).read_text())
    part = _parts(run) / "shard-00000.jsonl"
    if edit == "fewer results":  # ends a line, but the shard's samples are no longer all there
        state["shards"]["0"]["results"] = len(part.read_bytes().splitlines(keepends=True)[0])
    elif edit == "done":
        state["shards"]["0"]["done"] += 1
    else:
        state["counts"]["images"] -= 1
    _state(run).write_text(json.dumps(state))
    before = _snapshot(_parts(run))
    with pytest.raises(MMNError, match="does not match its checkpoint.*nothing was changed.*--overwrite"):
        _rerun(demo, made, run)
    assert _snapshot(_parts(run)) == before


@pytest.mark.parametrize("field,value", [("counts", {"images": "many"}), ("seq", -1), ("shards", {"0": [1, 2]}),
                                         ("shards", {"x": {"done": 1}})])
def test_resume_refuses_a_malformed_state_with_one_line(demo, made, run, field, value):
    state = json.loads(_state(run).read_text())
    state[field] = value
    _state(run).write_text(json.dumps(state))
    with pytest.raises(MMNError, match=f"state.json': field '{field}.*--overwrite"):
        _rerun(demo, made, run)


def test_resume_cuts_back_what_was_written_after_the_checkpoint(demo, made, run):
    """The normal restart after a kill still works: a part longer than recorded is cut back to it."""
    with open(_parts(run) / "shard-00002.jsonl", "ab") as f:
        f.write(b'{"half a line written when the process was kill')
    _rerun(demo, made, run)
    assert (run / "results.jsonl").read_bytes() == (made[0] / "results.jsonl").read_bytes()


# ------------------------------------------------------------------ 8: malformed run files
def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


@pytest.mark.parametrize("layer", [9999, -1, "1"])
def test_report_refuses_a_concept_neuron_outside_the_model(run, layer):
    def change(summary):
        next(iter(summary.values()))["neurons"][0]["layer"] = layer
        return summary

    _edit(run / "concepts.json", change)
    with pytest.raises(MMNError, match=r"concepts.json': field '\w+\.neurons\[0\]\.layer' must be an integer in 0..3"):
        build_report(run, engine=None, examples=0)


@pytest.mark.parametrize("change,field", [
    (lambda r: [r], "is not a run.json"),
    (lambda r: dict(r, totals=dict(r["totals"], neurons_scored="many")), "field 'totals.neurons_scored'"),
    (lambda r: dict(r, options="fast"), "field 'options' must be an object"),
    (lambda r: dict(r, adapter=dict(r["adapter"], n_layers="4")), "field 'adapter.n_layers'"),
])
def test_a_malformed_run_json_is_one_line_in_report_and_cli(run, tmp_path, capsys, change, field):
    _edit(run / "run.json", change)
    with pytest.raises(MMNError, match=f"run.json'.*{field}"):
        build_report(run, engine=None, examples=0)
    for extra in (["--no-model"], []):  # without --no-model the CLI reads the run's model from run.json first
        assert main(["report", "--results", str(run), "--out", str(tmp_path / "r.html"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmn: error:") and "run.json" in err and "Traceback" not in err


@pytest.mark.parametrize("change,field", [
    (lambda m: dict(m, concepts="red"), "its field 'concepts' is str"),
    (lambda m: dict(m, summary={k: "x" for k in m["summary"]}), "its field 'summary."),
    (lambda m: dict(m, options=dict(m["options"], max_images="all")), "its field 'options.max_images'"),
])
def test_report_names_the_field_of_a_malformed_metrics_json(run, change, field):
    _edit(run / "metrics.json", change)
    text = html.unescape(build_report(run, engine=None, examples=0))
    assert f"metrics.json is not shown: {field}" in text


def test_report_with_model_refuses_a_result_neuron_outside_the_model(demo, run):
    shutil.rmtree(run / "heatmaps")  # the report computes the examples with the model
    (run / "metrics.json").unlink()
    lines = (run / "results.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    for c in rec["concepts"]:
        c["neurons"][0][1] = 9999
    (run / "results.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    with pytest.raises(MMNError, match=r"results.jsonl' line 1: field 'concepts\[0\]\.neurons\[0\]'.*index in 0..63"):
        build_report(run, engine=demo, examples=1)


@pytest.mark.parametrize("key", ["concepts", "mode", "n_layers"])
def test_aggregates_missing_a_key_is_one_line(run, demo_path, capsys, key):
    _edit(run / "aggregates.json", lambda a: {k: v for k, v in a.items() if k != key})
    with pytest.raises(MMNError, match=f"aggregates.json': field '{key}'"):
        open_results(run).concepts
    assert main(["metrics", "--results", str(run), "--model", str(demo_path), "--metrics", "semantic"]) == 2
    err = capsys.readouterr().err
    assert _last(err).startswith("mmn: error:") and "aggregates.json" in err and "Traceback" not in err


def test_a_truncated_results_jsonl_is_one_line(run, demo_path, capsys):
    data = (run / "results.jsonl").read_bytes()
    (run / "results.jsonl").write_bytes(data[: len(data) - 40])
    n = data.count(b"\n")
    with pytest.raises(MMNError, match=rf"results.jsonl' line {n} is not valid JSON.*cut short"):
        list(open_results(run))
    assert main(["metrics", "--results", str(run), "--model", str(demo_path), "--metrics", "semantic",
                 "--max-images", "0"]) == 2
    err = capsys.readouterr().err
    assert _last(err).startswith("mmn: error:") and f"line {n}" in err and "Traceback" not in err
