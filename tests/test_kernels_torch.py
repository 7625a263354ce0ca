"""The pure-torch ops against float64 references, on awkward (non power of two) sizes."""
import pytest
import torch

from mmn_fast.kernels import contribution_scores, token_projection, topk_neurons, vocab_topk, vocab_topk_torch


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


@pytest.mark.parametrize("d,f,v,k,chunk", [(23, 41, 997, 5, 128), (16, 7, 300, 64, 100), (31, 13, 50, 1, 7),
                                         (20, 9, 150, 70, 33)])  # k > chunk: merges start short of k
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


def test_vocab_topk_dispatch_falls_back_to_torch_where_triton_cannot_run():
    """backend="triton" takes the torch path for what the kernel does not take (k > 64, fp64 or
    mixed-dtype weights), with the same result as the torch path; no triton is needed for those."""
    g = torch.Generator().manual_seed(9)
    w_out, w_u = torch.randn(12, 9, generator=g), torch.randn(150, 12, generator=g)
    want = vocab_topk_torch(w_out, w_u, 70, chunk=33)
    for backend in ("torch", "triton"):
        got = vocab_topk(w_out, w_u, 70, backend=backend, chunk=33)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    w64 = w_out.double(), w_u.double()
    both = vocab_topk(*w64, 5, both=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(both, vocab_topk_torch(*w64, 5, both=True)))
    mixed = vocab_topk(w_out, w_u.half(), 5, largest=False, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(mixed, vocab_topk_torch(w_out, w_u.half(), 5, largest=False)))


@pytest.mark.parametrize("kw,match", [(dict(backend="cuda"), "unknown backend"), (dict(k=0), "k must be"),
                                      (dict(w_u=torch.randn(10, 9)), "d must match")])
def test_vocab_topk_dispatch_validation(kw, match):
    args = dict(w_out=torch.randn(8, 4), w_u=torch.randn(10, 8), k=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        vocab_topk(**args)
