"""pytest-benchmark for the kernels: `pytest bench/bench_kernels.py --benchmark-only` (not part of
the test suite). On CUDA the Triton variants run too; the ratio table is `bench/run_kernels.py`."""
import pytest
import torch

from mmn_fast.kernels import act_score, vocab_topk_torch, vocab_topk_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKENDS = ["torch", "triton"] if CUDA else ["torch"]
F_MLP = 11008 if CUDA else 1408
N_ROWS = 8 * 616 if CUDA else 8 * 300


@pytest.fixture(scope="module")
def mlp_inputs():
    torch.manual_seed(0)
    g = torch.randn(N_ROWS, F_MLP, device=DEVICE, dtype=DTYPE)
    u = torch.randn_like(g)
    proj = torch.randn(F_MLP, 64, device=DEVICE)
    group = (torch.arange(N_ROWS, device=DEVICE) // (N_ROWS // 8)).to(torch.int32)
    last = torch.arange(8, device=DEVICE) * (N_ROWS // 8) + N_ROWS // 8 - 1
    return g, u, proj, group, last


def _run(fn):
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_act_score_capture_and_scores(benchmark, mlp_inputs, backend):
    g, u, proj, group, last = mlp_inputs
    out = benchmark(_run, lambda: act_score(g, u, "silu", proj=proj, row_group=group, n_groups=8,
                                            capture_rows=last, backend=backend))
    assert out.scores.shape == (8, 64, F_MLP)


def test_act_times_up_alone(benchmark, mlp_inputs):
    g, u, *_ = mlp_inputs
    benchmark(_run, lambda: torch.nn.functional.silu(g) * u)


@pytest.fixture(scope="module")
def vocab_weights():
    torch.manual_seed(1)
    d, f, v = (5120, 13824, 32000) if CUDA else (512, 1408, 32000)
    return (torch.randn(d, f, device=DEVICE, dtype=DTYPE) / d ** 0.5,
            torch.randn(v, d, device=DEVICE, dtype=DTYPE) / d ** 0.5)


def test_vocab_matmul_alone(benchmark, vocab_weights):
    w_out, w_u = vocab_weights
    benchmark(_run, lambda: w_out.t() @ w_u.t())


def test_vocab_topk_chunked_torch(benchmark, vocab_weights):
    w_out, w_u = vocab_weights
    benchmark(_run, lambda: vocab_topk_torch(w_out, w_u, 64))


@pytest.mark.skipif(not CUDA, reason="the Triton kernels are benchmarked on CUDA only")
@pytest.mark.parametrize("variant", [dict(method="filter"), dict(method="filter", gemm="torch"), dict(method="bitonic")],
                         ids=["filter", "filter-cublas", "bitonic"])
def test_vocab_topk_triton(benchmark, vocab_weights, variant):
    w_out, w_u = vocab_weights
    benchmark(_run, lambda: vocab_topk_triton(w_out, w_u, 64, **variant))
