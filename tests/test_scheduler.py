"""The streaming scheduler: resume after SIGKILL, option checks, skipped samples, aggregates, 2 processes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmn_fast
from mmn_fast.run.aggregate import NeuronStats, open_results
from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples

FIND = ["--concepts", "all", "--max-new-tokens", "12", "--batch-size", "2", "--top-k", "10", "--shard-size", "5",
        "--num-workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """21 demo images, one corrupt file and one missing file, as a JSONL manifest (5 shards of 5)."""
    d = tmp_path_factory.mktemp("corpus")
    manifest = save_examples(make_examples(21, seed=77), d)
    (d / "corrupt.png").write_bytes(b"not a png at all")
    lines = manifest.read_text().splitlines()
    lines.insert(4, json.dumps({"image": "corrupt.png", "id": "corrupt"}))
    lines.insert(11, json.dumps({"image": "missing.png", "id": "missing"}))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread too, so their bytes can be compared with the subprocess runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _find(model, images, out, *extra):
    return main(["find", "--model", str(model), "--images", str(images), "--out", str(out), *FIND, *extra])


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # results are compared bit for bit: same thread count everywhere


def _find_cmd(model, images, out, *extra):
    return [sys.executable, "-m", "mmn_fast", "find", "--model", str(model), "--images", str(images),
            "--out", str(out), *FIND, *extra]


@pytest.fixture(scope="module")
def reference_run(demo_path, corpus, tmp_path_factory):
    """An uninterrupted single-process run in a subprocess with one thread, like the runs compared to it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    done = subprocess.run(_find_cmd(demo_path, corpus, out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _outputs(out: Path) -> dict:
    stats = NeuronStats.load(out / "aggregates")
    return {"results": (out / "results.jsonl").read_bytes(), "skipped": (out / "skipped.jsonl").read_bytes(),
            "concepts": json.loads((out / "concepts.json").read_text()), "stats": stats}


def _assert_same(a: dict, b: dict) -> None:
    assert a["results"] == b["results"]
    assert a["skipped"] == b["skipped"]
    assert a["concepts"] == b["concepts"], [(w, a["concepts"][w], b["concepts"].get(w)) for w in a["concepts"]
                                            if a["concepts"][w] != b["concepts"].get(w)][:2]
    sa, sb = a["stats"], b["stats"]
    assert sa.images == sb.images
    for word in sa.dense:
        for k in ("sum", "sumsq", "topk_sum", "topk"):
            torch.testing.assert_close(sa.dense[word][k], sb.dense[word][k], rtol=1e-12, atol=0)


def test_output_contract_skips_and_open_results(reference_run):
    out = reference_run
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 21 and len({l["id"] for l in lines}) == 21
    assert [l["id"] for l in lines] == sorted(l["id"] for l in lines)  # corpus order
    skipped = [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["key"] for s in skipped] == ["corrupt", "missing"]
    assert all(s["reason"] for s in skipped)
    res = open_results(out)
    run = res.run
    assert run["totals"]["images"] == 21 and run["totals"]["skipped"] == 2
    assert run["totals"]["neurons_scored"] == sum(len(rec["concepts"]) for rec in lines) * 4 * 64
    assert sum(1 for _ in res) == 21 and len(res.skipped()) == 2
    colours = {w for w in res.concepts if w in ("red", "green", "blue", "yellow", "purple", "orange")}
    assert colours
    word = sorted(colours)[0]
    named = sum(word in {c["word"] for c in rec["concepts"]} for rec in lines)
    assert res.concepts[word] == named
    assert res.mean_scores(word).shape == (4, 64)
    assert res.top_neurons(word, 3)[0]["count"] >= 1
    assert not list(out.glob("*.tmp")) and not list((out / "parts").glob("*.tmp"))


def test_sparse_aggregates_give_the_same_concepts(demo_path, corpus, reference_run, tmp_path):
    out = tmp_path / "sparse"
    assert _find(demo_path, corpus, out, "--aggregate", "sparse") == 0
    assert json.loads((out / "concepts.json").read_text()) == json.loads((reference_run / "concepts.json").read_text())
    assert (out / "results.jsonl").read_bytes() == (reference_run / "results.jsonl").read_bytes()
    with pytest.raises(mmn_fast.MMNError, match="dense"):
        open_results(out).mean_scores("red")


def test_rerun_is_a_no_op_and_other_options_are_refused(demo_path, corpus, reference_run, tmp_path, capsys):
    before = _outputs(reference_run)
    assert _find(demo_path, corpus, reference_run) == 0  # same command: already complete
    _assert_same(before, _outputs(reference_run))
    rc = _find(demo_path, corpus, reference_run, "--top-k", "5")
    err = capsys.readouterr().err
    assert rc == 2 and "different settings" in err and "--overwrite" in err and "Traceback" not in err
    out = tmp_path / "again"
    assert _find(demo_path, corpus, out) == 0
    assert _find(demo_path, corpus, out, "--top-k", "5", "--overwrite") == 0
    first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert all(len(c["neurons"]) == 5 for c in first["concepts"])


def test_a_run_started_by_an_older_version_is_not_resumed_into_mixed_keys(demo_path, corpus, reference_run,
                                                                         tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(reference_run, out)
    cfg = json.loads((out / "parts" / "config.json").read_text())
    del cfg["key_format"]  # what a run of the previous key scheme recorded
    (out / "parts" / "config.json").write_text(json.dumps(cfg))
    assert _find(demo_path, corpus, out) == 2
    assert "older mmn_fast" in capsys.readouterr().err


def _result_lines(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (out / "parts").glob("shard-*.jsonl")) if (out / "parts").exists() else 0


@pytest.mark.parametrize("kill_after", [1, 7, 15])
def test_sigkill_at_any_point_then_resume_gives_identical_output(demo_path, corpus, reference_run, tmp_path,
                                                                 kill_after):
    out = tmp_path / "out"
    cmd = _find_cmd(demo_path, corpus, out, "--checkpoint-every", "2")
    env = ENV
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _result_lines(out) < kill_after and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "run.json").exists()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(_outputs(reference_run), _outputs(out))


def test_two_processes_match_one(demo_path, corpus, reference_run, tmp_path):
    """`mmn find --nproc 2` (torchrun, gloo on CPU): the same lines and aggregates as one process."""
    out = tmp_path / "two"
    cmd = _find_cmd(demo_path, corpus, out, "--nproc", "2")
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((out / "parts").glob("rank-*-of-002.state.json"))) == 2
    a, b = _outputs(reference_run), _outputs(out)
    assert a["results"] == b["results"] and a["skipped"] == b["skipped"]
    assert a["stats"].images == b["stats"].images
    for word in a["stats"].dense:
        for k in ("sum", "sumsq", "topk_sum", "topk"):
            torch.testing.assert_close(a["stats"].dense[word][k], b["stats"].dense[word][k], rtol=1e-9, atol=1e-12)
    assert "images" in done.stdout and "neurons scored" in done.stdout


def test_teacher_forced_sample_without_caption_is_skipped(demo_path, tmp_path):
    d = tmp_path / "tf"
    manifest = save_examples(make_examples(3, seed=5), d)
    lines = [json.loads(l) for l in manifest.read_text().splitlines()]
    del lines[1]["caption"]
    manifest.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    out = tmp_path / "out"
    assert _find(demo_path, manifest, out, "--teacher-forced") == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    skipped = json.loads((out / "skipped.jsonl").read_text())
    assert skipped["key"] == lines[1]["id"] and "caption" in skipped["reason"]


def test_decoding_in_worker_processes_gives_the_same_output(demo_path, corpus, reference_run, tmp_path):
    out = tmp_path / "workers"
    assert _find(demo_path, corpus, out, "--num-workers", "2") == 0
    a, b = _outputs(reference_run), _outputs(out)
    assert a["results"] == b["results"] and a["skipped"] == b["skipped"]
    for word in a["stats"].dense:
        torch.testing.assert_close(a["stats"].dense[word]["sum"], b["stats"].dense[word]["sum"], rtol=1e-12, atol=1e-12)


def test_find_heatmaps_writes_a_map_and_mask_per_concept(demo_path, tmp_path):
    manifest = save_examples(make_examples(4, seed=12), tmp_path / "imgs")
    out = tmp_path / "hm"
    assert _find(demo_path, manifest, out, "--heatmaps") == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    for rec in lines:
        words = {c["word"].lower() for c in rec["concepts"]}
        d = out / "heatmaps" / rec["id"]
        assert {p.name.split(".")[0] for p in d.glob("*.heatmap.png")} == words
        assert len(list(d.glob("*.mask.png"))) == len(words) and (d / "heatmaps.json").is_file()


def test_checkpoint_aggregates_are_versioned_files(tmp_path):
    """Each checkpoint's aggregates get their own file, so a kill between writing them and the
    state that names them leaves the previous pair intact (regression: a dotted stem lost its seq)."""
    stats = NeuronStats("sparse", 2, 3)
    stats.add("red", None, [[0, 1, 2.0]])
    stats.save(tmp_path / "rank-000.agg-1")
    stats.add("red", None, [[0, 1, 4.0]])
    stats.save(tmp_path / "rank-000.agg-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rank-000.agg-1.json", "rank-000.agg-1.safetensors", "rank-000.agg-2.json", "rank-000.agg-2.safetensors"]
    assert NeuronStats.load(tmp_path / "rank-000.agg-1").images == {"red": 1}
    assert NeuronStats.load(tmp_path / "rank-000.agg-2").top_neurons("red") == [
        {"layer": 0, "index": 1, "count": 2, "mean_score": 3.0}]


def test_device_map_auto_loads_through_accelerate(llava_path, images):
    """`--device-map auto` (one replica spread over the available devices; here all on the CPU) gives
    the same results as a plain load."""
    pytest.importorskip("accelerate")
    spread = mmn_fast.load(llava_path, device_map="auto")
    plain = mmn_fast.load(llava_path, device="cpu")
    got = spread.find(images[:2], concepts="all", max_new_tokens=5, top_k=5)
    want = plain.find(images[:2], concepts="all", max_new_tokens=5, top_k=5)
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want]


def test_an_image_the_model_rejects_is_skipped_and_a_broken_model_stops_the_run(demo, tmp_path, monkeypatch):
    from mmn_fast.run.runner import MAX_FAILED_BATCHES, RunSettings, run_corpus

    manifest = save_examples(make_examples(6, seed=9), tmp_path / "imgs")
    bad = json.loads(manifest.read_text().splitlines()[3])["id"]
    real = demo.iter_find

    def picky(images, ids=None, **kw):
        if bad in (ids or []):
            raise TypeError("odd image")
        return real(images, ids=ids, **kw)

    monkeypatch.setattr(demo, "iter_find", picky)
    settings = RunSettings(progress=False, num_workers=0)
    opts = mmn_fast.FindOptions(concepts="all", max_new_tokens=12, batch_size=2)
    run_corpus(demo, manifest, tmp_path / "out", settings, opts)
    skipped = [json.loads(l) for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["key"] for s in skipped] == [bad] and "TypeError: odd image" in skipped[0]["reason"]
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 5

    def broken(images, **kw):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(demo, "iter_find", broken)
    many = save_examples(make_examples(2 * MAX_FAILED_BATCHES + 2, seed=10), tmp_path / "many")
    with pytest.raises(mmn_fast.MMNError, match="batches in a row failed"):
        run_corpus(demo, many, tmp_path / "out2", settings, opts)
    assert not (tmp_path / "out2" / "run.json").exists()  # not marked finished: a rerun resumes
    # images the model truly rejects, many in a row: --max-failed-batches 0 goes through them all
    with pytest.raises(mmn_fast.MMNError, match=f"none of the {2 * MAX_FAILED_BATCHES + 2} images could be used"):
        run_corpus(demo, many, tmp_path / "out2", RunSettings(progress=False, num_workers=0, max_failed_batches=0),
                   opts)
    assert len((tmp_path / "out2" / "skipped.jsonl").read_text().splitlines()) == 2 * MAX_FAILED_BATCHES + 2
    with pytest.raises(mmn_fast.MMNError, match="max-failed-batches"):
        run_corpus(demo, many, tmp_path / "out3", RunSettings(progress=False, num_workers=0, max_failed_batches=-1),
                   opts)


def test_a_model_wide_failure_streak_is_redone_by_the_rerun(demo, tmp_path, monkeypatch):
    """Checkpoints inside a streak of failed batches would keep its images skipped for good: the run
    stops after MAX_FAILED_BATCHES ("rerun to resume") and the rerun starts from the last checkpoint."""
    from mmn_fast.run.runner import MAX_FAILED_BATCHES, RunSettings, run_corpus

    n = MAX_FAILED_BATCHES + 4
    manifest = save_examples(make_examples(n, seed=21), tmp_path / "imgs")
    real, calls = demo.iter_find, {"n": 0}

    def fails_after_two(images, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("CUDA error: out of memory")  # model-wide and transient
        return real(images, **kw)

    settings = RunSettings(progress=False, num_workers=0, checkpoint_every=1)
    opts = mmn_fast.FindOptions(concepts="all", max_new_tokens=6, batch_size=1, top_k=5)
    out = tmp_path / "out"
    monkeypatch.setattr(demo, "iter_find", fails_after_two)
    with pytest.raises(mmn_fast.MMNError, match="batches in a row failed"):
        run_corpus(demo, manifest, out, settings, opts)
    state = json.loads((out / "parts" / "rank-000-of-001.state.json").read_text())
    assert state["counts"]["images"] == 2 and state["counts"]["skipped"] == 0  # last checkpoint: before the streak
    monkeypatch.setattr(demo, "iter_find", real)  # the cause fixed
    summary = run_corpus(demo, manifest, out, settings, opts)
    assert (summary["images"], summary["skipped"]) == (n, 0)
    assert (out / "skipped.jsonl").read_text() == ""
    assert len((out / "results.jsonl").read_text().splitlines()) == n


def test_checkpoint_every_counts_batches_flushed_at_a_shard_end(demo, tmp_path):
    """Shards smaller than a batch are flushed at their end only: those images count towards
    --checkpoint-every too (3 shards of 2 with --checkpoint-every 1: one checkpoint per shard, plus the last)."""
    from mmn_fast.run.runner import RunSettings, run_corpus

    manifest = save_examples(make_examples(6, seed=22), tmp_path / "imgs")
    out = tmp_path / "out"
    run_corpus(demo, manifest, out,
               RunSettings(progress=False, num_workers=0, shard_size=2, checkpoint_every=1, checkpoint_seconds=1e9),
               mmn_fast.FindOptions(concepts="all", max_new_tokens=6, batch_size=4, top_k=5))
    assert json.loads((out / "parts" / "rank-000-of-001.state.json").read_text())["seq"] == 4


def test_the_corpus_is_identified_by_its_absolute_path(demo, tmp_path, monkeypatch):
    """'./data/m.jsonl' and 'data/m.jsonl' are one corpus; 'data/m.jsonl' from another working
    directory (same absolute --out) is another, and refused rather than mixed in."""
    from mmn_fast.run.runner import RunSettings, run_corpus

    for sub, seed in (("x", 23), ("y", 24)):
        save_examples(make_examples(3, seed=seed), tmp_path / sub / "data")
    settings = RunSettings(progress=False, num_workers=0)
    opts = mmn_fast.FindOptions(concepts="all", max_new_tokens=6, batch_size=2, top_k=5)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "x")
    run_corpus(demo, "./data/manifest.jsonl", out, settings, opts)
    before = (out / "results.jsonl").read_bytes()
    assert run_corpus(demo, "data/manifest.jsonl", out, settings, opts)["images"] == 3  # the same corpus: a no-op rerun
    assert (out / "results.jsonl").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["corpus"] == str(tmp_path / "x" / "data" / "manifest.jsonl")
    monkeypatch.chdir(tmp_path / "y")
    with pytest.raises(mmn_fast.MMNError, match=r"different settings \(corpus\)"):
        run_corpus(demo, "data/manifest.jsonl", out, settings, opts)


def test_overwrite_removes_the_previous_runs_heatmaps_metrics_and_report(demo_path, tmp_path):
    manifest = save_examples(make_examples(2, seed=25), tmp_path / "imgs")
    mine = tmp_path / "mine"  # a folder that holds no run: --overwrite touches none of it
    (mine / "heatmaps").mkdir(parents=True)
    (mine / "report.html").write_text("the user's own")
    assert _find(demo_path, manifest, mine, "--overwrite") == 0
    assert (mine / "heatmaps").is_dir() and (mine / "report.html").read_text() == "the user's own"
    out = tmp_path / "out"
    assert _find(demo_path, manifest, out) == 0
    (out / "heatmaps" / "old").mkdir(parents=True)
    (out / "heatmaps" / "old" / "heatmaps.json").write_text("[]")
    for name in ("metrics.json", "report.html", "notes.txt"):
        (out / name).write_text("from the previous run")
    assert _find(demo_path, manifest, out, "--overwrite") == 0
    assert not (out / "heatmaps").exists() and not (out / "metrics.json").exists()
    assert not (out / "report.html").exists()
    assert (out / "notes.txt").read_text() == "from the previous run"  # not a name mmn writes: kept
    assert (out / "run.json").is_file()


def test_a_finished_run_without_parts_is_named_so(demo_path, tmp_path, capsys):
    manifest = save_examples(make_examples(2, seed=26), tmp_path / "imgs")
    out = tmp_path / "out"
    assert _find(demo_path, manifest, out) == 0
    for p in sorted((out / "parts").iterdir()):
        p.unlink()
    (out / "parts").rmdir()
    capsys.readouterr()
    assert _find(demo_path, manifest, out) == 2
    err = capsys.readouterr().err
    assert "without parts/" in err and "older layout" not in err and "--overwrite" in err
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(run, format_version=1)))
    assert _find(demo_path, manifest, out) == 2
    assert "older layout" in capsys.readouterr().err
    assert not (out / "parts").exists()


def test_nproc_checks_before_starting_processes(demo_path, corpus, reference_run, monkeypatch, capsys):
    """A resume with other settings is refused by the launcher itself: one line, exit 2, no torchrun."""
    import subprocess as sp

    def no_launch(*a, **k):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(sp, "Popen", no_launch)
    rc = _find(demo_path, corpus, reference_run, "--top-k", "5", "--nproc", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("mmn: error:")]
    assert len(lines) == 1 and "different settings (options, world_size)" in lines[0]
    rc = _find(demo_path, corpus, reference_run / "run.json" / "x", "--nproc", "2")
    assert rc == 2 and "--out must be a directory" in capsys.readouterr().err


def test_nproc_error_in_the_ranks_is_one_line_and_exit_2(demo_path, corpus, tmp_path):
    """An error only the ranks can find (a word the tokenizer does not know): the ranks' `mmn: error:`
    line, once, exit code 2; not torchrun's ChildFailedError traceback and exit 1."""
    cmd = _find_cmd(demo_path, corpus, tmp_path / "o", "--nproc", "2", "--concepts", "red,zyzzyva")
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [l for l in done.stderr.splitlines() if "mmn: error:" in l]
    assert len(lines) == 1 and "zyzzyva" in lines[0]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


# ------------------------------------------------------------------------------------ nothing silently replaced
def test_a_folder_that_is_not_a_run_keeps_its_files(demo_path, corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.jsonl").write_text("my own results\n")
    assert _find(demo_path, corpus, out) == 2
    assert "is not a find run but holds results.jsonl" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == "my own results\n" and not (out / "parts").exists()
    assert _find(demo_path, corpus, out, "--overwrite") == 0 and (out / "run.json").is_file()


def test_rerunning_a_finished_run_leaves_its_record_alone(demo_path, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _find(demo_path, corpus, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _find(demo_path, corpus, out) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # run.json's seconds too


def test_a_resumed_run_says_how_far_it_got(demo_path, corpus, tmp_path, monkeypatch, caplog):
    import logging

    import mmn_fast.run.runner as runner_mod

    real, calls = runner_mod._BatchRunner.flush, []

    def flush_then_stop(self, shard, samples):
        calls.append(shard)
        if len(calls) == 4:  # a few batches in: as if the process were stopped
            raise KeyboardInterrupt
        return real(self, shard, samples)

    monkeypatch.setattr(runner_mod._BatchRunner, "flush", flush_then_stop)
    out = tmp_path / "run"
    assert _find(demo_path, corpus, out, "--checkpoint-every", "1") == 130
    monkeypatch.setattr(runner_mod._BatchRunner, "flush", real)
    with caplog.at_level(logging.INFO, logger="mmn_fast"):
        assert _find(demo_path, corpus, out) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming:")]
    assert len(said) == 1 and said[0].endswith(" of 23 images done") and not said[0].startswith("resuming: 0 "), said
