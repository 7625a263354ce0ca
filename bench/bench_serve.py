"""pytest-benchmark: `pytest bench/bench_serve.py --benchmark-only` (not part of the test suite).

One chat request, and a burst of 16 concurrent ones (base and 3 patches mixed), against `mmn serve` on the
demo model; bench/run_serve.py prints requests/s and latency percentiles at 1, 4 and 16 clients.
"""
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from run_serve import MODELS_MIXED, free_port, image_urls, load, start, write_patches  # noqa: E402

from mmn_fast.demo import build_demo_model  # noqa: E402


@pytest.fixture(scope="module")
def server():
    model, urls = build_demo_model(progress=False), image_urls()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start(model, port, write_patches(model, tmp) + ["--max-batch-size", "16"])
        yield f"http://127.0.0.1:{port}", urls
        proc.terminate()
        proc.wait(60)


def test_one_request(benchmark, server):
    base, urls = server
    benchmark.pedantic(load, args=(base, 1, 1, ["demo"], urls), rounds=20, warmup_rounds=2)


def test_sixteen_concurrent_mixed(benchmark, server):
    base, urls = server
    benchmark.pedantic(load, args=(base, 16, 16, MODELS_MIXED, urls), rounds=10, warmup_rounds=1)
