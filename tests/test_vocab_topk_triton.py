"""vocab_topk: the Triton kernels, filter and bitonic (under triton's CPU interpreter unless
TRITON_INTERPRET=0 on a GPU), against the chunked torch path and a float64 full product, on small
awkward shapes."""
import importlib
import itertools

import pytest
import torch
from triton_device import kernel_device, refuse_fallback

from mmn_fast.kernels import VocabTopK, vocab_topk, vocab_topk_torch, vocab_topk_triton

DEVICE = kernel_device()

SHAPES = [(16, 5, 50), (40, 37, 301), (16, 37, 301), (40, 5, 50)]  # (d, F, V)
CASES = []
for i, (k, mode) in enumerate(itertools.product((1, 5, 64), ("top", "bottom", "both"))):
    for j, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        CASES.append((*SHAPES[(i + j) % 4], k, mode, dtype))


def check(values, ids, full, k, largest):
    """ids: the right set per row (random data: no ties); values: sorted best first, close to float64."""
    want_v, want_i = full.topk(k, dim=1, largest=largest)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64 and values.shape == (full.shape[0], k)
    values, ids = values.cpu(), ids.cpu()
    assert torch.equal(ids.sort(1).values, want_i.sort(1).values)
    torch.testing.assert_close(values.double(), want_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.double(), full.gather(1, ids), rtol=1e-5, atol=1e-5)  # ids match values
    step = values[:, :-1] - values[:, 1:]
    assert (step >= 0).all() if largest else (step <= 0).all()


METHODS = [dict(method="filter"), dict(method="filter", gemm="torch", chunk=100), dict(method="bitonic")]


@pytest.mark.parametrize("method", METHODS, ids=["filter", "filter-cublas", "bitonic"])
@pytest.mark.parametrize("d,f,v,k,mode,dtype", CASES)
def test_triton_matches_full_product(d, f, v, k, mode, dtype, method, monkeypatch):
    refuse_fallback(monkeypatch)  # default capacity: no row may overflow on random weights
    gen = torch.Generator().manual_seed(d * f + v + k)
    w_out, w_u = torch.randn(d, f, generator=gen).to(dtype), torch.randn(v, d, generator=gen).to(dtype)
    full = w_out.double().t() @ w_u.double().t()  # [F, V], exact for half weights' products
    kk = min(k, v)
    n_out = 4 if mode == "both" else 2
    out = [torch.full((f, kk), float("nan"), device=DEVICE) if i % 2 == 0 else
           torch.full((f, kk), -7, dtype=torch.int64, device=DEVICE) for i in range(n_out)]  # poisoned
    # small tiles: several F blocks and vocabulary tiles (block_v is raised to k's power of two)
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), k, largest=mode != "bottom", both=mode == "both",
                            block_f=16, block_v=32, block_d=16, probe_stride=3, out=out, **method)
    assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out))
    assert not any(g.isnan().any() for g in got[0::2]) and all((g >= 0).all() and (g < v).all() for g in got[1::2])
    if mode == "both":
        assert isinstance(got, VocabTopK)
        check(got.top_values, got.top_ids, full, kk, True)
        check(got.bottom_values, got.bottom_ids, full, kk, False)
    else:
        check(*got, full, kk, mode == "top")


@pytest.mark.parametrize("method", METHODS, ids=["filter", "filter-cublas", "bitonic"])
def test_strided_weights_and_default_blocks(method):
    """Transposed (non-contiguous) views go in through their strides."""
    gen = torch.Generator().manual_seed(0)
    w_out = torch.randn(70, 24, generator=gen).t()  # [d=24, F=70], strides (1, 24)
    w_u = torch.randn(24, 200, generator=gen).t()  # [V=200, d=24], strides (1, 200)
    full = w_out.double().t() @ w_u.double().t()
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 7, both=True, **method)
    check(got.top_values, got.top_ids, full, 7, True)
    check(got.bottom_values, got.bottom_ids, full, 7, False)


def test_filter_answers_from_the_kernel_without_fallback(monkeypatch):
    """With the default capacity no row overflows on random weights: the exact recomputation is
    never called, so the answer is the filtering GEMM's own (1-D tiles over a longer vocabulary)."""
    refuse_fallback(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    w_out, w_u = torch.randn(32, 45, generator=gen), torch.randn(517, 32, generator=gen)
    full = w_out.double().t() @ w_u.double().t()
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 9, both=True, block_f=16, block_v=64, block_d=16)
    check(got.top_values, got.top_ids, full, 9, True)
    check(got.bottom_values, got.bottom_ids, full, 9, False)


@pytest.mark.parametrize("gemm", ["triton", "torch"])
@pytest.mark.parametrize("capacity", [1, 9, 20])
def test_filter_overflowing_rows_are_recomputed(capacity, gemm):
    """A buffer too small for the candidates (capacity is raised to k at least) still gives the
    exact answer: the rows that overflowed are recomputed."""
    gen = torch.Generator().manual_seed(3)
    w_out, w_u = torch.randn(32, 45, generator=gen), torch.randn(517, 32, generator=gen)
    full = w_out.double().t() @ w_u.double().t()
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 9, both=True, block_f=16, block_v=64, block_d=16,
                            capacity=capacity, gemm=gemm, chunk=200)
    check(got.top_values, got.top_ids, full, 9, True)
    check(got.bottom_values, got.bottom_ids, full, 9, False)


@pytest.mark.parametrize("method", METHODS, ids=["filter", "filter-cublas", "bitonic"])
def test_dead_neuron_ties_everywhere(method):
    """A zero output vector (a dead neuron) gives V equal logits: its rows overflow any buffer and are
    recomputed, and still come back as ids 0..k-1, like every other tie."""
    gen = torch.Generator().manual_seed(6)
    w_out, w_u = torch.randn(16, 12, generator=gen), torch.randn(300, 16, generator=gen)
    w_out[:, [3, 11]] = 0
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 6, both=True, block_f=16, block_v=32, block_d=16,
                            **method)
    for ids, values in ((got.top_ids, got.top_values), (got.bottom_ids, got.bottom_values)):
        assert torch.equal(ids[[3, 11]].cpu(), torch.arange(6).expand(2, 6)) and (values[[3, 11]] == 0).all()
    full = w_out.double().t() @ w_u.double().t()
    live = [i for i in range(12) if i not in (3, 11)]
    check(got.top_values[live], got.top_ids[live], full[live], 6, True)


@pytest.mark.parametrize("gemm", ["triton", "torch"])
def test_exact_whatever_the_thresholds(monkeypatch, gemm):
    """Exactness rests on the candidate count, not on the probe: thresholds pushed randomly far up
    (too few candidates) or down (overflow) still give the exact top-k and bottom-k."""
    mod = importlib.import_module("mmn_fast.kernels._vocab_filter_triton")
    real = mod.probe_thresholds
    gen = torch.Generator().manual_seed(7)

    def skewed(*a, **kw):
        top, bottom, n = real(*a, **kw)
        shift = (torch.rand(top.shape, generator=gen) - 0.5) * 24  # +-12: about 2 sigma, per row
        return top + shift.to(top.device), bottom - shift.to(bottom.device), n

    monkeypatch.setattr(mod, "probe_thresholds", skewed)
    redone = []
    exact_rows = mod.exact_rows
    monkeypatch.setattr(mod, "exact_rows", lambda w, *a, **kw: redone.append(w.shape[1]) or exact_rows(w, *a, **kw))
    w_out, w_u = torch.randn(32, 40, generator=gen), torch.randn(400, 32, generator=gen)
    full = w_out.double().t() @ w_u.double().t()
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 8, both=True, block_f=16, block_v=64, block_d=16,
                            gemm=gemm, chunk=150)
    check(got.top_values, got.top_ids, full, 8, True)
    check(got.bottom_values, got.bottom_ids, full, 8, False)
    assert 0 < sum(redone) < 2 * 40  # some rows came up short and were redone, most were not


def test_probe_threshold_is_under_every_true_topk_value():
    from mmn_fast.kernels._vocab_filter_triton import probe_thresholds

    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w_out, w_u = torch.randn(64, 50, generator=gen).to(dtype), torch.randn(1000, 64, generator=gen).to(dtype)
        full = w_out.double().t() @ w_u.double().t()  # [F, V]
        top, neg_bottom, n_probe = probe_thresholds(w_out, w_u, 16, 8, True, True)
        assert n_probe == 125
        assert (full.topk(16, dim=1).values[:, -1] >= top.double()).all()
        assert (-full.topk(16, dim=1, largest=False).values[:, -1] >= neg_bottom.double()).all()
        kept = (full >= top.double()[:, None]).sum(1).float()  # candidates: about k * stride = 128
        assert 16 <= kept.min() and kept.mean() < 400


@pytest.mark.parametrize("method", METHODS + [dict(method="filter", capacity=5)],
                         ids=["filter", "filter-cublas", "bitonic", "filter-overflowing"])
def test_ties_go_to_the_smaller_token_id(method):
    """Small integer weights make exactly equal logits (every sum is exact in fp32), and duplicated
    unembedding rows add more; the smaller id wins, whatever order the tiles (or atomics) ran in."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-2, 3, (40, 16), generator=gen).float()
    w_u = torch.cat([base, base, base])  # ids i, i + 40 and i + 80 tie
    w_out = torch.randint(-2, 3, (16, 20), generator=gen).float()
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 5, both=True, block_f=16, block_v=32, block_d=16,
                            probe_stride=2, **method)
    full = w_out.double().t() @ w_u.double().t()  # [F, 120]: each value three times
    want_top = full.sort(dim=1, descending=True, stable=True).indices[:, :5]  # equal values: smaller id first
    want_bottom = full.sort(dim=1, stable=True).indices[:, :5]
    assert torch.equal(got.top_ids.cpu(), want_top) and torch.equal(got.bottom_ids.cpu(), want_bottom)


@pytest.mark.parametrize("both", [False, True])
def test_dispatch_takes_the_kernel_on_the_triton_backend(both, monkeypatch):
    """vocab_topk(backend="triton") returns the kernel's own result where the kernel takes the input."""
    gen = torch.Generator().manual_seed(8)
    w_out, w_u = torch.randn(16, 10, generator=gen).to(DEVICE), torch.randn(90, 16, generator=gen).to(DEVICE)
    want = vocab_topk_triton(w_out, w_u, 4, both=both)
    ops = importlib.import_module("mmn_fast.kernels.vocab_topk")  # the module, not the package's function
    calls = []
    monkeypatch.setattr(ops, "vocab_topk_triton", lambda *a, **kw: calls.append(1) or vocab_topk_triton(*a, **kw))
    got = vocab_topk(w_out, w_u, 4, both=both, backend="triton")
    assert calls == [1] and type(got) is type(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_torch_both_matches_single_passes():
    gen = torch.Generator().manual_seed(1)
    w_out, w_u = torch.randn(12, 9, generator=gen), torch.randn(103, 12, generator=gen)
    both = vocab_topk(w_out, w_u, 6, both=True)
    top, bottom = vocab_topk_torch(w_out, w_u, 6, chunk=17), vocab_topk_torch(w_out, w_u, 6, chunk=17, largest=False)
    assert isinstance(both, VocabTopK)
    for a, b in zip(both, (*top, *bottom)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "w_out,w_u,k,match",
    [
        (torch.randn(8, 4), torch.randn(10, 9), 3, "d must match"),
        (torch.randn(8, 4), torch.randn(10, 8), 0, "k must be in 1..64"),
        (torch.randn(8, 4), torch.randn(10, 8), 65, "k must be in 1..64"),
        (torch.randn(8, 4), torch.randn(10, 8).half(), 3, "one dtype"),
        (torch.randn(8, 4).double(), torch.randn(10, 8).double(), 3, "fp32/fp16/bf16"),
    ],
)
def test_validation(w_out, w_u, k, match):
    with pytest.raises(ValueError, match=match):
        vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), k)


@pytest.mark.parametrize("kw,match", [({"method": "heap"}, "unknown method"), ({"probe_stride": 0}, "probe_stride"),
                                      ({"block_d": 24}, "power of two"),
                                      ({"gemm": "cutlass"}, "unknown gemm"), ({"gemm": "torch", "chunk": 0}, "chunk")])
def test_option_validation(kw, match):
    w_out, w_u = torch.randn(8, 4), torch.randn(10, 8)
    with pytest.raises(ValueError, match=match):
        vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), 3, **kw)
