"""The KV cache captions are decoded with (`kv_cache`): a static cache (the default where the model supports it)
gives plain generate's tokens, and find's scores equal those of the dynamic cache."""
import pytest
import torch

import mmn_fast
from mmn_fast import DEFAULT_PROMPT, MMNError
from mmn_fast.find.generation import cache_kwargs
from mmn_fast.testing import random_images
from mmn_fast.testing.llava import llava_model
from mmn_fast.testing.zoo import ZOO_MODELS

FAMILIES = {"llava": llava_model, **{n: ZOO_MODELS[n] for n in ("qwen2_5_vl", "gemma3", "mllama", "llava_deepseek_moe")}}


def test_cache_choice():
    model, _ = llava_model()
    assert cache_kwargs(model, "auto") == {"cache_implementation": "static", "disable_compile": True}
    assert cache_kwargs(model, "static")["cache_implementation"] == "static"
    assert cache_kwargs(model, "dynamic") == {}
    assert cache_kwargs(torch.nn.Linear(2, 2), "auto") == {}  # nothing says it can take a static cache
    with pytest.raises(MMNError, match="does not declare support for a static KV cache"):
        cache_kwargs(torch.nn.Linear(2, 2), "static")
    with pytest.raises(MMNError, match="kv_cache must be one of"):
        cache_kwargs(model, "paged")
    with pytest.raises(MMNError, match="kv_cache must be one of"):
        mmn_fast.load(model, processor=llava_model()[1], device="cpu", kv_cache="paged")


def upto_eos(ids: list[int], eos: set) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token (as find reports them)."""
    cut = next((j + 1 for j, t in enumerate(ids) if t in eos), len(ids))
    return ids[:cut]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_static_cache_captions_equal_plain_generate_and_scores_equal_dynamic(name):
    model, processor = FAMILIES[name]()
    images = random_images(3, size=32, seed=5)
    static = mmn_fast.load(model, processor=processor, device="cpu")
    assert static.kv_cache == "auto" and static.generate_options()["cache_implementation"] == "static"
    inputs = static.encode(images, DEFAULT_PROMPT)
    with torch.no_grad():  # what a user's plain generate says (transformers' default dynamic cache)
        plain = model.generate(**inputs, max_new_tokens=10, do_sample=False, num_beams=1, **static.no_placeholder)
    kw = dict(concepts="all", top_k=8, max_new_tokens=10, batch_size=3)
    found = static.find(images, **kw)
    n = inputs["input_ids"].shape[1]
    assert [r.output_ids for r in found] == [upto_eos(row, static.eos_ids) for row in plain[:, n:].tolist()]
    assert static.caption(images, max_new_tokens=10) == [r.caption for r in found]

    dynamic = mmn_fast.load(model, processor=processor, device="cpu", kv_cache="dynamic")
    assert "cache_implementation" not in dynamic.generate_options()
    for got, want in zip(found, dynamic.find(images, **kw)):
        assert got.output_ids == want.output_ids
        for cg, cw in zip(got.concepts, want.concepts):
            assert [x[:-1] for x in cg.neurons] == [x[:-1] for x in cw.neurons]
            assert [x[-1] for x in cg.neurons] == pytest.approx([x[-1] for x in cw.neurons], rel=1e-5, abs=1e-7)
