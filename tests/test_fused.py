"""The fused MLP capture (`mmn_fast.find.fused`) and backend selection (`mmn_fast.model.backend`).

The torch path must leave the model's logits bit-identical and capture exactly what the hooks
capture; the Triton path runs under the interpreter here and must give find the same top-k.
"""
from __future__ import annotations

import sys

import pytest
import torch

import mmn_fast
from mmn_fast import DEFAULT_PROMPT
from mmn_fast.find.capture import capture, gather_positions, last_position
from mmn_fast.errors import MMNError
from mmn_fast.find.fused import fused_capture, fused_problem
from mmn_fast.kernels._triton_util import interpreter_on  # conftest switches the interpreter on without CUDA

needs_interpreter = pytest.mark.skipif(not interpreter_on(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

ALL = dict(concepts="all", max_new_tokens=6, top_k=20)


def _forward(engine, image, ctx=None):
    inputs = engine.encode([image], DEFAULT_PROMPT, None)
    with torch.no_grad():
        if ctx is None:
            return engine.model(**inputs).logits
        with ctx as store:
            return engine.model(**inputs).logits, store


def test_torch_path_keeps_logits_bit_identical_and_captures_what_hooks_capture(llava, images):
    plain = _forward(llava, images[0])
    fused, store = _forward(llava, images[0], fused_capture(llava.adapter, "torch"))
    assert torch.equal(plain, fused)
    _, hooked = _forward(llava, images[0], capture(llava.adapter))
    assert torch.equal(store.acts(), hooked.acts())
    _, act_only = _forward(llava, images[0], fused_capture(llava.adapter, "torch", activation="act_fn"))
    _, act_hooked = _forward(llava, images[0], capture(llava.adapter, activation="act_fn"))
    assert torch.equal(act_only.acts(), act_hooked.acts())


@pytest.mark.parametrize("activation", ["down_proj_input", "act_fn"])
def test_decode_steps_keep_logits_and_captures_bit_identical(llava, images, activation):
    """Through generate: the prefill and every one-position decode step (the model's own ops there)."""
    inputs = llava.encode(images[:2], DEFAULT_PROMPT, None)
    gen = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = llava.model.generate(**inputs, **gen)
        with fused_capture(llava.adapter, "torch", activation=activation) as fused:
            out = llava.model.generate(**inputs, **gen)
        with capture(llava.adapter, activation=activation) as hooked:
            llava.model.generate(**inputs, **gen)
    assert torch.equal(plain.sequences, out.sequences) and len(out.logits) >= 2
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, out.logits))
    assert len(fused.rows[0]) == len(out.logits)  # one capture per forward: the prefill, then each step
    assert torch.equal(fused.acts(), hooked.acts())


def test_forwards_are_restored_even_after_an_error(llava, images):
    mlps = llava.adapter.mlps
    assert all("forward" not in m.__dict__ for m in mlps)
    with pytest.raises(RuntimeError, match="boom"):
        with fused_capture(llava.adapter, "torch"):
            assert all("forward" in m.__dict__ for m in mlps)
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in mlps)
    assert torch.equal(_forward(llava, images[1]), _forward(llava, images[1]))


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_image_stats_and_gathered_rows_match_hooks(llava64, images, reduce):
    eng = llava64
    inputs = eng.encode(images[:2], DEFAULT_PROMPT, None)
    mask = inputs["input_ids"] == eng.adapter.image_token_id
    t = inputs["input_ids"].shape[1]
    select = gather_positions(torch.tensor([[t - 1, t - 3], [t - 2, t - 1]]))
    with torch.no_grad():
        with capture(eng.adapter, select=select, image_mask=mask) as hooked:
            eng.model(**inputs)
        with fused_capture(eng.adapter, "torch", select=select, image_mask=mask, reduce=reduce) as fused:
            eng.model(**inputs)
    assert torch.equal(fused.acts(), hooked.acts())
    want, got = hooked.image_stats(), fused.image_stats()
    keys = ["sum"] if reduce == "mean" else ["max", "min"]
    assert sorted(got) == sorted(keys + ["count"])
    for k in keys + ["count"]:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_unfusable_mlp_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmn_fast.model.adapters import Adapter, discover_spec

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64))
    problem = fused_problem(Adapter(model, discover_spec(model)))
    assert "GPT2MLP" in problem and "c_fc" in problem


def test_backend_selection(llava_path, monkeypatch):
    from mmn_fast.model.backend import resolve_backend

    monkeypatch.delenv("MMN_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"  # the kernels only pay on a GPU
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(MMNError, match="not a backend"):
        resolve_backend("cuda", "cpu")
    monkeypatch.setenv("MMN_BACKEND", "fast")
    with pytest.raises(MMNError, match="MMN_BACKEND='fast'"):
        resolve_backend(None, "cpu")
    monkeypatch.setenv("MMN_BACKEND", "torch")
    assert mmn_fast.load(llava_path, device="cpu").backend == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MMNError, match="not CUDA"):
        resolve_backend("triton", "cpu")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    with pytest.raises(MMNError, match="GPT2MLP"):
        resolve_backend("triton", "cpu", unsupported="layer 0's MLP (GPT2MLP: c_fc) ...")


def count_kernel_calls(monkeypatch) -> list:
    """A list that grows by one per act_score Triton call (the calls still run)."""
    pytest.importorskip("triton")
    module = sys.modules["mmn_fast.kernels.act_score"]
    launches = []
    real = module.act_score_triton
    monkeypatch.setattr(module, "act_score_triton", lambda *a, **k: launches.append(1) or real(*a, **k))
    return launches


@needs_interpreter
@pytest.mark.parametrize("kwargs", [dict(), dict(activation="act_fn"), dict(positions="image", reduce="max"),
                                    dict(fold_final_norm=True)])
def test_find_with_the_triton_backend_matches_torch(llava_path, images, kwargs, monkeypatch):
    """End to end under the Triton interpreter: same captions, same top-k, close scores."""
    launches = count_kernel_calls(monkeypatch)
    fast = mmn_fast.load(llava_path, device="cpu", backend="triton")
    ref = mmn_fast.load(llava_path, device="cpu", backend="torch")
    assert (fast.backend, ref.backend) == ("triton", "torch")
    got = fast.find(images[:2], batch_size=2, **ALL, **kwargs)
    want = ref.find(images[:2], batch_size=2, **ALL, **kwargs)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    n = 0
    for g, w in zip(got, want):
        for cg, cw in zip(g.concepts, w.concepts, strict=True):
            assert {tuple(x[:2]) for x in cg.neurons} == {tuple(x[:2]) for x in cw.neurons}
            torch.testing.assert_close(torch.tensor([x[2] for x in cg.neurons]),
                                       torch.tensor([x[2] for x in cw.neurons]), rtol=1e-4, atol=1e-6)
            n += 1
    assert n > 0
    # the kernel ran for every layer's prefill (the one-position decode steps take the torch ops)
    assert len(launches) == fast.adapter.n_layers


@needs_interpreter
def test_kernel_at_decode_steps_when_asked(llava_path, images, monkeypatch):
    """Engine.decode_with_kernel runs the kernel at every decode step too, with the same result."""
    launches = count_kernel_calls(monkeypatch)
    fast = mmn_fast.load(llava_path, device="cpu", backend="triton")
    want = fast.find(images[:2], batch_size=2, **ALL)
    assert len(launches) == fast.adapter.n_layers
    fast.decode_with_kernel = True
    got = fast.find(images[:2], batch_size=2, **ALL)
    steps = max(len(r.output_ids) for r in got)
    assert steps >= 2 and len(launches) - fast.adapter.n_layers >= fast.adapter.n_layers * (steps - 1)  # + each step
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for g, w in zip(got, want):
        for cg, cw in zip(g.concepts, w.concepts, strict=True):
            assert {tuple(x[:2]) for x in cg.neurons} == {tuple(x[:2]) for x in cw.neurons}


def test_a_one_position_prompt_still_gets_its_image_stats(llava):
    """t == 1 is the prefill when the prompt has one position: its image statistics are still kept
    (the decode-step shortcut must not take that call)."""
    x = torch.randn(2, 1, llava.adapter.unembed_weight().shape[1])  # [B, T=1, d]
    mask = torch.ones(2, 1, dtype=torch.bool)
    for activation in ("down_proj_input", "act_fn"):
        with torch.no_grad():
            with fused_capture(llava.adapter, "torch", activation=activation, image_mask=mask) as fused:
                llava.adapter.mlps[0](x)
            with capture(llava.adapter, activation=activation, image_mask=mask) as hooked:
                llava.adapter.mlps[0](x)
        assert fused.image[0] is not None
        for k in fused.image[0]:  # sum + count (reduce="mean"), from the full stats the hooks keep
            torch.testing.assert_close(fused.image[0][k], hooked.image[0][k], rtol=1e-6, atol=1e-7)


def test_one_position_steps_with_a_gather_selector_match_hooks(llava):
    """The decode-step shortcut with a position selector (not last_position) keeps the same rows."""
    x = torch.randn(3, 1, llava.adapter.unembed_weight().shape[1])  # [B, T=1, d]
    select = gather_positions(torch.zeros(3, 2, dtype=torch.long))  # position 0, twice per sample
    with torch.no_grad():
        with fused_capture(llava.adapter, "torch", select=select) as fused:
            llava.adapter.mlps[1](x)
        with capture(llava.adapter, select=select) as hooked:
            llava.adapter.mlps[1](x)
    assert fused.rows[1][0].shape == (3, 2, hooked.rows[1][0].shape[-1])
    assert torch.equal(fused.rows[1][0], hooked.rows[1][0])


@needs_interpreter
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_capture_never_changes_the_caption(llava_path, images, dtype):
    """On every backend and dtype find's captions equal generate's without a capture, token for token (the
    model's own ops compute h; the kernel only reads it), in every capture mode, with the kernel at decode
    steps too; and the Triton backend's captures equal the torch backend's bit for bit."""
    plain = None
    for backend in ("torch", "triton"):
        eng = mmn_fast.load(llava_path, device="cpu", dtype=dtype, backend=backend)
        if plain is None:
            inputs = eng.encode(images[:3], DEFAULT_PROMPT, None)
            with torch.no_grad():
                seq = eng.model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1,
                                         **eng.generate_options())
            plain = [eng.caption_text(r) for r in seq[:, inputs["input_ids"].shape[1]:].tolist()]
        for kwargs in (dict(), dict(activation="act_fn"), dict(positions="image", reduce="max")):
            for at_decode in (False, True):
                eng.decode_with_kernel = at_decode
                found = eng.find(images[:3], concepts="all", max_new_tokens=8, top_k=5, batch_size=3, **kwargs)
                assert [r.caption for r in found] == plain, (backend, kwargs, at_decode)
    inputs = eng.encode(images[:2], DEFAULT_PROMPT, None)
    with torch.no_grad():
        with fused_capture(eng.adapter, "triton") as fast:
            eng.model(**inputs)
        with capture(eng.adapter) as hooked:
            eng.model(**inputs)
    assert torch.equal(fast.acts(), hooked.acts())
