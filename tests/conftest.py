"""Shared fixtures: tiny random-weight checkpoints saved to disk, and the trained demo model."""
from __future__ import annotations

import os

import torch

# Triton kernels (mmn_fast.kernels, backend="triton") run under triton's CPU interpreter unless a
# CUDA device is present. The switch must be set before anything imports triton, and the imports
# below already do (transformers -> torch._dynamo), so it is set here rather than in the test files.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import mmn_fast  # noqa: E402
from mmn_fast.testing import random_images, tiny_instructblip, tiny_llava, tiny_mplug_owl2
from mmn_fast.testing.zoo import ZOO_MODELS, save  # noqa: E402


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def llava(llava_path):
    return mmn_fast.load(llava_path, device="cpu")


@pytest.fixture(scope="session")
def llava64(llava_path):
    return mmn_fast.load(llava_path, device="cpu", dtype="float64")


@pytest.fixture(scope="session")
def instructblip_path(tmp_path_factory):
    return tiny_instructblip(tmp_path_factory.mktemp("instructblip"))


@pytest.fixture(scope="session")
def mplug_path(tmp_path_factory):
    return tiny_mplug_owl2(tmp_path_factory.mktemp("mplug"))


@pytest.fixture(scope="session")
def images():
    return random_images(8, size=32, seed=0)


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    """The trained demo model. Built fresh per session unless MMN_CACHE points at a cache."""
    from mmn_fast.demo import build_demo_model

    cache = os.environ.get("MMN_CACHE") or tmp_path_factory.mktemp("demo_cache")
    return build_demo_model(cache, progress=False)


@pytest.fixture(scope="session")
def demo(demo_path):
    return mmn_fast.load(demo_path, device="cpu")


@pytest.fixture(scope="module", params=["qwen3_vl_moe", "glm4v_moe", "llava_deepseek_moe"])
def moe_checkpoint(request, tmp_path_factory):
    """(family, saved checkpoint, its processor in memory) of each tiny mixture-of-experts VLM: Qwen3-VL-MoE
    (every layer MoE), GLM-4V-MoE and a DeepSeek-style one (a dense layer, then routed + shared experts)."""
    model, processor = ZOO_MODELS[request.param]()
    return request.param, save(tmp_path_factory.mktemp(request.param) / "ckpt", model, processor), processor
