"""Kernel ratio table: the fused MLP step (`act_score`) and each neuron's top tokens (`vocab_topk`).

    python bench/run_kernels.py                     # CPU: torch paths, small LLaMA-like shapes
    python bench/run_kernels.py --device cuda       # GPU: Triton vs torch at LLaMA-7B/13B sizes
    python bench/run_kernels.py --smoke             # tiny shapes, Triton under the interpreter (checks the script)

Medians of --repeats runs, every variant measured side by side in one process. GB/s counts the
bytes a kernel must move (gate and up read, h written); the copy row is a device-to-device copy
(bytes read + written), the bandwidth yardstick the targets are stated against.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import median_time  # noqa: E402

from mmn_fast.kernels import (  # noqa: E402
    ActScorePlans,
    act_score,
    triton_available,
    vocab_topk,
    vocab_topk_torch,
    vocab_topk_triton,
)
from mmn_fast.kernels.timing import copy_bandwidth  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (Triton compiles on first call)
    return median_time(fn, repeats)


def peak_extra(fn, device) -> int | None:
    """Peak bytes allocated by `fn` beyond what was live before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def act_score_rows(device, dtype, n_samples, seq, n_image, f, k, repeats, triton_ok):
    """MLP activation + capture (+ image-position scoring) for one layer's prefill of a batch."""
    n = n_samples * seq
    g = torch.randn(n, f, device=device, dtype=dtype)
    u = torch.randn(n, f, device=device, dtype=dtype)
    proj = torch.randn(f, k, device=device)
    pos = torch.arange(seq, device=device)
    img = (pos >= 5) & (pos < 5 + n_image)  # image tokens after a short prefix
    group = torch.where(img[None], torch.arange(n_samples, device=device)[:, None], -1).reshape(-1)
    last = torch.arange(n_samples, device=device) * seq + seq - 1
    moved = 3 * n * f * g.element_size()  # gate + up read, h written
    rows = []

    def add(name, fn, nbytes=moved):
        t = timed(fn, repeats)
        rows.append((name, t, nbytes / t))

    h = F.silu(g) * u  # [n, F] h as the model computes it
    read_h = n * f * g.element_size()  # identity mode reads h only

    add("act(gate) * up alone (what the model computes anyway)", lambda: F.silu(g) * u)
    add("unfused torch: h, capture, image scores", lambda: act_score(
        g, u, "silu", proj=proj, row_group=group, n_groups=n_samples, capture_rows=last, backend="torch"))
    add("unfused torch: h + capture", lambda: act_score(g, u, "silu", capture_rows=last, backend="torch"))
    if triton_ok:
        add("fused triton: h, capture, image scores", lambda: act_score(
            g, u, "silu", proj=proj, row_group=group, n_groups=n_samples, capture_rows=last, backend="triton"))
        add("fused triton: h + capture", lambda: act_score(g, u, "silu", capture_rows=last, backend="triton"))
        # The fused capture since 2026-12: the model's own act(gate) * up, then the kernel only reads h
        add("identity triton: read h, capture, image scores (h read only)", lambda: act_score(
            h, None, "identity", proj=proj, row_group=group, n_groups=n_samples, capture_rows=last,
            backend="triton"), read_h)
        add("act(gate) * up + identity triton (the fused capture now)", lambda: act_score(
            F.silu(g) * u, None, "identity", proj=proj, row_group=group, n_groups=n_samples, capture_rows=last,
            backend="triton"), moved + read_h)
    return rows, n, moved


def vocab_rows(device, dtype, d, f, v, k, repeats, triton_ok):
    w_out = torch.randn(d, f, device=device, dtype=dtype) / d ** 0.5
    w_u = torch.randn(v, d, device=device, dtype=dtype) / d ** 0.5
    rows = []

    def add(name, fn):
        t = timed(fn, repeats)
        rows.append((name, t, peak_extra(fn, device)))

    add(f"matmul alone ({str(dtype).replace('torch.', '')}, F x V output)", lambda: w_out.t() @ w_u.t())
    add("matmul + torch.topk", lambda: (w_out.t() @ w_u.t()).float().topk(k, dim=1))
    add("chunked torch (4096-token chunks)", lambda: vocab_topk_torch(w_out, w_u, k))
    if triton_ok:
        add("triton filter: top-k", lambda: vocab_topk(w_out, w_u, k, backend="triton"))
        add("triton filter: top-k + bottom-k", lambda: vocab_topk(w_out, w_u, k, both=True, backend="triton"))
        add("triton filter on cuBLAS fp32 logits (8192-token chunks): top-k + bottom-k",
            lambda: vocab_topk_triton(w_out, w_u, k, both=True, gemm="torch"))
        for bf, bv, warps, stages in ((128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4)):  # tuning data
            add(f"triton filter {bf}x{bv}x64, {warps} warps, {stages} stages: top-k + bottom-k",
                lambda bf=bf, bv=bv, w=warps, st=stages: vocab_topk_triton(
                    w_out, w_u, k, both=True, block_f=bf, block_v=bv, num_warps=w, num_stages=st))
        add("triton filter, probe every 16th token: top-k + bottom-k",
            lambda: vocab_topk_triton(w_out, w_u, k, both=True, probe_stride=16))
        add("triton bitonic running top-k: top-k + bottom-k",
            lambda: vocab_topk_triton(w_out, w_u, k, both=True, method="bitonic"))
    return rows


def host_rows(device, dtype, f, calls=2000):
    """Host cost of one decode-step MLP call (batch 8, one new token: the kernels are tiny, so the
    Python and launch overhead is what a decode step pays per layer). On CUDA: `calls` launches
    timed with one sync at the end. On CPU the Triton launch is replaced by a no-op (the
    interpreter would time itself), so that row is our own Python only."""
    g = torch.randn(8, f, device=device, dtype=dtype)
    u = torch.randn_like(g)
    rows = torch.arange(8, device=device)
    silu = torch.nn.SiLU()
    plans = ActScorePlans()  # as find keeps them: the index checks and row plan made once for all calls

    def per_call(fn):
        for _ in range(50):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls

    out = [("model's own act(gate) * up", per_call(lambda: silu(g) * u)),
           ("fused decode step as find runs it (last position: the step's own rows)",
            per_call(lambda: (silu(g) * u).detach())),
           ("torch path: h + capture of the last rows",
            per_call(lambda: act_score(g, u, "silu", capture_rows=rows, backend="torch", act_module=silu,
                                      plans=plans)))]
    if not triton_available():
        return out
    import mmn_fast.kernels._act_score_triton as kmod

    real, env = kmod.act_score_kernel, os.environ.get("TRITON_INTERPRET")
    if device.type != "cuda":  # CPU tensors pass the device check only with the interpreter flag set

        class _NoLaunch:
            def __getitem__(self, grid):
                return lambda *a, **k: None

        kmod.act_score_kernel, os.environ["TRITON_INTERPRET"] = _NoLaunch(), "1"
    try:
        name = "triton path: h + capture" + ("" if device.type == "cuda" else " (launch stubbed: our Python only)")
        out.append((name, per_call(lambda: act_score(g, u, "silu", capture_rows=rows, backend="triton",
                                                           plans=plans))))
    finally:
        kmod.act_score_kernel = real
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, Triton under the interpreter")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    triton_ok = cuda or args.smoke
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        act_shapes = [("smoke", 2, 12, 8, 100)]
        vocab_shape = ("smoke", 16, 37, 301, 5)
    elif cuda:
        # batch 8 x (576 image tokens + 40 text tokens), llava-1.5 prefill; LLaMA-7B and 13B MLP widths
        act_shapes = [("LLaMA-7B MLP (F=11008)", 8, 616, 576, 11008), ("LLaMA-13B MLP (F=13824)", 8, 616, 576, 13824)]
        vocab_shape = ("13B layer: F=13824, V=32000, d=5120", 5120, 13824, 32000, 64)
    else:
        act_shapes = [("F=1408 (random LLaVA 8L/512d)", 8, 300, 256, 1408)]
        vocab_shape = ("F=1408, V=32000, d=512", 512, 1408, 32000, 64)

    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, {str(dtype).replace('torch.', '')}, medians of {args.repeats}")
    copy_bw = copy_bandwidth(device, (1 << 30) if cuda else (256 << 20), args.repeats)
    print(f"\ndevice copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s\n")
    for label, b, seq, n_img, f in act_shapes:
        rows, n, moved = act_score_rows(device, dtype, b, seq, n_img, f, 64, args.repeats, triton_ok)
        base = rows[0][1]
        print(f"act_score, {label}: {n} rows, K=64 targets, {moved / 1e6:.0f} MB moved")
        print("| variant | ms | GB/s | of copy bandwidth | time / act*up alone |")
        print("|---|---|---|---|---|")
        for r, t, bw in rows:
            print(f"| {r} | {t * 1e3:.3f} | {bw / 1e9:.0f} | {100 * bw / copy_bw:.0f}% | {t / base:.2f} |")
        print()
    host = host_rows(device, dtype, act_shapes[-1][-1], calls=200 if args.smoke else 2000)
    print(f"host cost per decode-step MLP call (batch 8, F={act_shapes[-1][-1]})")
    print("| variant | us per call |")
    print("|---|---|")
    for r, t in host:
        print(f"| {r} | {t * 1e6:.1f} |")
    print()
    label, d, f, v, k = vocab_shape
    rows = vocab_rows(device, dtype, d, f, v, k, args.repeats, triton_ok)
    base = rows[0][1]
    print(f"vocab_topk, {label}, k={k}")
    print("| variant | ms | time / matmul alone | peak extra memory MB |")
    print("|---|---|---|---|")
    for r, t, mem in rows:
        mem_s = f"{mem / 1e6:.0f}" if mem is not None else "n/a (CPU)"
        print(f"| {r} | {t * 1e3:.2f} | {t / base:.2f} | {mem_s} |")


if __name__ == "__main__":
    main()
