"""The pure-torch ops against float64 references, on awkward (non power of two) sizes."""
import pytest
import torch

from mmn_fast.kernels import contribution_scores, token_projection, topk_neurons, vocab_topk_torch


@pytest.mark.parametrize("d,f,k", [(37, 53, 1), (64, 100, 7), (19, 211, 64)])
def test_token_projection_matches_float64(d, f, k):
    g = torch.Generator().manual_seed(d * f + k)
    w_out, rows = torch.randn(d, f, generator=g), torch.randn(k, d, generator=g)
    want = w_out.double().t() @ rows.double().t()
    torch.testing.assert_close(token_projection(w_out, rows).double(), want, rtol=1e-5, atol=1e-5)
    centered = (w_out.double() - w_out.double().mean(0)).t() @ rows.double().t()
    torch.testing.assert_close(token_projection(w_out, rows, center=True).double(), centered, rtol=1e-5, atol=1e-5)


def test_topk_neurons_orders_all_layers():
    g = torch.Generator().manual_seed(1)
    acts, proj = torch.randn(5, 3, 37, generator=g), torch.randn(5, 3, 37, generator=g)
    scores = contribution_scores(acts, proj)
    values, layers, index = topk_neurons(scores, 10)
    flat = (acts.double() * proj.double()).reshape(5, -1)
    want_v, want_i = flat.topk(10, dim=1)
    torch.testing.assert_close(values.double(), want_v, rtol=1e-6, atol=1e-6)
    assert torch.equal(layers * 37 + index, want_i)
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("d,f,v,k,chunk", [(23, 41, 997, 5, 128), (16, 7, 300, 64, 100), (31, 13, 50, 1, 7)])
@pytest.mark.parametrize("largest", [True, False])
def test_vocab_topk_chunked_equals_full(d, f, v, k, chunk, largest):
    g = torch.Generator().manual_seed(v + k)
    w_out, w_u = torch.randn(d, f, generator=g), torch.randn(v, d, generator=g)
    values, ids = vocab_topk_torch(w_out, w_u, k, chunk=chunk, largest=largest)
    full = w_out.double().t() @ w_u.double().t()  # [F, V]
    want_v, want_i = full.topk(min(k, v), dim=1, largest=largest)
    torch.testing.assert_close(values.double(), want_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_i)


def test_vocab_topk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="d must match"):
        vocab_topk_torch(torch.randn(8, 4), torch.randn(10, 9), 3)
