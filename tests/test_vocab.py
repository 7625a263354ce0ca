"""Neuron vocabulary: top tokens of one neuron and the cached whole-model table."""
import importlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mmn_fast
from mmn_fast.find.vocab import neuron_topk, top_tokens, vocab_table
from mmn_fast.kernels import interpreter_on


def test_top_tokens_match_full_projection(llava):
    ad = llava.adapter
    logits = ad.unembed_weight().double() @ ad.out_weight(1)[:, 5].double()  # [V]
    want = logits.topk(6).indices.tolist()
    got = top_tokens(llava, 1, 5, k=6)
    assert [tid for _, tid, _ in got] == want
    assert [tok for tok, _, _ in got] == llava.tokenizer.convert_ids_to_tokens(want)


def test_vocab_table_is_cached_by_fingerprint(llava, tmp_path):
    values, ids = vocab_table(llava, k=4, chunk=37, cache_dir=tmp_path)
    ad = llava.adapter
    assert values.shape == ids.shape == (ad.n_layers, ad.d_mlp, 4)
    for layer in range(ad.n_layers):
        full = ad.out_weight(layer).double().t() @ ad.unembed_weight().double().t()  # [F, V]
        assert torch.equal(ids[layer], full.topk(4, dim=1).indices)
    files = list(tmp_path.glob("vocab-*.safetensors"))
    assert len(files) == 1 and llava.fingerprint in files[0].name
    # A second call reads the file: poison it and the poisoned values come back.
    data = load_file(files[0])
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    save_file({"values": data["values"] * 0 - 1, "token_ids": data["token_ids"]}, str(files[0]), metadata=meta)
    again, _ = vocab_table(llava, k=4, cache_dir=tmp_path)
    assert (again == -1).all()


def test_vocab_table_on_the_triton_backend_matches_torch(llava_path, llava, monkeypatch):
    """The engine's Triton backend (interpreter here) computes the same table."""
    if not interpreter_on():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    fast = mmn_fast.load(llava_path, device="cpu", backend="triton")
    v_fast, i_fast = vocab_table(fast, k=5)
    v_ref, i_ref = vocab_table(llava, k=5)
    assert torch.equal(i_fast, i_ref)
    torch.testing.assert_close(v_fast, v_ref, rtol=1e-5, atol=1e-6)
    # subsets of neurons (what metrics and reports rank) go the same way, and single neurons too
    ops = importlib.import_module("mmn_fast.kernels.vocab_topk")  # the module, not the package's function
    calls = []
    real = ops.vocab_topk_triton
    monkeypatch.setattr(ops, "vocab_topk_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    cols = torch.stack([fast.adapter.out_weight(1)[:, i] for i in (0, 3, 7)], 1)  # [d, 3]
    got, want = neuron_topk(fast, cols, 6), neuron_topk(llava, cols, 6)
    assert calls == [1]  # the Triton backend's engine took the kernel, the torch one did not
    monkeypatch.undo()
    assert torch.equal(got[1], want[1])
    assert [t[1] for t in top_tokens(fast, 1, 3, k=6)] == want[1][1].tolist()
