"""pytest-benchmark: `pytest bench/bench_request_patches.py --benchmark-only` (not part of the test suite).

Caption of a batch of 16 on the benchmark's random LLaVA unpatched vs with 4 distinct 20-neuron patches
(bench/run_request_patches.py prints the ratio table side by side).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from common import LARGE, NEW_TOKENS, random_llava_engine  # noqa: E402
from run_request_patches import BATCH, N_PATCHES, random_patches  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    engine, images = random_llava_engine(shape=LARGE)
    images = (images * (BATCH // len(images) + 1))[:BATCH]
    return engine, images, random_patches(engine, N_PATCHES, 20)


def test_caption_unpatched(benchmark, setup):
    engine, images, _ = setup
    benchmark.pedantic(engine.caption, args=(images,), kwargs=dict(max_new_tokens=NEW_TOKENS, batch_size=BATCH),
                       rounds=3, warmup_rounds=1)


def test_caption_four_patches(benchmark, setup):
    engine, images, patches = setup
    rows = [patches[i % N_PATCHES] for i in range(BATCH)]
    benchmark.pedantic(engine.caption, args=(images,),
                       kwargs=dict(max_new_tokens=NEW_TOKENS, batch_size=BATCH, patches=rows), rounds=3, warmup_rounds=1)
