"""`mmn caption` and `mmn find --captions / --two-phase`: captions from the model or an OpenAI-compatible
server, written resumably, scored teacher-forced; equal to one-phase `mmn find` on the fp32 demo model."""
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmn_fast.demo import make_examples
from mmn_fast.io import cut_torn_tail
from mmn_fast.errors import MMNError
from mmn_fast.run.captions import MODEL_ERROR
from mmn_fast.run.chat_client import ChatClient
from mmn_fast.testing.cli import one_line_error, run_cli

BATCH = "3"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seven demo images (a batch of 3 leaves a short last one)."""
    d = tmp_path_factory.mktemp("demo_imgs")
    for i, (img, _caption) in enumerate(make_examples(7, seed=3)):
        img.save(d / f"im{i}.png")
    return d




def _find(capsys, model, corpus, out, *extra):
    rc, stdout, err = run_cli(capsys, "find", "--model", model, "--images", corpus, "--out", out, "--concepts", "all",
                           "--top-k", "10", "--batch-size", BATCH, "--num-workers", "0", "--quiet", *extra)
    assert rc == 0, err
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _caption(capsys, out, *source, extra=()):
    rc, stdout, err = run_cli(capsys, "caption", *source, "--images", *extra, "--out", out, "--batch-size", BATCH,
                           "--num-workers", "0", "--quiet")
    return rc, stdout, err


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _assert_same_neurons(a: dict, b: dict, rel=1e-4):
    """Same captions, same concepts, the same top-k neurons up to ties at the cut, scores within `rel`
    (relative to the concept's largest score: tiny scores carry the fp32 rounding of the big ones)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["output_ids"] == b[key]["output_ids"] and a[key]["caption"] == b[key]["caption"], key
        assert [c["word"] for c in a[key]["concepts"]] == [c["word"] for c in b[key]["concepts"]]
        for ca, cb in zip(a[key]["concepts"], b[key]["concepts"]):
            sa, sb = {(l, i): s for l, i, s in ca["neurons"]}, {(l, i): s for l, i, s in cb["neurons"]}
            tol = rel * max(abs(s) for s in sa.values())
            cut = min(sa.values())
            assert {n for n, s in sa.items() if s > cut + 2 * tol} <= set(sb), (key, ca["word"])
            for n in set(sa) & set(sb):
                assert abs(sa[n] - sb[n]) <= tol, (key, ca["word"], n, sa[n], sb[n])


def test_two_phase_and_caption_file_equal_one_phase(demo_path, corpus, tmp_path, capsys):
    one = _find(capsys, demo_path, corpus, tmp_path / "one")
    two = _find(capsys, demo_path, corpus, tmp_path / "two", "--two-phase")
    caps = tmp_path / "caps.jsonl"
    rc, stdout, err = _caption(capsys, caps, "--model", demo_path, extra=[corpus])
    assert rc == 0 and "7 captions written" in stdout, err
    lines = _lines(caps)
    assert [l["id"] for l in lines] == [f"im{i}" for i in range(7)]
    for line in lines:
        assert {"id", "image", "caption", "output_ids", "source", "model", "prompt", "max_new_tokens"} <= set(line)
        assert line["source"] == "engine" and line["caption"] == one[line["id"]]["caption"]
        assert line["output_ids"] == one[line["id"]]["output_ids"]
    given = _find(capsys, demo_path, corpus, tmp_path / "file", "--captions", caps)
    _assert_same_neurons(one, two)
    _assert_same_neurons(one, given)
    assert _lines(tmp_path / "two" / "captions.jsonl") == lines  # the same file, made inside the run
    runs = {d: json.loads((tmp_path / d / "run.json").read_text())["captions"] for d in ("one", "two", "file")}
    assert runs["one"] == {"mode": "generated", "source": "engine"}
    assert runs["two"]["mode"] == "two-phase" and runs["two"]["source"] == "engine"
    assert runs["file"]["mode"] == "file" and runs["file"]["source"] == str(caps.resolve())
    assert all(r["caption_source"] == "engine" for r in given.values())
    assert "caption_source" not in next(iter(one.values()))
    # a finished two-phase run, run again: nothing is captioned or scored again
    again = _find(capsys, demo_path, corpus, tmp_path / "two", "--two-phase")
    assert again == two and _lines(tmp_path / "two" / "captions.jsonl") == lines


def test_two_phase_resumes_after_a_kill(demo_path, corpus, tmp_path, capsys, monkeypatch):
    """Stopped after its first scored shard, the same command again scores the rest: the run equals
    an uninterrupted one."""
    import mmn_fast.run.runner as runner_mod

    shards = ("--shard-size", "3", "--checkpoint-every", "1")
    whole = _find(capsys, demo_path, corpus, tmp_path / "whole", "--two-phase", *shards)
    real = runner_mod._BatchRunner.flush

    def flush_then_stop(self, shard, samples):
        real(self, shard, samples)
        self.state.checkpoint()
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod._BatchRunner, "flush", flush_then_stop)
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", tmp_path / "cut",
                      "--concepts", "all", "--top-k", "10", "--batch-size", BATCH, "--num-workers", "0", "--quiet",
                      "--two-phase", *shards)
    assert rc == 130 and "resume" in err and not (tmp_path / "cut" / "run.json").exists()
    assert len(_lines(tmp_path / "cut" / "captions.jsonl")) == 7
    monkeypatch.setattr(runner_mod._BatchRunner, "flush", real)
    resumed = _find(capsys, demo_path, corpus, tmp_path / "cut", "--two-phase", *shards)
    assert resumed == whole


def test_caption_resumes_after_a_kill_and_refuses_other_settings(demo_path, corpus, tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    assert _caption(capsys, caps, "--model", demo_path, extra=[corpus])[0] == 0
    full = caps.read_text()
    lines = full.splitlines(keepends=True)
    caps.write_text("".join(lines[:3]) + lines[3][:25])  # three whole lines, then one torn mid-write
    rc, stdout, err = _caption(capsys, caps, "--model", demo_path, extra=[corpus])
    assert rc == 0 and "4 captions written" in stdout and "3 were there already" in stdout, err
    assert sorted(_lines(caps), key=lambda l: l["id"]) == sorted(map(json.loads, lines), key=lambda l: l["id"])
    assert _caption(capsys, caps, "--model", demo_path, extra=[corpus])[1].startswith("0 captions written")
    rc, _, err = _caption(capsys, caps, "--model", demo_path, "--prompt", "What is it?", extra=[corpus])
    one_line_error(rc, err, f"{caps}:1", "prompt", "--overwrite")
    rc, _, err = _caption(capsys, caps, "--model", demo_path, "--prompt", "What is it?", "--overwrite", extra=[corpus])
    assert rc == 0 and all(l["prompt"] == "What is it?" for l in _lines(caps)), err


@pytest.fixture(scope="module")
def served(demo):
    """`mmn serve`'s app on the demo model, in this process (uvicorn in a thread, a free port)."""
    import uvicorn

    from mmn_fast.serve.app import ServeSettings, create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(demo, ServeSettings("demo")), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_caption_server_equals_the_engine(demo_path, served, corpus, tmp_path, capsys):
    engine_caps, server_caps = tmp_path / "engine.jsonl", tmp_path / "server.jsonl"
    assert _caption(capsys, engine_caps, "--model", demo_path, extra=[corpus])[0] == 0
    rc, stdout, err = _caption(capsys, server_caps, "--server", served + "/v1", extra=[corpus])
    assert rc == 0 and f"by {served}/v1" in stdout, err
    by_engine, by_server = _lines(engine_caps), _lines(server_caps)
    assert [l["caption"] for l in by_server] == [l["caption"] for l in by_engine]
    assert all("output_ids" not in l and l["model"] == "demo" and l["source"] == served + "/v1" for l in by_server)
    # scored from the text: the same ids as the engine's (EOS aside), the same neurons
    one = _find(capsys, demo_path, corpus, tmp_path / "one")
    given = _find(capsys, demo_path, corpus, tmp_path / "given", "--captions", server_caps)
    for key, rec in given.items():
        assert rec["caption"] == one[key]["caption"] and rec["caption_source"] == served + "/v1"
        assert [c["word"] for c in rec["concepts"]] == [c["word"] for c in one[key]["concepts"]]
    two = _find(capsys, demo_path, corpus, tmp_path / "two", "--two-phase", "--server", served)
    assert [l["caption"] for l in _lines(tmp_path / "two" / "captions.jsonl")] == [l["caption"] for l in by_engine]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["captions"]["source"] == served
    assert {k: r["concepts"] for k, r in two.items()} == {k: r["concepts"] for k, r in given.items()}
    rc, _, err = _caption(capsys, tmp_path / "x.jsonl", "--server", served, "--served-model", "nope", extra=[corpus])
    one_line_error(rc, err, served, "no model 'nope'", "demo")


def test_caption_errors(demo_path, corpus, tmp_path, capsys):
    port = _free_port()
    rc, _, err = _caption(capsys, tmp_path / "c.jsonl", "--server", f"http://127.0.0.1:{port}", extra=[corpus])
    one_line_error(rc, err, f"no server answers at http://127.0.0.1:{port}")
    rc, _, err = _caption(capsys, tmp_path / "c.jsonl", extra=[corpus])
    one_line_error(rc, err, "--model", "--server")
    rc, _, err = _caption(capsys, tmp_path / "c.jsonl", "--server", "http://127.0.0.1:1", "--prefix", "An",
                          extra=[corpus])
    one_line_error(rc, err, "--prefix")


class _Flaky(BaseHTTPRequestHandler):
    """A chat server that answers 503 to every other request, and 401 to a wrong key."""
    calls = 0

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "flaky", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer k":
            return self._send(401, {"error": {"message": "bad key"}})
        type(self).calls += 1
        if type(self).calls % 2:
            return self._send(503, {"error": {"message": "busy"}})
        assert body["temperature"] == 0 and body["model"] == "flaky"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": " a thing "}}]})


def test_server_retries_busy_answers_and_names_fatal_ones(corpus, tmp_path, capsys):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        rc, _, err = _caption(capsys, tmp_path / "c.jsonl", "--server", url, "--api-key", "k", extra=[corpus])
        assert rc == 0, err
        assert [l["caption"] for l in _lines(tmp_path / "c.jsonl")] == ["a thing"] * 7
        rc, _, err = _caption(capsys, tmp_path / "d.jsonl", "--server", url, "--api-key", "wrong", extra=[corpus])
        one_line_error(rc, err, url, "401", "bad key")
    finally:
        httpd.shutdown()


def test_find_captions_errors_and_skips(demo_path, corpus, tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    good = [{"id": f"im{i}", "caption": "a red square"} for i in range(7)]
    caps.write_text(json.dumps(good[0]) + "\n{not json\n")
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", tmp_path / "o",
                      "--captions", caps, "--quiet")
    one_line_error(rc, err, f"{caps}:2", "not a JSON line")
    caps.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1])[:20])
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", tmp_path / "o",
                      "--captions", caps, "--quiet")
    one_line_error(rc, err, f"{caps}:2", "cut short")
    caps.write_text("".join(json.dumps(g) + "\n" for g in good[:5] + [{"id": "elsewhere", "caption": "a cat"}]))
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", tmp_path / "o",
                      "--captions", caps, "--quiet")
    one_line_error(rc, err, "1 of the 6 ids", "not in the corpus", "'elsewhere'")
    caps.write_text("".join(json.dumps(g) + "\n" for g in good[:5]))  # im5 and im6 have none
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", out, "--captions", caps,
                      "--concepts", "red,square", "--quiet", "--num-workers", "0")
    assert rc == 0 and "2 images skipped" in err, err
    skipped = _lines(out / "skipped.jsonl")
    assert [s["key"] for s in skipped] == ["im5", "im6"] and all("no caption for this id" in s["reason"]
                                                                  for s in skipped)
    results = _lines(out / "results.jsonl")
    assert [r["id"] for r in results] == [f"im{i}" for i in range(5)]
    assert all([c["word"] for c in r["concepts"]] == ["red", "square"] for r in results)
    assert all(r["caption_source"] == str(caps.resolve()) for r in results)
    # the file changed under the run: refused on resume
    (out / "run.json").unlink()
    caps.write_text("".join(json.dumps(g) + "\n" for g in good[:4]))
    rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", out, "--captions", caps,
                      "--concepts", "red,square", "--quiet", "--num-workers", "0")
    one_line_error(rc, err, "changed since the run")
    for extra, needle in (([ "--teacher-forced"], "--teacher-forced"), (["--two-phase"], "--two-phase"),
                          (["--server", "http://x"], "--server")):
        rc, _, err = run_cli(capsys, "find", "--model", demo_path, "--images", corpus, "--out", tmp_path / "p",
                          *(["--captions", caps] if extra[0] != "--server" else []), *extra, "--quiet")
        one_line_error(rc, err, needle)


def test_cut_torn_tail(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b"')
    assert cut_torn_tail(p) == 4 and p.read_bytes() == b'{"a": 1}\n'
    assert cut_torn_tail(p) == 0
    p.write_bytes(b"no newline at all")
    assert cut_torn_tail(p) == 17 and p.read_bytes() == b""


def test_a_last_line_without_its_newline_is_captioned_again_and_wrong_files_are_left_alone(demo_path, corpus,
                                                                                          tmp_path, capsys):
    """A kill between a line's JSON and its newline leaves a parseable last line: it counts as torn (cut and
    its image captioned again), never as done. A file of other settings is refused before anything is cut."""
    caps = tmp_path / "caps.jsonl"
    assert _caption(capsys, caps, "--model", demo_path, extra=[corpus])[0] == 0
    lines = caps.read_text().splitlines(keepends=True)
    caps.write_text("".join(lines[:4]) + lines[4].rstrip("\n"))  # the fifth line whole, but no newline
    rc, stdout, err = _caption(capsys, caps, "--model", demo_path, extra=[corpus])
    assert rc == 0 and "3 captions written" in stdout and "4 were there already" in stdout, err
    assert sorted(l["id"] for l in _lines(caps)) == sorted(json.loads(l)["id"] for l in lines)
    other = tmp_path / "other.jsonl"
    changed = {**json.loads(lines[0]), "prompt": "Another prompt."}
    other.write_text(json.dumps(changed) + "\n" + lines[1].rstrip("\n"))
    before = other.read_bytes()
    rc, _, err = _caption(capsys, other, "--model", demo_path, extra=[corpus])
    one_line_error(rc, err, "other settings")
    assert other.read_bytes() == before  # nothing cut from a file that is not this run's


def test_a_corpus_with_a_repeated_id_is_refused_before_a_second_line(demo_path, tmp_path, capsys):
    """A Parquet id column is taken as given: the caption phase refuses a repeated id instead of writing it
    twice (which would make the file unreadable: one caption per id)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = []
    for img, _c in make_examples(2, seed=4):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        raw.append(buf.getvalue())
    pq.write_table(pa.table({"png": pa.array(raw, pa.binary()), "id": ["same", "same"]}), tmp_path / "a.parquet")
    caps = tmp_path / "caps.jsonl"
    rc, _, err = _caption(capsys, caps, "--model", demo_path, extra=[tmp_path / "a.parquet"])
    one_line_error(rc, err, "'same' twice")
    assert len([l for l in caps.read_text().splitlines() if l.strip()]) <= 1


def test_images_the_model_failed_on_are_captioned_again_on_resume(demo_path, corpus, tmp_path, capsys):
    """A line whose error came from the model (out of memory, ...) is dropped when the run resumes (the file
    rewritten atomically) and its image captioned again; every other line stays as it was."""
    caps = tmp_path / "caps.jsonl"
    assert _caption(capsys, caps, "--model", demo_path, extra=[corpus])[0] == 0
    lines = [json.loads(l) for l in caps.read_text().splitlines()]
    failed = {k: v for k, v in lines[2].items() if k not in ("caption", "output_ids")}
    failed["error"] = f"{MODEL_ERROR}: OutOfMemoryError: CUDA out of memory"
    caps.write_text("".join(json.dumps(r) + "\n" for r in lines[:2] + [failed] + lines[3:]))
    rc, stdout, err = _caption(capsys, caps, "--model", demo_path, extra=[corpus])
    assert rc == 0 and "1 captions written" in stdout, (stdout, err)
    again = {r["id"]: r for r in _lines(caps)}
    assert again == {r["id"]: r for r in lines}  # the same caption, made again


class _Busy(_Flaky):
    """Always busy, and asks to be tried again in a long while."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps({"error": {"message": "busy"}}).encode()
        self.send_response(503)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "25")
        self.end_headers()
        self.wfile.write(data)


def test_closing_the_client_stops_its_retries_at_once():
    """Ctrl-C (the caption phase closes its client) must not leave threads sleeping through their retries."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = ChatClient(f"http://127.0.0.1:{httpd.server_address[1]}", retries=5)
        errors = []
        worker = threading.Thread(target=lambda: errors.append(_raises(
            lambda: client.caption(make_examples(1, seed=1)[0][0], "Describe the image.", 4))))
        worker.start()
        time.sleep(0.5)  # the first answer (503, try again in 25 s) has come: the thread waits
        client.close()
        worker.join(timeout=10)
        assert not worker.is_alive() and errors and "stopped" in str(errors[0])
    finally:
        httpd.shutdown()


def _raises(fn):
    try:
        fn()
    except MMNError as e:
        return e
    return None
