"""`mmn serve` throughput and latency on the demo model (CPU), side by side in one run.

    python bench/run_serve.py [--requests 160] [--max-batch-size 16] [--batch-wait-ms 10]

Starts the server (a subprocess on a free port, 3 random patches loaded) and sends chat requests
(one 64x64 demo image, greedy, up to 16 new tokens) from 1, 4 and 16 concurrent clients, the base
model only and mixed (base and the 3 patches in turn). Prints requests/s, p50 and p95 latency, and
each row's requests/s over 1 client's (16 sequential requests at 1 client is the baseline).
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

import mmn_fast
from mmn_fast.demo import build_demo_model, make_examples
from mmn_fast.model.patch_file import make_patch

MODELS_MIXED = ["demo", "a", "b", "c"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_patches(model_path, folder) -> list[str]:
    engine = mmn_fast.load(model_path, device="cpu")
    ad = engine.adapter
    args = []
    for k, name in enumerate(("a", "b", "c")):
        g = torch.Generator().manual_seed(k)
        layer = 1 + k % (ad.n_layers - 1)
        idx = torch.arange(24 * k, 24 * k + 24) % ad.d_mlp
        patch = make_patch(ad, {layer: (idx, 3 * torch.randn(24, ad.out_weight(layer).shape[0], generator=g))}, "bench")
        args += ["--patch", f"{name}={patch.save(os.path.join(folder, name + '.mmnpatch.safetensors'))}"]
    return args


def start(model_path, port, extra) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mmn_fast", "serve", "--model", str(model_path),
                             "--served-model-name", "demo", "--port", str(port), "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(400):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def image_urls(n: int = 8) -> list[str]:
    """n demo images (64x64 PNG) as data URLs."""
    urls = []
    for img, _ in make_examples(n, seed=5):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def body(model: str, url: str) -> dict:
    return {"model": model, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}]}


def load(base: str, clients: int, requests: int, models: list[str], urls: list[str]) -> dict:
    """`requests` requests spread over `clients` threads; (req/s, p50 s, p95 s)."""
    latencies, errors = [], []
    lock = threading.Lock()
    per = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]

    def client(c: int):
        with httpx.Client(timeout=120) as http:
            for k in range(per[c]):
                j = c * 1000 + k
                t0 = time.perf_counter()
                r = http.post(base + "/v1/chat/completions", json=body(models[j % len(models)], urls[j % len(urls)]))
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} failed requests: {errors[:2]}")
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"rps": len(latencies) / wall, "p50": statistics.median(latencies), "p95": q[18]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=160, help="requests per row with 4 and 16 clients (10 per client at 16)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=10)
    args = ap.parse_args(argv)
    model, urls = build_demo_model(progress=False), image_urls()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start(model, port, write_patches(model, tmp) + ["--max-batch-size", str(args.max_batch_size),
                                                                 "--batch-wait-ms", str(args.batch_wait_ms)])
        base = f"http://127.0.0.1:{port}"
        try:
            load(base, 4, 16, MODELS_MIXED, urls)  # warm-up
            rows = {}
            for name, models in (("base only", ["demo"]), ("mixed: base + 3 patches", MODELS_MIXED)):
                for clients in (1, 4, 16):
                    rows[(name, clients)] = load(base, clients, args.requests if clients > 1 else 16, models, urls)
        finally:
            proc.terminate()
            proc.wait(60)
    cpu = platform.processor() or platform.machine()
    print(f"# mmn serve, demo model, CPU ({cpu}, {os.cpu_count()} cores), torch {torch.__version__}, "
          f"--max-batch-size {args.max_batch_size} --batch-wait-ms {args.batch_wait_ms:g}, "
          f"{args.requests} requests per row (16 at 1 client)\n")
    print("| requests | clients | req/s | p50 ms | p95 ms | req/s vs 1 client |\n|---|---|---|---|---|---|")
    for (name, clients), r in rows.items():
        one = rows[(name, 1)]["rps"]
        print(f"| {name} | {clients} | {r['rps']:.1f} | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} | "
              f"{r['rps'] / one:.2f} |")


if __name__ == "__main__":
    main()
