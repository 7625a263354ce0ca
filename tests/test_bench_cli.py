"""`mmn bench`: the table and the JSON report on the tiny LLaVA, and one-line errors (exit 2, no traceback).
No timing is asserted (the machine is shared and noisy): only that every figure is there and sane."""
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from mmn_fast.cli.main import main
from mmn_fast.run.bench import BenchSettings, noise_images
from mmn_fast.testing import random_images
from mmn_fast.testing.cli import one_line_error

TINY = ("--n-images", "2", "--max-new-tokens", "3", "--repeats", "1", "--device", "cpu")
PHASES = ("caption", "find", "scoring")


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err



def _positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def report(llava_path, tmp_path_factory):
    """One run of the CLI with tiny numbers, batch sizes 1 and 2 (stdout, stderr, report)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        rc = main(["bench", "--model", str(llava_path), "--batch-size", "1", "2", *TINY, "--json", str(out)])
    assert rc == 0, stderr.getvalue()
    return stdout.getvalue(), stderr.getvalue(), out


def test_json_report_has_every_field_with_sane_values(report, llava_path):
    _, _, path = report
    r = json.loads(path.read_text())
    assert r["format"] == "mmn-bench" and r["format_version"] == 1
    assert r["model"]["source"] == str(llava_path) and r["model"]["class"] == "LlavaForConditionalGeneration"
    assert r["model"]["neurons"] == r["model"]["n_layers"] * r["model"]["d_mlp"] > 0
    assert r["device"]["type"] == "cpu" and r["device"]["name"] and r["device"]["copy_gb_per_s"] is None
    assert r["dtype"] == "float32" and r["backend"] == "torch"
    v = r["versions"]
    assert v["torch"] == torch.__version__ and v["transformers"] and v["mmn_fast"] and "triton" in v
    s = r["settings"]
    assert s["batch_sizes"] == [1, 2] and s["n_images"] == 2 and s["max_new_tokens"] == 3 and s["repeats"] == 1
    assert s["images"].startswith("random ") and s["prompt_tokens"] > 0 and s["warmup_batches"] == 1
    assert r["rss_method"] in ("VmHWM", "ru_maxrss")
    assert [row["batch_size"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["images"] == 2
        for key in ("caption", "find", "scoring", "two_phase"):
            assert _positive(row[f"{key}_s"]) and _positive(row[f"{key}_images_per_s"])
        assert math.isclose(row["two_phase_s"], row["caption_s"] + row["scoring_s"])
        assert _positive(row["find_overhead"]) and _positive(row["two_phase_overhead"])
        assert math.isclose(row["find_overhead"], row["find_s"] / row["caption_s"])
        assert 0 < row["caption_tokens_per_image"] <= 3
        assert row["concepts"] > 0 and row["concepts_two_phase"] == row["concepts"]  # the same captions
        assert math.isclose(row["neurons_per_s"], row["concepts"] * r["model"]["neurons"] / row["find_s"])
        assert all(len(row["times_s"][p]) == 1 for p in PHASES)
        assert row["cuda_peak_mib"] is None and row["act_score"] is None  # CPU
        assert set(row["rss_increase_mib"]) == set(PHASES)
    assert not list(path.parent.glob("*.tmp"))


def test_table_prints_one_row_per_batch_size(report):
    stdout, stderr, path = report
    assert "Traceback" not in stderr
    assert "caption img/s" in stdout and "find/caption" in stdout and "neurons/s" in stdout
    assert "n/a (CUDA only)" in stdout and "RSS growth MiB" in stdout
    rows = [ln.split() for ln in stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "1", "2"]  # throughput table, then memory / kernel table
    assert "torch " + torch.__version__ in stdout and "figures written to" in stdout
    assert "bench" in stderr  # the progress bar (no --quiet)


def test_quiet_folder_of_images(llava_path, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, img in enumerate(random_images(3, size=32, seed=3)):
        img.save(d / f"img{i}.png")
    rc, out, err = _run(capsys, "bench", "--model", llava_path, "--images", d, "--batch-size", "2", *TINY,
                        "--quiet", "--concepts", "all")
    assert rc == 0, err
    assert str(d) in out and "bench:" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needles", [
    (("--batch-size", "0"), ("--batch-size", "at least 1")),
    (("--batch-size", "4", "--n-images", "2"), ("--n-images 2", "--batch-size 4")),
    (("--repeats", "0"), ("--repeats",)),
    (("--max-new-tokens", "0"), ("--max-new-tokens",)),
])
def test_bad_numbers_are_one_line_before_the_model_loads(llava_path, capsys, monkeypatch, argv, needles):
    import mmn_fast.cli.bench as cli_bench

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_bench, "load_engine", no_load)
    rc, _, err = _run(capsys, "bench", "--model", llava_path, "--device", "cpu", *argv)
    one_line_error(rc, err, *needles)


def test_missing_model_is_one_line(capsys):
    rc, _, err = _run(capsys, "bench", "--batch-size", "1")
    one_line_error(rc, err, "--model is required")


def test_model_path_that_is_no_checkpoint(tmp_path, capsys):
    rc, _, err = _run(capsys, "bench", "--model", tmp_path / "nope", "--device", "cpu")
    one_line_error(rc, err, "not a local Hugging Face checkpoint")


def test_bad_images_and_json_paths(llava_path, tmp_path, capsys):
    rc, _, err = _run(capsys, "bench", "--model", llava_path, "--images", tmp_path / "none", "--device", "cpu")
    one_line_error(rc, err, "does not exist")
    rc, _, err = _run(capsys, "bench", "--model", llava_path, "--json", tmp_path / "no" / "b.json", "--device", "cpu")
    one_line_error(rc, err, "--json", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not an image")
    rc, _, err = _run(capsys, "bench", "--model", llava_path, "--images", empty, "--batch-size", "1", *TINY)
    one_line_error(rc, err, "no readable image")


def test_defaults_follow_the_device():
    cpu = BenchSettings().resolved("cpu")
    assert cpu.batch_sizes == [1, 8] and cpu.n_images == 16 and cpu.max_new_tokens == 32 and cpu.repeats == 3
    cuda = BenchSettings().resolved("cuda")
    assert cuda.batch_sizes == [8, 32] and cuda.n_images == 64
    assert BenchSettings(batch_sizes=[4, 1, 4]).resolved("cpu").batch_sizes == [4, 1]
    imgs = noise_images(2, 20, seed=1)
    assert [im.size for im in imgs] == [(20, 20)] * 2 and imgs[0].mode == "RGB"


def test_timing_helpers_on_cpu():
    """The helpers the CUDA rows use (mmn_fast.kernels.timing), run on CPU with the torch op."""
    from mmn_fast.kernels.timing import act_score_bandwidth, copy_bandwidth, median, wall_times

    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5
    calls = []
    times, result = wall_times(lambda: calls.append(1) or len(calls), 3, "cpu", after_each=lambda: calls.append(0))
    assert len(times) == 3 and all(t >= 0 for t in times) and result == 5
    assert copy_bandwidth("cpu", 1 << 16, repeats=2) > 0
    seconds, bps = act_score_bandwidth(12, 40, torch.float32, "cpu", "torch", repeats=2, captured=2)
    assert seconds > 0 and bps > 0


def test_moe_models_count_every_expert_neuron():
    import mmn_fast
    from mmn_fast.run.bench import scored_neurons
    from mmn_fast.testing.zoo import ZOO_MODELS

    model, processor = ZOO_MODELS["llava_deepseek_moe"]()
    engine = mmn_fast.load(model, processor=processor, device="cpu")
    ad = engine.adapter
    assert ad.is_moe
    expected = sum(ad.out_weight(l).shape[1] if b is None else (b.n_experts + (b.shared is not None)) * b.d_expert
                   for l, b in enumerate(ad.experts))
    assert scored_neurons(engine) == expected > ad.n_layers * ad.d_mlp
