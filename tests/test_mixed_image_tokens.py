"""Batches that mix images with different numbers of image tokens (LLaVA-NeXT any-resolution tiling)."""
from __future__ import annotations

import json

import pytest
import torch

import mmn_fast
from mmn_fast.cli.main import main
from mmn_fast.testing import random_images, tiny_llava_next


@pytest.fixture(scope="module")
def next_path(tmp_path_factory):
    return tiny_llava_next(tmp_path_factory.mktemp("llava_next"))


def _images():
    wide, tall, square = (random_images(1, size=32, seed=s)[0] for s in (1, 2, 3))
    return [wide.resize((64, 32)), tall.resize((32, 64)), square]


def test_a_mixed_batch_equals_single_images(next_path):
    eng = mmn_fast.load(next_path, device="cpu", dtype="float64")
    imgs = _images()
    inputs = eng.encode(imgs, mmn_fast.DEFAULT_PROMPT, None)
    counts = (inputs["input_ids"] == eng.adapter.image_token_id).sum(1).tolist()
    assert len(set(counts)) == 3, counts  # three different image-token counts in one batch
    batch = eng.find(imgs, concepts="all", max_new_tokens=6, top_k=10, batch_size=3)
    for img, got in zip(imgs, batch):
        want = eng.find([img], concepts="all", max_new_tokens=6, top_k=10, batch_size=1)[0]
        assert got.output_ids == want.output_ids and got.concepts
        for cg, cw in zip(got.concepts, want.concepts, strict=True):
            assert [n[:2] for n in cg.neurons] == [n[:2] for n in cw.neurons]
            torch.testing.assert_close(torch.tensor([n[2] for n in cg.neurons]),
                                       torch.tensor([n[2] for n in cw.neurons]), rtol=1e-9, atol=1e-15)


def test_the_scheduler_batches_them_too(next_path, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_images()):
        img.save(folder / f"img{i}.png")
    out = tmp_path / "out"
    assert main(["find", "--model", str(next_path), "--images", str(folder), "--out", str(out), "--concepts", "all",
                 "--max-new-tokens", "5", "--batch-size", "3", "--num-workers", "0", "--quiet"]) == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines] == ["img0", "img1", "img2"]
    image_id = mmn_fast.load(next_path, device="cpu").adapter.image_token_id
    assert len({l["prompt_ids"].count(image_id) for l in lines}) == 3
