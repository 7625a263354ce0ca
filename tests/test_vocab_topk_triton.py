"""vocab_topk: the Triton kernel (under triton's CPU interpreter unless TRITON_INTERPRET=0 on a GPU)
against the chunked torch path and a float64 full product, on small awkward shapes."""
import itertools

import pytest
import torch
from triton_device import kernel_device

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


@pytest.mark.parametrize("d,f,v,k,mode,dtype", CASES)
def test_triton_matches_full_product(d, f, v, k, mode, dtype):
    gen = torch.Generator().manual_seed(d * f + v + k)
    w_out, w_u = torch.randn(d, f, generator=gen).to(dtype), torch.randn(v, d, generator=gen).to(dtype)
    full = w_out.double().t() @ w_u.double().t()  # [F, V], exact for half weights' products
    kk = min(k, v)
    n_out = 4 if mode == "both" else 2
    out = [torch.full((f, kk), float("nan"), device=DEVICE) if i % 2 == 0 else
           torch.full((f, kk), -7, dtype=torch.int64, device=DEVICE) for i in range(n_out)]  # poisoned
    # small tiles: several F blocks and vocabulary tiles (block_v is raised to k's power of two)
    got = vocab_topk_triton(w_out.to(DEVICE), w_u.to(DEVICE), k, largest=mode != "bottom", both=mode == "both",
                            block_f=16, block_v=32, block_d=16, out=out)
    assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out))
    assert not any(g.isnan().any() for g in got[0::2]) and all((g >= 0).all() and (g < v).all() for g in got[1::2])
    if mode == "both":
        assert isinstance(got, VocabTopK)
        check(got.top_values, got.top_ids, full, kk, True)
        check(got.bottom_values, got.bottom_ids, full, kk, False)
    else:
        check(*got, full, kk, mode == "top")


def test_strided_weights_and_default_blocks():
    """Transposed (non-contiguous) views go in through their strides."""
    gen = torch.Generator().manual_seed(0)
    w_out = torch.randn(70, 24, generator=gen).t()  # [d=24, F=70], strides (1, 24)
    w_u = torch.randn(24, 200, generator=gen).t()  # [V=200, d=24], strides (1, 200)
    full = w_out.double().t() @ w_u.double().t()
    got = vocab_topk(w_out.to(DEVICE), w_u.to(DEVICE), 7, both=True, backend="triton")
    check(got.top_values, got.top_ids, full, 7, True)
    check(got.bottom_values, got.bottom_ids, full, 7, False)


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
