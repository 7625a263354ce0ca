"""pytest-benchmark: `pytest bench/bench_find.py --benchmark-only` (not part of the test suite)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from common import NEW_TOKENS, find, plain_generate, random_llava_engine, reference  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    return random_llava_engine()


def test_plain_generate(benchmark, setup):
    eng, imgs = setup
    benchmark.pedantic(plain_generate, args=(eng, imgs, NEW_TOKENS), rounds=3, warmup_rounds=1)


def test_find(benchmark, setup):
    eng, imgs = setup
    res = benchmark.pedantic(find, args=(eng, imgs, NEW_TOKENS), rounds=3, warmup_rounds=1)
    assert len(res) == len(imgs)


def test_find_grad(benchmark, setup):
    eng, imgs = setup
    benchmark.pedantic(find, args=(eng, imgs, NEW_TOKENS), kwargs={"method": "grad"}, rounds=1)


def test_reference(benchmark, setup):
    eng, imgs = setup
    benchmark.pedantic(reference, args=(eng, imgs[:2], NEW_TOKENS), rounds=1)
