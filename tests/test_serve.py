"""`mmn serve`: the real server as a subprocess on a free 127.0.0.1 port, called with the official `openai`
client and raw HTTP. Every answer equals the engine's offline caption with the same patch."""
import base64
import gc
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

import httpx
import pytest
import torch
from PIL import Image

import mmn_fast
from mmn_fast.demo import make_examples
from mmn_fast.model.patch_file import make_patch

openai = pytest.importorskip("openai")
KEY = "test-key"
PROMPT = "Describe the image."
PATCH_SPECS = {"a": (2, 0, 1), "b": (3, 1, 2), "c": (1, 2, 3), "d": (2, 3, 4)}  # name: (layer, neuron block, seed)


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def messages(img, text=PROMPT):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": text}]}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "mmn_fast", "serve", *map(str, args), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not start")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def patch_files(demo, tmp_path_factory):
    """Four patches of the demo model, each giving 24 neurons of one layer new random vectors."""
    d = tmp_path_factory.mktemp("patches")
    ad = demo.adapter
    files = {}
    for name, (layer, block, seed) in PATCH_SPECS.items():
        g = torch.Generator().manual_seed(seed)
        idx = torch.arange(24 * block, 24 * block + 24) % ad.d_mlp
        vectors = 3 * torch.randn(24, ad.out_weight(layer).shape[0], generator=g)
        files[name] = make_patch(ad, {layer: (idx, vectors)}, "test", {"source": name}).save(d / f"{name}.mmnpatch.safetensors")
    return files


@pytest.fixture(scope="module")
def offline(demo_path, patch_files):
    engine = mmn_fast.load(demo_path, device="cpu")
    for name, path in patch_files.items():
        engine.patches.load(name, path)
    return engine


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    make_examples(1, seed=11)[0][0].save(d / "ok.png")
    return d


@pytest.fixture(scope="module")
def server(demo_path, patch_files, media):
    port = free_port()
    args = ["--model", demo_path, "--served-model-name", "demo", "--api-key", KEY, "--allow-runtime-patches",
            "--allowed-media-path", media, "--max-image-pixels", 200 * 200, "--max-tokens", 64, "--max-batch-size", 8,
            "--batch-wait-ms", 20]
    for name in ("a", "b", "c"):
        args += ["--patch", f"{name}={patch_files[name]}"]
    proc = start_server(args, port)
    yield proc, f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body=None, key=KEY, content=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server[1] + path, json=body, content=content, headers=headers, timeout=60)


IMAGES = [img for img, _ in make_examples(6, seed=21)]


@pytest.mark.parametrize("model", ["demo", "a", "b"])
def test_chat_equals_the_offline_caption(client, offline, model):
    for img, text, n in ((IMAGES[0], PROMPT, 12), (IMAGES[1], "What is in the picture?", 5)):
        r = client.chat.completions.create(model=model, messages=messages(img, text), max_tokens=n, temperature=0)
        want = offline.caption([img], prompt=text, max_new_tokens=n, patches=[None if model == "demo" else model])[0]
        assert r.choices[0].message.content == want
        assert r.model == model and r.usage.completion_tokens <= n and r.usage.prompt_tokens > 0


def test_patches_change_answers_and_streaming_concatenates(client, offline):
    answers = {m: client.chat.completions.create(model=m, messages=messages(IMAGES[2]), max_tokens=16,
                                                 temperature=0).choices[0].message.content for m in ("demo", "a", "b", "c")}
    assert len(set(answers.values())) >= 3
    stream = client.chat.completions.create(model="a", messages=messages(IMAGES[2]), max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        usage = chunk.usage or usage
    assert "".join(parts) == answers["a"] and reasons[-1] in ("stop", "length") and usage.completion_tokens > 0


def test_sampling_is_seeded_and_stop_strings_cut(client):
    kw = dict(model="demo", messages=messages(IMAGES[3]), max_tokens=12, temperature=1.0, seed=7)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first
    full = client.chat.completions.create(model="demo", messages=messages(IMAGES[3]), max_tokens=12,
                                          temperature=0).choices[0].message.content
    word = full.split()[1]
    cut = client.chat.completions.create(model="demo", messages=messages(IMAGES[3]), max_tokens=12, temperature=0,
                                         stop=[word])
    assert cut.choices[0].message.content == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"


def test_models_and_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo", "a", "b", "c"]
    assert all(m.parent == "demo" for m in models[1:]) and models[0].parent is None
    text = httpx.get(server[1] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("mmn_requests_total", "mmn_queue_depth", "mmn_batch_size_bucket", "mmn_request_latency_seconds",
                 "mmn_generated_tokens_total", "mmn_tokens_per_second", "mmn_loaded_patches"):
        assert name in text


def test_neurons_endpoint(server, offline):
    r = post(server, "/v1/neurons", {"model": "a", "messages": messages(IMAGES[0]), "max_tokens": 8, "top_k": 3,
                                     "concepts": "all", "top_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    want = offline.find([IMAGES[0]], patches=["a"], concepts="all", top_k=3, max_new_tokens=8, prompt=PROMPT)[0]
    assert body["caption"] == want.caption
    got = [[(n["layer"], n["index"]) for n in c["neurons"]] for c in body["concepts"]]
    assert got == [[(l, i) for l, i, _ in c.neurons] for c in want.concepts] and got
    assert all(len(n["top_tokens"]) == 2 for c in body["concepts"] for n in c["neurons"])


def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(server, media, tmp_path):
    ok = messages(IMAGES[0])
    big = Image.new("RGB", (300, 300), "red")
    outside = tmp_path / "outside.png"
    IMAGES[0].save(outside)
    hostile = tmp_path / "evil.mmnpatch.safetensors"
    hostile.write_bytes(b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle, not safetensors
    cases = [
        (dict(content=b'{"model": "demo", "messages": ['), 400, "not valid JSON"),
        (dict(body={"model": "nope", "messages": ok}), 404, "does not exist"),
        (dict(body={"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
            {"type": "text", "text": "hi"}]}]}), 400, "not a readable image"),
        (dict(body={"model": "demo", "messages": messages(big)}), 400, "over the limit"),
        (dict(body={"model": "demo", "messages": [{"role": "user", "content": ok[0]["content"] * 2}]}), 400,
         "at most 1"),
        (dict(body={"model": "demo", "messages": ok, "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={"model": "demo", "messages": ok, "max_tokens": 65}), 400, "max_tokens"),
        (dict(body={"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{outside}"}}]}]}), 403, "outside the allowed"),
        (dict(body={"model": "demo", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}), 400, "network"),
        (dict(body={"model": "demo", "messages": ok}, key=None), 401, "API key"),
        (dict(body={"model": "demo", "messages": ok}, key="wrong"), 401, "API key"),
    ]
    for kwargs, status, words in cases:
        r = post(server, "/v1/chat/completions", **kwargs)
        assert r.status_code == status, (kwargs.get("body", kwargs.get("content")), r.text)
        assert words in r.json()["error"]["message"]
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": str(hostile)})
    assert r.status_code == 400 and "not a safetensors file" in r.json()["error"]["message"]
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(server[1] + "/health").status_code == 200  # no key needed
    inside = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{media / 'ok.png'}"}},
                                           {"type": "text", "text": PROMPT}]}]
    assert post(server, "/v1/chat/completions", {"model": "demo", "messages": inside, "max_tokens": 4}).status_code == 200
    assert post(server, "/v1/chat/completions", {"model": "demo", "messages": ok, "max_tokens": 4}).status_code == 200


def test_load_mixed_models_while_a_patch_is_loaded_and_unloaded(server, client, offline, patch_files):
    models = ["demo", "a", "b", "c"]
    imgs = IMAGES[:4]
    expected = {(m, i): offline.caption([img], max_new_tokens=10, patches=[None if m == "demo" else m])[0]
                for m in models for i, img in enumerate(imgs)}
    pid = server[0].pid
    failures, stop = [], threading.Event()

    def worker(seed, n=25):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            m, i = models[int(torch.randint(0, 4, (1,), generator=g))], int(torch.randint(0, 4, (1,), generator=g))
            try:
                r = client.chat.completions.create(model=m, messages=messages(imgs[i]), max_tokens=10, temperature=0)
                if r.choices[0].message.content != expected[(m, i)]:
                    failures.append((m, i, r.choices[0].message.content, expected[(m, i)]))
            except Exception as e:  # noqa: BLE001 - a 5xx or a dropped connection is a failure
                failures.append((m, i, repr(e)))

    def churn():
        while not stop.is_set():
            assert post(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(patch_files["d"])}
                        ).status_code == 200
            r = client.chat.completions.create(model="d", messages=messages(imgs[0]), max_tokens=4)
            assert r.choices[0].message.content
            assert post(server, "/v1/unload_lora_adapter", {"lora_name": "d"}).status_code == 200

    # warm-up (allocator pools, batch shapes up to 8 rows), so RSS after measures what a patch leaves behind
    warm = [threading.Thread(target=worker, args=(100 + s, 4)) for s in range(8)]
    for t in warm:
        t.start()
    for t in warm:
        t.join(600)
    rss_before = rss_kb(pid)
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    churner = threading.Thread(target=churn)
    churner.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    stop.set()
    churner.join(60)
    assert not any(t.is_alive() for t in threads) and not churner.is_alive()
    assert not failures, failures[:3]
    assert "d" not in [m.id for m in client.models.list().data]
    assert rss_kb(pid) <= rss_before * 1.05


def test_sigterm_finishes_in_flight_requests_and_exits_0(demo_path):
    port = free_port()
    proc = start_server(["--model", demo_path, "--served-model-name", "demo", "--batch-wait-ms", 1500], port)
    result = {}

    def call():
        result["r"] = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                                 json={"model": "demo", "messages": messages(IMAGES[0]), "max_tokens": 6})

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.7)  # the request now waits in the batcher for companions
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert proc.wait(60) == 0
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"]


def test_unloaded_patch_is_freed_in_process(demo, patch_files):
    from fastapi.testclient import TestClient

    from mmn_fast.serve.app import ServeSettings, create_app

    engine = mmn_fast.load(demo.source, device="cpu")
    with TestClient(create_app(engine, ServeSettings("demo", allow_runtime_patches=True))) as c:
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(patch_files["d"])}).status_code == 200
        ref = weakref.ref(engine.patches.get("d"))
        r = c.post("/v1/chat/completions", json={"model": "d", "messages": messages(IMAGES[0]), "max_tokens": 4})
        assert r.status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "d"}).status_code == 200
        gc.collect()
        assert ref() is None  # no live reference left anywhere (batcher, plan, hooks)
