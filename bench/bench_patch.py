"""pytest-benchmark: `pytest bench/bench_patch.py --benchmark-only` (not part of the test suite).

Apply + revert of a patch on the demo model (all 256 neurons) and of a 1,000-neuron patch on a
LLaMA-7B-shaped bf16 stack of out projections (bench/run_patch.py builds both and prints the table).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from run_patch import SPEC_7B, llama7b_outprojs, random_patch  # noqa: E402

import mmn_fast  # noqa: E402
from mmn_fast.demo import build_demo_model  # noqa: E402
from mmn_fast.model.live import apply_patch, resolve_target  # noqa: E402
from mmn_fast.model.patch_file import load_patch  # noqa: E402


@pytest.fixture(scope="module")
def demo_setup():
    eng = mmn_fast.load(build_demo_model(progress=False), device="cpu")
    return eng, random_patch(eng.adapter, eng.adapter.n_layers * eng.adapter.d_mlp)


@pytest.fixture(scope="module")
def llama7b_setup():
    model = llama7b_outprojs()
    return model, random_patch(resolve_target(model, SPEC_7B)[1], 1000)


def _cycle(target, patch, **spec):
    apply_patch(target, patch, **spec).revert()


def test_demo_apply_revert(benchmark, demo_setup):
    eng, patch = demo_setup
    benchmark.pedantic(_cycle, args=(eng, patch), rounds=50, warmup_rounds=3)


def test_llama7b_apply_revert_1000(benchmark, llama7b_setup):
    model, patch = llama7b_setup
    benchmark.pedantic(_cycle, args=(model, patch), kwargs=SPEC_7B, rounds=20, warmup_rounds=2)


def test_llama7b_apply_only_1000(benchmark, llama7b_setup):
    model, patch = llama7b_setup
    handles = []

    def apply():
        handles.append(apply_patch(model, patch, **SPEC_7B))

    def teardown():
        handles.pop().revert()

    benchmark.pedantic(apply, teardown=teardown, rounds=20, warmup_rounds=0)


def test_load_patch_1000(benchmark, llama7b_setup, tmp_path):
    _, patch = llama7b_setup
    path = patch.save(tmp_path / "p.mmnpatch.safetensors")
    benchmark.pedantic(load_patch, args=(path,), rounds=20, warmup_rounds=2)
