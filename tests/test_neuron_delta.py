"""neuron_delta: the Triton kernel (under triton's CPU interpreter unless a GPU is present) and the
same-dtype torch path against an fp64 reference, on awkward shapes; rows without a patch keep their bits."""
import pytest
import torch
from triton_device import kernel_device

import mmn_fast
from mmn_fast.kernels import (NeuronDeltas, neuron_delta, neuron_delta_torch,
                              neuron_delta_triton)
from mmn_fast.model.patch_file import make_patch
from mmn_fast.testing import random_images
from mmn_fast.testing.llava import llava_model

DEVICE = kernel_device()

SHAPES = [(5, 7, 37, 29, (3, 0, 19)), (3, 1, 50, 64, (1, 17)), (4, 33, 96, 70, (16, 5, 2, 40)), (1, 2, 8, 5, (8,))]


def make(b, t, f, d, counts, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, f, generator=g).to(dtype)
    out = torch.randn(b, t, d, generator=g).to(dtype)
    p, n = len(counts), max(counts)
    idx = torch.zeros(p, n, dtype=torch.int64)
    delta = torch.zeros(p, n, d)
    for s, c in enumerate(counts):
        idx[s, :c] = torch.randperm(f, generator=g)[:c]
        delta[s, :c] = torch.randn(c, d, generator=g)
    row_patch = torch.randint(-1, p, (b,), generator=g)
    row_patch[0] = p - 1  # at least one patched row
    deltas = NeuronDeltas(idx.to(DEVICE), delta.to(DEVICE), torch.tensor(counts, device=DEVICE), tuple(counts))
    return h.to(DEVICE), out.to(DEVICE), row_patch.to(DEVICE), deltas


def exact(h, out, row_patch, deltas):
    """fp64: out[b] + h[b][:, S_p] @ D_p."""
    ref = out.double().clone()
    for b, p in enumerate(row_patch.tolist()):
        if p >= 0:
            c = deltas.counts_list[p]
            ref[b] += h[b].double()[:, deltas.idx[p, :c]] @ deltas.delta[p, :c].double()
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_and_torch_path_match_fp64(shape, dtype):
    h, out, row_patch, deltas = make(*shape, dtype, seed=sum(shape[:4]))
    want = exact(h, out, row_patch, deltas)
    torch_out = neuron_delta_torch(h, out, row_patch, deltas)
    kernel_out = neuron_delta_triton(h, out.clone(), row_patch, deltas)
    # both round once from an fp32 sum: within one ulp of the exact result, plus fp32 accumulation
    ulp = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    scale = want.abs().amax(-1, keepdim=True).clamp(min=1)
    for got in (torch_out, kernel_out):
        assert got.dtype == dtype
        assert ((got.double() - want).abs() / scale).max() <= ulp
    assert ((kernel_out.double() - torch_out.double()).abs() / scale).max() <= ulp
    for b, p in enumerate(row_patch.tolist()):
        if p < 0 or deltas.counts_list[p] == 0:
            assert torch.equal(kernel_out[b], out[b]) and torch.equal(torch_out[b], out[b])


def test_strided_activations_and_the_dispatcher():
    h, out, row_patch, deltas = make(4, 9, 40, 24, (5, 12), torch.float32, seed=3)
    wide = torch.randn(4, 9, 80, device=DEVICE)
    wide[..., ::2] = h  # a non-contiguous view with the same values
    strided = wide[..., ::2]
    want = neuron_delta_torch(h, out, row_patch, deltas)
    assert torch.allclose(neuron_delta(strided, out.clone(), row_patch, deltas, backend="triton"), want,
                          rtol=1e-6, atol=1e-6)
    h.requires_grad_(True)  # under autograd the dispatcher takes the torch path (out of place)
    kept = out.clone()
    res = neuron_delta(h, out, row_patch, deltas, backend="triton")
    assert torch.equal(out, kept) and res.requires_grad
    with pytest.raises(ValueError, match="one device|must be"):
        neuron_delta_torch(h[:, :, :5], out[:2], row_patch, deltas)


def test_engine_on_the_triton_backend_matches_the_torch_backend():
    """The whole path: per-request patches through the kernel (backend='triton') give the torch
    backend's logits and captions."""
    model, processor = llava_model(num_layers=2, hidden_size=64, intermediate_size=96, seed=8)
    model = model.to(DEVICE)
    tri = mmn_fast.load(model, processor=processor, device=DEVICE, backend="triton")
    ref = mmn_fast.load(model, processor=processor, device=DEVICE, backend="torch")
    assert tri.patches.backend == "triton"
    g = torch.Generator().manual_seed(2)
    vectors = {1: (torch.tensor([3, 50, 77]), 4 * torch.randn(3, 64, generator=g))}
    patch = make_patch(ref.adapter, vectors, "test")
    images = random_images(3, size=32, seed=1)
    rows = [(patch,), (), (patch,)]
    inputs = ref.encode(images, "Describe the image.")
    with torch.no_grad(), tri.patches.active(rows):
        got = model(**inputs).logits
    with torch.no_grad(), ref.patches.active(rows):
        want = model(**inputs).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and torch.equal(got[1], want[1])
    assert tri.caption(images, max_new_tokens=6, patches=list(rows)) == ref.caption(images, max_new_tokens=6,
                                                                                   patches=list(rows))
