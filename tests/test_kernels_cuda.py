"""GPU-only: the compiled Triton kernels against the torch paths on CUDA, at realistic widths.

Skipped without CUDA (CI has none); run on a GPU machine in its own process, with the
interpreter off: `TRITON_INTERPRET=0 python -m pytest tests/test_kernels_cuda.py`.
"""
from __future__ import annotations

import pytest
import torch
from triton_device import refuse_fallback

import mmn_fast
from mmn_fast.kernels import act_score, vocab_topk_triton
from mmn_fast.testing import llava_model, random_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("gated", [True, False])
def test_act_score_matches_torch_on_cuda(dtype, reduce, gated):
    torch.manual_seed(0)
    n_samples, seq, f, k = 3, 201, 4099, 64
    n = n_samples * seq
    g = torch.randn(n, f, device="cuda", dtype=dtype)
    u = torch.randn(n, f, device="cuda", dtype=dtype) if gated else None
    proj = torch.randn(f, k, device="cuda")
    pos = torch.arange(seq, device="cuda")
    group = torch.where(((pos > 3) & (pos < 150))[None], torch.arange(n_samples, device="cuda")[:, None], -1).reshape(-1)
    rows = torch.tensor([seq - 1, 2 * seq - 1, n - 1, 7], device="cuda")
    kw = dict(proj=proj, row_group=group, n_groups=n_samples, reduce=reduce, capture_rows=rows, capture_act=True)
    fast = act_score(g, u, "silu", backend="triton", **kw)
    same = act_score(g, u, "silu", backend="torch", **kw)
    exact = act_score(g.double(), None if u is None else u.double(), "silu", backend="torch",
                      **dict(kw, proj=proj.double()))
    if dtype == torch.float32:
        torch.testing.assert_close(fast.h, same.h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.scores, same.scores, rtol=1e-5, atol=1e-3)
    else:
        assert _err(fast.h, exact.h) <= 2 * _err(same.h, exact.h) + 1e-6
        assert _err(fast.scores, exact.scores) <= 2 * _err(same.scores, exact.scores) + 1e-3
    torch.testing.assert_close(fast.captured, fast.h[rows], rtol=0, atol=0)
    torch.testing.assert_close(fast.captured_act.double(), exact.captured_act, rtol=2e-2, atol=2e-2)


VOCAB_CASES = [  # (dtype, d, F, V, k, options): realistic widths and the awkward ones
    (torch.float32, 512, 1000, 32000, 64, dict(method="filter")),
    (torch.bfloat16, 512, 1008, 32003, 64, dict(method="filter")),  # F % 16 == 0 (hinted loads), V wraps
    (torch.float16, 520, 1000, 32000, 64, dict(method="filter")),  # d % 64 != 0: masked inner loop tail
    (torch.bfloat16, 512, 1008, 32003, 7, dict(method="filter", gemm="torch", chunk=5000)),
    (torch.bfloat16, 512, 1000, 32000, 64, dict(method="bitonic")),
    (torch.float16, 512, 1000, 32003, 1, dict(method="bitonic")),
]


def _check_topk(values, ids, exact, k, largest):
    """values/ids [F, k] against the float64 logits: each id's exact logit matches its value, and the
    exact logits at the returned ids are the row's top-k (up to rounding-level near-ties)."""
    got_exact = exact.gather(1, ids)  # [F, k]
    torch.testing.assert_close(values.double(), got_exact, rtol=1e-4, atol=1e-4)
    want = exact.topk(k, dim=1, largest=largest).values
    torch.testing.assert_close(got_exact.sort(1, descending=largest).values, want, rtol=1e-4, atol=1e-4)
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # no id twice in a row


@pytest.mark.parametrize("dtype,d,f,v,k,opts", VOCAB_CASES)
@pytest.mark.parametrize("mode", ["both", "top"])
def test_vocab_topk_matches_exact_on_cuda(dtype, d, f, v, k, opts, mode, monkeypatch):
    """The filter method must answer from its own pass: at the default capacity no row may fall
    back to the exact recomputation."""
    torch.manual_seed(1)
    w_out = (torch.randn(d, f, device="cuda") / d ** 0.5).to(dtype)
    w_u = (torch.randn(v, d, device="cuda") / d ** 0.5).to(dtype)
    exact = w_out.double().t() @ w_u.double().t()  # [F, V]
    refuse_fallback(monkeypatch)
    got = vocab_topk_triton(w_out, w_u, k, both=mode == "both", **opts)
    if mode == "both":
        _check_topk(got.top_values, got.top_ids, exact, k, True)
        _check_topk(got.bottom_values, got.bottom_ids, exact, k, False)
    else:
        _check_topk(*got, exact, k, True)


def test_vocab_topk_on_a_column_slice_on_cuda():
    """W_out[:, :100]: F % 16 != 0 with a row stride that is a multiple of 16. Declaring the wrapped
    rows contiguous here would load misaligned vectors across the wrap; the launcher must not."""
    torch.manual_seed(2)
    full_out = (torch.randn(512, 1024, device="cuda") / 512 ** 0.5).to(torch.bfloat16)
    w_u = (torch.randn(32000, 512, device="cuda") / 512 ** 0.5).to(torch.bfloat16)
    w_out = full_out[:, :100]
    exact = w_out.double().t() @ w_u.double().t()
    for opts in (dict(), dict(gemm="torch", chunk=7000)):
        got = vocab_topk_triton(w_out, w_u, 64, both=True, **opts)
        torch.cuda.synchronize()
        _check_topk(got.top_values, got.top_ids, exact, 64, True)
        _check_topk(got.bottom_values, got.bottom_ids, exact, 64, False)


@pytest.mark.parametrize("decode_with_kernel", [False, True])
def test_find_on_cuda_triton_matches_torch_backend(decode_with_kernel):
    """The fused capture (kernel at the prefill, and at decode steps too when asked) finds what the
    hooks find: same captions, same top neurons, for every capture mode."""
    model, processor = llava_model(num_layers=3, hidden_size=256, intermediate_size=700, device="cuda")
    fast = mmn_fast.load(model, processor=processor, device="cuda", backend="triton")
    fast.decode_with_kernel = decode_with_kernel
    ref = mmn_fast.load(model, processor=processor, device="cuda", backend="torch")
    images = random_images(4, size=32, seed=3)
    for kw in (dict(), dict(positions="image", reduce="mean"), dict(positions="image", reduce="max"),
               dict(activation="act_fn"), dict(fold_final_norm=True), dict(method="grad")):
        got = fast.find(images, concepts="all", max_new_tokens=8, top_k=20, batch_size=4, **kw)
        want = ref.find(images, concepts="all", max_new_tokens=8, top_k=20, batch_size=4, **kw)
        assert [r.output_ids for r in got] == [r.output_ids for r in want], kw
        for g, w in zip(got, want):
            for cg, cw in zip(g.concepts, w.concepts, strict=True):
                assert [x[:2] for x in cg.neurons[:10]] == [x[:2] for x in cw.neurons[:10]], kw
    assert all("forward" not in m.__dict__ for m in fast.adapter.mlps)  # the fused forwards are gone again
