"""The `mmn` command: output files, and one-line errors (exit 2, no traceback) on bad input."""
import json
import re

import pytest

from mmn_fast.cli.main import main
from mmn_fast.demo import make_examples, save_examples
from mmn_fast.testing import random_images
from mmn_fast.testing.cli import one_line_error, run_cli


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, img in enumerate(random_images(3, size=32, seed=7)):
        img.save(d / f"img{i}.png")
    return d



def test_find_writes_the_output_contract(llava_path, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "find", "--model", llava_path, "--images", image_dir, "--out", out,
                         "--concepts", "all", "--top-k", "7", "--max-new-tokens", "6", "--batch-size", "2", "--quiet")
    assert rc == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines] == ["img0", "img1", "img2"]
    for rec in lines:
        assert set(rec) == {"id", "image", "prompt_ids", "output_ids", "caption", "concepts"}
        for c in rec["concepts"]:
            assert set(c) == {"word", "token_id", "step", "neurons"}
            assert rec["output_ids"][c["step"]] == c["token_id"]
            assert len(c["neurons"]) == 7
            scores = [n[2] for n in c["neurons"]]
            assert scores == sorted(scores, reverse=True)
    concepts = json.loads((out / "concepts.json").read_text())
    words = {c["word"].lower() for rec in lines for c in rec["concepts"]}
    assert set(concepts) == words
    for info in concepts.values():
        assert info["images"] >= 1 and info["neurons"][0]["count"] >= 1
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["top_k"] == 7 and run["weight_fingerprint"] and run["versions"]["torch"]
    assert "results written to" in stdout
    assert not list(out.glob("*.tmp"))


def test_teacher_forced_manifest(llava_path, image_dir, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": str(p), "caption": "a red dog", "id": p.stem})
                                  for p in sorted(image_dir.glob("*.png"))))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", manifest, "--out", out,
                      "--concepts", "red,dog", "--teacher-forced", "--quiet")
    assert rc == 0, err
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert [c["word"] for c in rec["concepts"]] == ["red", "dog"]



def test_missing_model_path(image_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "find", "--model", tmp_path / "nope", "--images", image_dir, "--out", tmp_path / "o")
    one_line_error(rc, err, "not a local Hugging Face checkpoint")


def test_corrupt_image(llava_path, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", d, "--out", tmp_path / "o", "--quiet")
    one_line_error(rc, err, "broken", "none of the 1 images")


def test_bad_images_among_good_ones_are_skipped_with_a_warning(llava_path, image_dir, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    good = sorted(image_dir.glob("*.png"))
    m.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in [good[0], tmp_path / "gone.png", good[1]]))
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", m, "--out", tmp_path / "o", "--quiet",
                      "--concepts", "all", "--max-new-tokens", "4")
    assert rc == 0 and "1 images skipped" in err and "Traceback" not in err
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 2
    assert "gone.png" in (tmp_path / "o" / "skipped.jsonl").read_text()


def test_missing_image_in_manifest(llava_path, tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"image": "does_not_exist.png"}) + "\n")
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", m, "--out", tmp_path / "o", "--quiet")
    one_line_error(rc, err, "does_not_exist.png", "missing file", "skipped.jsonl")


def test_unknown_concept_word(demo_path, image_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", image_dir, "--out", tmp_path / "o",
                      "--concepts", "red,zyzzyva", "--quiet")
    one_line_error(rc, err, "zyzzyva")


def test_model_without_recognisable_mlps(tmp_path, image_dir, capsys):
    from transformers import MptConfig, MptForCausalLM

    from mmn_fast.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    MptForCausalLM(MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=len(tok))).save_pretrained(tmp_path / "mpt")
    tok.save_pretrained(tmp_path / "mpt")
    rc, _, err = run_cli(capsys, "find", "--model", tmp_path / "mpt", "--images", image_dir, "--out", tmp_path / "o")
    one_line_error(rc, err, "could not find the decoder MLPs", "layers=")


def test_bad_option_values(llava_path, image_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", image_dir, "--out", tmp_path / "o",
                      "--top-k", "0", "--quiet")
    one_line_error(rc, err, "top_k")


def test_top_tokens_command(llava_path, tmp_path, capsys, monkeypatch):
    rc, out, err = run_cli(capsys, "top-tokens", "--model", llava_path, "--neuron", "L1.3", "-k", "4")
    lines = out.strip().splitlines()  # both ends, labelled: what it promotes firing positive, then negative
    assert rc == 0 and len(lines) == 10 and "L1.3 fires positive" in lines[0] and "fires negative" in lines[5]
    assert all(float(x.split()[-1]) < 0 for x in lines[6:]) and "mmn:" not in err
    rc, old, err = run_cli(capsys, "top-tokens", "--model", llava_path, "--layer", "1", "--neuron", "3", "-k", "4")
    assert rc == 0 and old == out and "mmn: note: --layer L --neuron I is deprecated" in err  # the old spelling
    rc, out, _ = run_cli(capsys, "top-tokens", "--model", llava_path, "--cache-dir", tmp_path / "c", "--quiet")
    assert rc == 0 and list((tmp_path / "c").glob("vocab-*.safetensors"))
    rc, _, err = run_cli(capsys, "top-tokens", "--model", llava_path, "--neuron", "L99.0")
    one_line_error(rc, err, "out of range")
    rc, _, err = run_cli(capsys, "top-tokens", "--model", llava_path, "--neuron", "1/3")
    one_line_error(rc, err, "L<layer>.<index>")


def test_top_tokens_caches_in_the_user_cache_not_the_model(llava_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMN_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in llava_path.iterdir())
    rc, out, _ = run_cli(capsys, "top-tokens", "--model", llava_path, "--quiet")
    assert rc == 0 and sorted(p.name for p in llava_path.iterdir()) == before
    assert list((tmp_path / "cache" / "top-tokens").rglob("vocab-*.safetensors")) and str(tmp_path / "cache") in out


def test_summary_and_demo_write_neurons_one_way(demo_path, tmp_path, capsys):
    """Neurons are written L<layer>.<index> in the find summary (and the demo, and top-tokens)."""
    images = tmp_path / "images"
    save_examples(make_examples(4, seed=5), images)
    rc, out, _ = run_cli(capsys, "find", "--model", demo_path, "--images", images / "manifest.jsonl", "--out",
                      tmp_path / "o", "--concepts", "all", "--max-new-tokens", "12", "--quiet")
    rows = [ln for ln in out.splitlines()[1:] if " x" in ln]
    assert rc == 0 and rows and all(re.search(r"\bL\d+\.\d+ x\d+", ln) for ln in rows), out


def test_out_that_is_a_file_is_one_line(llava_path, image_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("hi")
    for out in (f, f / "sub"):
        rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", image_dir, "--out", out, "--quiet")
        one_line_error(rc, err, "--out must be a directory", "afile")
    assert f.read_text() == "hi"


def test_torchrun_stderr_keeps_the_ranks_error_line_and_drops_the_launchers_traceback(capsys):
    """What `mmn find --nproc N` does with torchrun's stderr, on a stand-in launcher."""
    import sys

    from mmn_fast.cli.find import run_torchrun

    script = ("import sys, time; e = sys.stderr.buffer\n"
              "e.write(b'\\rfind:  10%|#'); e.flush(); time.sleep(0.05)\n"
              "e.write(b'\\n'); e.write(b'mmn: er'); e.flush(); time.sleep(0.05)\n"  # a mark split between reads
              "e.write(b'ror: unknown concept word\\nmmn: error: unknown concept word\\n')\n"
              "e.write(b'Traceback (most recent call last):\\n  ...\\nChildFailedError: mmn_fast FAILED\\n')\n"
              "sys.exit({rc})\n")
    assert run_torchrun([sys.executable, "-c", script.format(rc=1)]) == 2
    err = capsys.readouterr().err
    assert [l for l in err.splitlines() if "mmn: error:" in l] == ["mmn: error: unknown concept word"]
    assert "find:  10%" in err and "Traceback" not in err and "ChildFailedError" not in err
    plain = "import sys; sys.stderr.write('Traceback (most recent call last):\\nRuntimeError: bug\\n'); sys.exit(1)"
    assert run_torchrun([sys.executable, "-c", plain]) == 1                    # no mmn error: all of it, as is
    assert "RuntimeError: bug" in capsys.readouterr().err
    ok = "import sys; sys.stderr.write('mmn: warning: 1 images skipped\\n'); sys.exit(0)"
    assert run_torchrun([sys.executable, "-c", ok]) == 0
    assert "mmn: warning: 1 images skipped" in capsys.readouterr().err


def test_library_warnings_are_one_line_each(llava_path, image_dir, tmp_path, capsys, monkeypatch):
    """A library warning (here: no spaCy pipeline, so concepts fall back to all content words) reaches
    the CLI user as one `mmn:` line, without Python's file:line and category, once per run (not per
    batch: it used to break the progress bar)."""
    import mmn_fast.find.concepts as c

    monkeypatch.setattr(c.NounTagger, "available", property(lambda self: False))
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", image_dir, "--out", tmp_path / "o", "--quiet",
                      "--max-new-tokens", "4", "--batch-size", "1")
    lines = [ln for ln in err.splitlines() if "spaCy" in ln]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("mmn: no spaCy"), err
    assert "UserWarning" not in err and ".py:" not in err


@pytest.mark.parametrize("bad, message", [
    (("--top-k", "0"), "top_k must be at least 1"),
    (("--batch-size", "0"), "batch_size must be at least 1"),
    (("--concepts", "zebra"), "unknown concept word 'zebra'"),
    (("--images", "/nonexistent/corpus"), "does not exist"),
])
def test_find_checks_what_needs_no_model_before_loading_it(demo_path, image_dir, tmp_path, capsys, monkeypatch, bad,
                                                          message):
    """On a 7B model the load takes minutes: bad options are refused first."""
    import mmn_fast.cli.find as cli_find

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli_find, "load_engine", no_load)
    argv = {"--images": str(image_dir), "--out": str(tmp_path / "o")}
    argv.update({bad[0]: bad[1]} if bad[0] in argv else {})
    extra = [] if bad[0] in ("--images",) else list(bad)
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, *[x for kv in argv.items() for x in kv], "--quiet", *extra)
    one_line_error(rc, err, message)


def test_find_counts_distinct_concepts_like_the_report(demo_path, tmp_path, capsys):
    """The summary line counts concepts as concepts.json (and the report) do; mentions separately."""
    images = tmp_path / "images"
    save_examples(make_examples(6, seed=5), images)
    out = tmp_path / "o"
    rc, stdout, _ = run_cli(capsys, "find", "--model", demo_path, "--images", images / "manifest.jsonl", "--out", out,
                         "--concepts", "all", "--max-new-tokens", "12", "--quiet")
    n = len(json.loads((out / "concepts.json").read_text()))
    mentions = sum(len(json.loads(line)["concepts"]) for line in (out / "results.jsonl").read_text().splitlines())
    assert rc == 0 and n < mentions and f" {n} concepts ({mentions} mentions)," in stdout, stdout


def test_an_interrupted_find_says_how_to_resume(llava_path, image_dir, tmp_path, capsys, monkeypatch):
    import mmn_fast.cli.find as cli_find

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_find, "run_corpus", interrupted)
    rc, _, err = run_cli(capsys, "find", "--model", llava_path, "--images", image_dir, "--out", tmp_path / "o", "--quiet")
    assert rc == 130 and "run the same command again to resume" in err


def test_every_option_has_a_help_text_and_find_comes_first(capsys):
    """--help documents every option (with its default where it has one), lists find first, and
    --version answers."""
    import argparse

    from mmn_fast.cli.main import build_parser

    def missing(parser, name):
        out = []
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                out += [m for n, sp in a.choices.items() for m in missing(sp, f"{name} {n}")]
            elif not a.help:
                out.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
        return out

    assert missing(build_parser(), "mmn") == []
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.split("{")[1].startswith("find,")
    with pytest.raises(SystemExit):
        main(["find", "--help"])
    assert "neurons kept per concept (default: 50)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mmn_fast ")
