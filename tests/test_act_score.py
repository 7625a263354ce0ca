"""act_score: the Triton kernel (under triton's CPU interpreter unless TRITON_INTERPRET=0 on a GPU)
against the torch path and a float64 reference, on small awkward shapes."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaMLP
from triton_device import kernel_device

from mmn_fast.kernels import ActScoreOut, ActScorePlans, act_score, act_score_torch, act_score_triton

DEVICE = kernel_device()

ACTS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")
REDUCES = ("sum", "mean", "max")
N_GROUPS = 4  # the generated layouts never use group 3: an empty group is always checked

ACT64 = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": lambda x: x.clamp_min(0),
    "identity": lambda x: x,
}


def reference(gate, up, act, proj, row_group, n_groups, reduce):
    """float64, literal: s[g, k, i] = reduce over the rows p of g of h[p, i] * P[i, k]."""
    a = ACT64[act](gate.double())  # [N, F]
    h = a * up.double() if up is not None else a
    p = proj.double().t()  # [K, F]
    scores = torch.zeros(n_groups, *p.shape, dtype=torch.float64)
    for g in range(n_groups):
        prod = h[(row_group == g).cpu()][:, None, :] * p[None]  # [n_g, K, F]
        if prod.shape[0] == 0:
            scores[g] = float("-inf") if reduce == "max" else 0.0
        else:
            scores[g] = {"sum": prod.sum(0), "mean": prod.mean(0), "max": prod.amax(0)}[reduce]
    return a, h, scores


def row_groups(layout, n, gen):
    if layout == "contiguous":  # sorted runs
        return torch.randint(0, N_GROUPS - 1, (n,), generator=gen).sort().values
    if layout == "interleaved":
        return torch.randint(0, N_GROUPS - 1, (n,), generator=gen)
    return torch.randint(-1, N_GROUPS - 1, (n,), generator=gen)  # some rows unscored


def capture_rows(kind, n, gen):
    if kind == "none":
        return None
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long)
    if kind == "subset":
        return torch.randperm(n, generator=gen)[: max(1, n // 3)]
    return torch.tensor([n - 1, 0, n - 1])  # duplicates


def poisoned(n, f, k, r, dtype, capture_act):
    nan = float("nan")
    return ActScoreOut(
        torch.full((n, f), nan, dtype=dtype, device=DEVICE),
        torch.full((N_GROUPS, k, f), nan, device=DEVICE),
        torch.full((r, f), nan, dtype=dtype, device=DEVICE) if r is not None else None,
        torch.full((r, f), nan, dtype=dtype, device=DEVICE) if r is not None and capture_act else None,
    )


def max_err(x, ref):
    """Largest |x - ref| over the finite entries of ref; -inf entries must match exactly."""
    x, ref = x.double().cpu(), ref.double().cpu()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), inf) and torch.equal(x[inf], ref[inf])
    return (x[~inf] - ref[~inf]).abs().max().item() if (~inf).any() else 0.0


def assert_matches(tri, tor, ref, dtype):
    """fp32: triton vs torch within 1e-5 relative. Half: triton's error against the float64
    reference at most twice the same-dtype torch path's error, plus a small epsilon."""
    assert tri.dtype == tor.dtype and tri.shape == tor.shape
    scale = max(ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 0.0, 1e-3)
    if dtype == torch.float32:
        assert max_err(tri, tor) <= 1e-5 * scale
    else:
        assert max_err(tri, ref) <= 2 * max_err(tor, ref) + 1e-6 * scale


SHAPES = [(1, 5, 1), (7, 37, 3), (33, 100, 64), (33, 37, 1), (7, 100, 64), (1, 37, 3)]
LAYOUTS = ("contiguous", "interleaved", "unscored")
CAPTURES = ("none", "empty", "subset", "dups")
CASES = []
for i, (act, reduce) in enumerate(itertools.product(ACTS, REDUCES)):
    for j, dtype in enumerate((torch.float32, (torch.float16, torch.bfloat16)[i % 2])):
        CASES.append((SHAPES[(i + j) % 6], dtype, act, (i // 3 + j) % 2 == 0, reduce,
                      LAYOUTS[(i + 2 * j) % 3], CAPTURES[(i + j) % 4], i % 2 == 0))


@pytest.mark.parametrize("shape,dtype,act,gated,reduce,layout,capture,capture_act", CASES)
def test_triton_matches_torch(shape, dtype, act, gated, reduce, layout, capture, capture_act):
    n, f, k = shape
    gen = torch.Generator().manual_seed(n * 1000 + f * 10 + k)
    gate = torch.randn(n, f, generator=gen).to(dtype)
    up = torch.randn(n, f, generator=gen).to(dtype) if gated else None
    proj = torch.randn(f, k, generator=gen)
    rg = row_groups(layout, n, gen)
    rows = capture_rows(capture, n, gen)
    _, h64, s64 = reference(gate, up, act, proj, rg, N_GROUPS, reduce)

    def dev(t):
        return t.to(DEVICE) if t is not None else None

    args = dict(proj=dev(proj), row_group=dev(rg), n_groups=N_GROUPS, reduce=reduce,
                capture_rows=dev(rows), capture_act=capture_act)
    r = rows.shape[0] if rows is not None else None
    out = poisoned(n, f, k, r, dtype, capture_act)
    # small blocks: several row tiles per chunk, several chunks per group (atomics combine them),
    # several F blocks
    tri = act_score_triton(dev(gate), dev(up), act, out=out, block_n=4, block_f=32, chunk_rows=8, **args)
    tor = act_score_torch(dev(gate), dev(up), act, **args)

    assert tri.h.data_ptr() == out.h.data_ptr() and not tri.h.isnan().any()  # every element written
    assert not tri.scores.isnan().any()
    assert_matches(tri.h, tor.h, h64, dtype)
    assert tri.scores.dtype == torch.float32 and tri.scores.shape == (N_GROUPS, k, f)
    assert_matches(tri.scores, tor.scores, s64, dtype)
    if reduce == "max":
        assert torch.isinf(tri.scores[N_GROUPS - 1]).all()
    else:
        assert (tri.scores[N_GROUPS - 1] == 0).all()
    if rows is None:
        assert tri.captured is None and tri.captured_act is None
        return
    assert not tri.captured.isnan().any()
    assert torch.equal(tri.captured, tri.h[dev(rows)])  # bit-identical to the stored h rows
    if capture_act:
        assert not tri.captured_act.isnan().any()
        a64 = ACT64[act](gate.double())[rows]
        assert_matches(tri.captured_act, tor.captured_act, a64, dtype)
    else:
        assert tri.captured_act is None


@pytest.mark.parametrize("act", ACTS)
def test_default_blocks_and_dispatch(act):
    """Default block sizes through `act_score(backend=...)`; row_group=None scores all rows as group 0."""
    gen = torch.Generator().manual_seed(7)
    gate, up = torch.randn(9, 130, generator=gen).to(DEVICE), torch.randn(9, 130, generator=gen).to(DEVICE)
    proj = torch.randn(130, 5, generator=gen).to(DEVICE)
    tri = act_score(gate, up, act, proj=proj, backend="triton")
    tor = act_score(gate, up, act, proj=proj, backend="torch")
    torch.testing.assert_close(tri.h, tor.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri.scores, tor.scores, rtol=1e-5, atol=1e-5)
    assert tri.scores.shape == (1, 5, 130) and tri.captured is None


def test_no_proj_plain_mlp_capture():
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(12, 20, generator=gen).to(DEVICE)
    rows = torch.tensor([11, 2, 5], device=DEVICE)
    tri = act_score_triton(gate, None, "quick_gelu", capture_rows=rows, capture_act=True)
    assert tri.scores is None
    torch.testing.assert_close(tri.h, gate * torch.sigmoid(1.702 * gate), rtol=1e-5, atol=1e-6)
    assert torch.equal(tri.captured, tri.h[rows]) and torch.equal(tri.captured_act, tri.h[rows])


@pytest.mark.parametrize("reduce", REDUCES)
def test_torch_path_float64_exact(reduce):
    gen = torch.Generator().manual_seed(11)
    gate, up = torch.randn(10, 13, generator=gen, dtype=torch.float64), torch.randn(10, 13, generator=gen, dtype=torch.float64)
    proj = torch.randn(13, 4, generator=gen, dtype=torch.float64)
    rg = torch.tensor([0, 0, -1, 2, 2, 2, 0, -1, 1, 1])
    got = act_score_torch(gate, up, "gelu", proj=proj, row_group=rg, n_groups=4, reduce=reduce)
    _, h64, s64 = reference(gate, up, "gelu", proj, rg, 4, reduce)
    assert got.scores.dtype == torch.float64
    torch.testing.assert_close(got.h, h64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.scores, s64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act,hf", [("silu", "silu"), ("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh"),
                                    ("quick_gelu", "quick_gelu"), ("relu", "relu")])
def test_torch_path_named_acts_are_hf_bit_exact(act, hf):
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert torch.equal(act_score_torch(x, None, act).h, ACT2FN[hf](x))


def test_torch_path_act_module_bit_identical_to_llama_mlp():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu")).to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        got = act_score(mlp.gate_proj(x), mlp.up_proj(x), "silu", act_module=mlp.act_fn)
        assert torch.equal(mlp.down_proj(got.h), mlp(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(act="tanh"), "unknown act"),
        (dict(reduce="median"), "unknown reduce"),
        (dict(proj=torch.randn(7, 3)), r"proj must be \[F=6"),
        (dict(proj=torch.randn(6, 65)), "K must be in 1..64"),
        (dict(proj=torch.randn(6, 0)), "K must be in 1..64"),
        (dict(row_group=torch.tensor([0, 1, 4, 0]), n_groups=2), "row_group values"),
        (dict(row_group=torch.tensor([0.0, 1, 1, 0]), n_groups=2), "integer"),
        (dict(row_group=torch.tensor([0, 1]), n_groups=2), r"\[N=4\]"),
        (dict(capture_rows=torch.tensor([4])), "capture_rows must be in"),
        (dict(up=torch.randn(4, 5)), "up must match"),
        (dict(act="identity", up=torch.randn(4, 6)), "with up=None"),
        (dict(gate=torch.randn(4, 6, dtype=torch.float64)), "not supported on the Triton path"),
        (dict(gate=torch.randn(4, 6).int()), "not supported"),
    ],
)
def test_validation(kwargs, match):
    args = dict(gate=torch.randn(4, 6), up=None, act="silu", proj=torch.randn(6, 3), n_groups=1)
    args.update(kwargs)
    if "row_group" not in kwargs and "proj" in args:
        args["row_group"] = torch.tensor([0, 0, -1, 0])
    gate, up, act = args.pop("gate"), args.pop("up"), args.pop("act")
    with pytest.raises(ValueError, match=match):
        act_score_triton(gate.to(DEVICE), up, act, **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()})


def test_importable_without_triton(tmp_path):
    """`import mmn_fast.kernels` and the torch paths work with triton unimportable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mmn_fast.kernels as k\n"
        "assert not k.triton_available()\n"
        "out = k.act_score(torch.randn(3, 4), None, 'relu', proj=torch.randn(4, 2))\n"
        "assert out.scores.shape == (1, 2, 4)\n"
        "assert k.vocab_topk(torch.randn(5, 4), torch.randn(9, 5), 2, both=True).top_ids.shape == (4, 2)\n"
        "try:\n    k.act_score(torch.randn(3, 4), None, 'relu', backend='triton')\n"
        "except RuntimeError as e:\n    assert 'needs triton' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
        "assert 'torch.cuda' not in sys.modules or not torch.cuda.is_initialized()\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)  # not the repo root: import the installed package

    assert res.returncode == 0, res.stderr


class CountingPlans(ActScorePlans):
    """ActScorePlans that records each value it has to make."""

    def __init__(self):
        super().__init__()
        self.made = []

    def get(self, name, key, device, extra, make):
        return super().get(name, key, device, extra, lambda: self.made.append(name) or make())


@pytest.mark.parametrize("keep_plans", [True, False], ids=["plans", "no-plans"])
def test_cached_plans_follow_in_place_changes(keep_plans):
    """The row plan / capture slots / range checks kept in a caller's ActScorePlans for one
    row_group tensor are redone when that tensor is modified in place, and inference-mode tensors
    are never cached; without plans every call computes them afresh."""
    gen = torch.Generator().manual_seed(2)
    gate = torch.randn(10, 24, generator=gen).to(DEVICE)
    proj = torch.randn(24, 2, generator=gen).to(DEVICE)
    rg = torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, 0, 0], device=DEVICE)
    rows = torch.tensor([1, 4, 8], device=DEVICE)
    plans = CountingPlans() if keep_plans else None

    def both():
        kw = dict(proj=proj, row_group=rg, n_groups=3, capture_rows=rows, plans=plans)
        return act_score_triton(gate, None, "relu", block_n=2, block_f=16, **kw), act_score_torch(gate, None, "relu", **kw)

    for _ in range(2):  # second call uses the cached plan
        tri, tor = both()
        torch.testing.assert_close(tri.scores, tor.scores, rtol=1e-5, atol=1e-5)
    if keep_plans:  # each made once, on the first call
        assert sorted(plans.made) == ["capture", "capture_rows in range", "row_group in range", "rows"]
    rg[2:5] = 2  # in place: the plan must be rebuilt
    rows[0] = 4  # now with a duplicate
    tri, tor = both()
    torch.testing.assert_close(tri.scores, tor.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(tri.captured, tri.h[rows])
    if keep_plans:
        assert sorted(plans.made[4:]) == ["capture", "capture_rows in range", "row_group in range", "rows"]
    rg[0] = 3  # out of range now: the check is redone
    with pytest.raises(ValueError, match="row_group values"):
        both()
    with torch.inference_mode():
        rg, rows = torch.tensor([1, 1, 0, 0, 0, 0, 2, 2, -1, 0], device=DEVICE), torch.tensor([9, 9], device=DEVICE)
        tri, tor = both()
        torch.testing.assert_close(tri.scores, tor.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(tri.captured, tri.h[rows])


def test_plans_keep_one_entry_per_device():
    """Layers that alternate devices (a device_map over GPUs) reuse each device's plan instead of
    rebuilding it at every boundary."""
    plans = ActScorePlans()
    made = []
    rows_a, rows_b = torch.arange(3), torch.arange(4)
    for _ in range(3):
        for dev, rows in (("cuda:0", rows_a), ("cuda:1", rows_b)):
            plans.get("rows", rows, torch.device(dev), (7,), lambda d=dev: made.append(d) or d)
    assert made == ["cuda:0", "cuda:1"]
    rows_a.add_(1)  # in place: that device's entry is rebuilt, the other is kept
    for dev, rows in (("cuda:0", rows_a), ("cuda:1", rows_b)):
        plans.get("rows", rows, torch.device(dev), (7,), lambda d=dev: made.append(d) or d)
    assert made == ["cuda:0", "cuda:1", "cuda:0"]
    plans.clear()  # drops the tensors: the next lookup makes again
    plans.get("rows", rows_b, torch.device("cuda:1"), (7,), lambda: made.append("again"))
    assert made[-1] == "again"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduce", REDUCES)
def test_identity_reads_h_without_changing_or_copying_it(dtype, reduce):
    """act="identity": the input is h as the model computed it; the kernel only reads it (captures are its
    very rows, scores reduce it), and returns it as out.h, not a copy. Awkward sizes, unscored rows."""
    gen = torch.Generator().manual_seed(17)
    n, f, k = 29, 75, 3
    h = torch.randn(n, f, generator=gen).to(dtype)
    proj = torch.randn(f, k, generator=gen)
    rg = row_groups("unscored", n, gen)
    rows = capture_rows("dups", n, gen)
    args = dict(proj=proj.to(DEVICE), row_group=rg.to(DEVICE), n_groups=N_GROUPS, reduce=reduce,
                capture_rows=rows.to(DEVICE))
    before = h.clone()
    dh = h.to(DEVICE)
    tri = act_score_triton(dh, None, "identity", block_n=4, block_f=32, chunk_rows=8, **args)
    tor = act_score_torch(dh, None, "identity", **args)
    assert tri.h is dh and tor.h is dh and torch.equal(dh.cpu(), before)
    assert torch.equal(tri.captured.cpu(), before[rows]) and torch.equal(tor.captured.cpu(), before[rows])
    _, _, s64 = reference(before, None, "identity", proj, rg, N_GROUPS, reduce)
    assert_matches(tri.scores, tor.scores, s64, torch.float32)  # both reduce the same values in fp32
