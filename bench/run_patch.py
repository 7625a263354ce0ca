"""Patch apply/revert latency and memory: the demo model and a LLaMA-7B-shaped stack of out projections.

    python bench/run_patch.py [--neurons 1000] [--repeats 50] [--device cpu|cuda] [--skip-7b]

The 7B shape: 32 decoder layers whose MLP output projection is nn.Linear(11008 -> 4096) in bf16 (the
only weights a patch touches), in a minimal module tree with an lm_head, patched through an adapter
spec like any model. The demo model has 4 x 64 = 256 MLP neurons, so its patch touches all of them.
Each row: patch file size, load_patch (read + validate), apply (checks + SHA-256 of the current
vectors + write) and revert (order and integrity checks + write), medians of `repeats`; resident
memory growth over all the cycles (after a warm-up), and what an applied handle holds.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import tempfile
import time

import torch
from torch import nn

import mmn_fast
from mmn_fast.demo import build_demo_model
from mmn_fast.model.live import apply_patch, resolve_target
from mmn_fast.model.patch_file import load_patch, make_patch

SPEC_7B = dict(layers="layers", mlp="mlp", out_proj="down_proj", gated=False)
SHAPE_7B = dict(n_layers=32, d_model=4096, d_mlp=11008, vocab=1024)


def llama7b_outprojs(device="cpu", dtype=torch.bfloat16) -> nn.Module:
    """32 x Linear(11008 -> 4096) bf16 with random weights, under layers.<l>.mlp.down_proj, plus an lm_head."""
    s = SHAPE_7B
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(s["n_layers"]):
        layer = nn.Module()
        layer.mlp = nn.Module()
        layer.mlp.down_proj = nn.Linear(s["d_mlp"], s["d_model"], bias=False, device="meta")
        layer.mlp.down_proj.weight = nn.Parameter(
            torch.randn(s["d_model"], s["d_mlp"], device=device, dtype=dtype) * 0.02, requires_grad=False)
        model.layers.append(layer)
    model.lm_head = nn.Linear(s["d_model"], s["vocab"], bias=False, device=device, dtype=dtype)
    return model


def random_patch(adapter, n: int, seed: int = 0):
    """A patch giving n uniformly drawn neurons random new output vectors."""
    rng = random.Random(seed)
    flat = rng.sample(range(adapter.n_layers * adapter.d_mlp), n)
    per: dict[int, list[int]] = {}
    for k in sorted(flat):
        per.setdefault(k // adapter.d_mlp, []).append(k % adapter.d_mlp)
    gen = torch.Generator().manual_seed(seed)
    d = adapter.out_weight(0).shape[0]
    rows = {l: (torch.tensor(ix), torch.randn(len(ix), d, generator=gen) * 0.02) for l, ix in per.items()}
    return make_patch(adapter, rows, "bench", {"source": "x"}, {"neurons": n})


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def gpu_mb(device) -> float:
    return torch.cuda.memory_allocated(device) / 2 ** 20 if str(device).startswith("cuda") else 0.0


def measure(name, target, adapter, n, repeats, device, **spec):
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    patch = random_patch(adapter, n)
    with tempfile.TemporaryDirectory() as tmp:
        path = patch.save(os.path.join(tmp, "p.mmnpatch.safetensors"))
        size_kb = os.path.getsize(path) / 1024
        t_load = []
        for _ in range(max(3, repeats // 10)):
            t0 = time.perf_counter()
            patch = load_patch(path)
            t_load.append(time.perf_counter() - t0)
    for _ in range(3):  # warm-up: allocator, first-use paths
        apply_patch(target, patch, **spec).revert()
    gc.collect()
    rss0, gpu0 = rss_mb(), gpu_mb(device)
    t_apply, t_revert, held = [], [], 0
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        handle = apply_patch(target, patch, **spec)
        sync()
        t1 = time.perf_counter()
        held = sum(o.numel() * o.element_size() + w.numel() * w.element_size() for _, o, w in handle.saved_rows)
        handle.revert()
        sync()
        t_apply.append(t1 - t0)
        t_revert.append(time.perf_counter() - t1)
    gc.collect()
    med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
    return dict(model=name, dtype=str(adapter.out_weight(0).dtype).replace("torch.", ""), neurons=patch.n_neurons,
                layers=len(patch.entries), size_kb=size_kb, load=med(t_load), apply=med(t_apply),
                revert=med(t_revert), rss=rss_mb() - rss0, gpu=gpu_mb(device) - gpu0, held_mb=held / 2 ** 20)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    demo = mmn_fast.load(build_demo_model(progress=False), device=args.device)
    n_demo = min(args.neurons, demo.adapter.n_layers * demo.adapter.d_mlp)
    rows.append(measure("demo (LLaVA 4L, 128d, 4x64 neurons)", demo, demo.adapter, n_demo, args.repeats, args.device))
    if not args.skip_7b:
        t0 = time.perf_counter()
        model = llama7b_outprojs(args.device)
        print(f"(built the 7B-shaped out projections in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        adapter = resolve_target(model, SPEC_7B)[1]
        rows.append(measure("LLaMA-7B shape (32L x 4096 x 11008)", model, adapter, args.neurons, args.repeats,
                            args.device, **SPEC_7B))
    cpu = platform.processor() or platform.machine()
    print(f"# patch apply/revert, {args.device} ({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"medians of {args.repeats}")
    print(f"| model | dtype | neurons (layers) | file KiB | load ms | apply ms | revert ms | held by handle MiB "
          f"| RSS growth MiB | GPU growth MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['neurons']} ({r['layers']}) | {r['size_kb']:.0f} | {r['load']:.2f} "
              f"| {r['apply']:.2f} | {r['revert']:.2f} | {r['held_mb']:.1f} | {r['rss']:+.1f} | {r['gpu']:+.1f} |")


if __name__ == "__main__":
    main()
