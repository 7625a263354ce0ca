"""GPU-only: the compiled Triton kernels against the torch paths on CUDA, at realistic widths.

Skipped without CUDA (CI has none); run on a GPU machine in its own process, with the
interpreter off: `TRITON_INTERPRET=0 python -m pytest tests/test_kernels_cuda.py`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from mmn_fast.kernels import act_score, vocab_topk_torch, vocab_topk_triton  # noqa: E402

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


@pytest.mark.parametrize("method", ["filter", "bitonic"])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 512), (torch.bfloat16, 512), (torch.float16, 520)])
def test_vocab_topk_matches_torch_on_cuda(dtype, d, method, monkeypatch):
    """Realistic widths (d = 520: the inner loop's masked tail). The filter method must answer from
    its own GEMM: at the default capacity no row may fall back to the torch path."""
    import importlib

    torch.manual_seed(1)
    f, v, k = 1000, 32000, 64
    w_out = (torch.randn(d, f, device="cuda") / d ** 0.5).to(dtype)
    w_u = (torch.randn(v, d, device="cuda") / d ** 0.5).to(dtype)
    want = vocab_topk_torch(w_out, w_u, k, both=True)
    vt = importlib.import_module("mmn_fast.kernels.vocab_topk")

    def refuse(*a, **kw):
        raise AssertionError("a row fell back to the torch path")

    monkeypatch.setattr(vt, "vocab_topk_torch", refuse)
    got = vocab_topk_triton(w_out, w_u, k, both=True, method=method)
    for gv, gi, wv, wi in ((got.top_values, got.top_ids, want.top_values, want.top_ids),
                           (got.bottom_values, got.bottom_ids, want.bottom_values, want.bottom_ids)):
        torch.testing.assert_close(gv, wv, rtol=1e-4, atol=1e-4)
        # ids agree except where two values tie to within rounding
        agree = (gi == wi).float().mean().item()
        assert agree > 0.999, agree


def test_find_on_cuda_triton_matches_torch_backend():
    import mmn_fast
    from mmn_fast.testing import llava_model, random_images

    model, processor = llava_model(num_layers=3, hidden_size=256, intermediate_size=700, device="cuda")
    fast = mmn_fast.load(model, processor=processor, device="cuda", backend="triton")
    ref = mmn_fast.load(model, processor=processor, device="cuda", backend="torch")
    images = random_images(4, size=32, seed=3)
    for kw in (dict(), dict(positions="image", reduce="mean"), dict(activation="act_fn")):
        got = fast.find(images, concepts="all", max_new_tokens=8, top_k=20, batch_size=4, **kw)
        want = ref.find(images, concepts="all", max_new_tokens=8, top_k=20, batch_size=4, **kw)
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        for g, w in zip(got, want):
            for cg, cw in zip(g.concepts, w.concepts, strict=True):
                assert [x[:2] for x in cg.neurons[:10]] == [x[:2] for x in cw.neurons[:10]]
