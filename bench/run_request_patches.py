"""Per-request patches: what mixing patches into one batch costs, side by side in one run.

    python bench/run_request_patches.py [--repeats 5] [--device cpu|cuda] [--neurons 20]

Table 1 (end to end): the benchmark's random LLaVA (8 layers, hidden 512, 256 image tokens, 32 new
tokens), `engine.caption` of one batch of 16 images unpatched, vs the same batch with 4 distinct
patches of `--neurons` neurons each (random layers) on 12 rows and 4 rows unpatched, vs all 16 rows
patched. Medians of `--repeats`, the runs interleaved (base, mixed, all, base, ...) so drift hits
each alike; ratio = time / unpatched time.

Table 2 (one layer, one decode step of 16 rows): the output projection alone, plus the neuron
gather (`neuron_delta`) of 4 patches, vs plus a LoRA of rank r = neurons per layer per patch (what a
serving engine runs for the exported adapter: x A^T B^T per adapter). Medians of 200 calls, microseconds.

Table 3: registering a patch (`engine.patches.load`: validation against the weights) and reading
one from disk, milliseconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import LARGE, NEW_TOKENS, median_time, random_llava_engine  # noqa: E402

from mmn_fast.kernels import NeuronDeltas, neuron_delta  # noqa: E402
from mmn_fast.model.patch_file import load_patch, make_patch  # noqa: E402

BATCH, N_PATCHES = 16, 4


def random_patches(engine, n_patches: int, neurons: int, seed: int = 0) -> list:
    """n_patches patches of `neurons` uniformly drawn neurons each, random new output vectors."""
    ad = engine.adapter
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    d = ad.out_weight(0).shape[0]
    patches = []
    for _ in range(n_patches):
        per: dict[int, list[int]] = {}
        for k in sorted(rng.sample(range(ad.n_layers * ad.d_mlp), neurons)):
            per.setdefault(k // ad.d_mlp, []).append(k % ad.d_mlp)
        rows = {l: (torch.tensor(ix), torch.randn(len(ix), d, generator=gen) * 0.02) for l, ix in per.items()}
        patches.append(make_patch(ad, rows, "bench"))
    return patches


def end_to_end(engine, images, patches, repeats: int) -> dict:
    mixed = [patches[i % N_PATCHES] if i % 4 != 3 else None for i in range(BATCH)]  # 12 patched, 4 base
    every = [patches[i % N_PATCHES] for i in range(BATCH)]
    runs = {"unpatched": None, "4 patches on 12 of 16 rows": mixed, "4 patches on all 16 rows": every}
    fns = {k: (lambda rows=rows: engine.caption(images, max_new_tokens=NEW_TOKENS, batch_size=BATCH, patches=rows))
           for k, rows in runs.items()}
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(median_time(fn, 1))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def one_layer(engine, neurons_per_layer: int, device: str) -> dict:
    """One decode step of one layer's output projection: alone, + neuron gather, + LoRA rank r."""
    w = engine.adapter.out_weight(0).detach().to(device)  # [d, F]
    d, f = w.shape
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(BATCH, 1, f, generator=gen).to(device, w.dtype)
    r = neurons_per_layer
    idx = torch.stack([torch.randperm(f, generator=gen)[:r] for _ in range(N_PATCHES)]).to(device)  # [P, r]
    delta = (torch.randn(N_PATCHES, r, d, generator=gen) * 0.02).to(device)
    deltas = NeuronDeltas(idx, delta, torch.full((N_PATCHES,), r, device=device), (r,) * N_PATCHES)
    row_patch = torch.arange(BATCH, device=device) % N_PATCHES
    lora_a = torch.zeros(N_PATCHES, r, f, device=device, dtype=w.dtype)  # one-hot rows, as exported
    lora_a[torch.arange(N_PATCHES)[:, None], torch.arange(r)[None, :], idx.cpu()] = 1
    lora_b = delta.transpose(1, 2).to(w.dtype).contiguous()  # [P, d, r]
    backend = "triton" if device == "cuda" else "torch"

    def base():
        return torch.nn.functional.linear(h, w)

    def gather():
        return neuron_delta(h, base(), row_patch, deltas, backend)

    def lora():  # batched over rows like a segmented multi-LoRA kernel: (h A_p^T) B_p^T
        a, b = lora_a.index_select(0, row_patch), lora_b.index_select(0, row_patch)  # [B, r, F], [B, d, r]
        return base() + torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))

    with torch.no_grad():
        for fn in (base, gather, lora):
            fn()
        return {k: median_time(fn, 200) * 1e6 for k, fn in
                (("output projection alone", base), ("+ neuron gather", gather), (f"+ LoRA rank {r}", lora))}


def load_times(engine, patches, repeats: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = patches[0].save(os.path.join(tmp, "p.mmnpatch.safetensors"))
        read = median_time(lambda: load_patch(path), repeats)

        def register():
            engine.patches.load("bench", patches[0])
            engine.patches.unload("bench")

        reg = median_time(register, repeats)
    return {"read + validate the file (load_patch)": read * 1e3, "engine.patches.load (checks vs weights)": reg * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--neurons", type=int, default=20, help="neurons per patch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    engine, images = random_llava_engine(shape=LARGE, device=args.device)  # CUDA: the Triton kernel
    images = (images * (BATCH // len(images) + 1))[:BATCH]
    patches = random_patches(engine, N_PATCHES, args.neurons)
    print(f"(built the model in {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    print(f"# per-request patches, {args.device} ({cpu}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, backend {engine.patches.backend}")
    print(f"\n## caption, batch {BATCH}, {NEW_TOKENS} new tokens, {N_PATCHES} patches x {args.neurons} neurons, "
          f"median of {args.repeats}\n")
    print("| batch | s | ratio |\n|---|---|---|")
    e2e = end_to_end(engine, images, patches, args.repeats)
    for k, v in e2e.items():
        print(f"| {k} | {v:.2f} | {v / e2e['unpatched']:.3f} |")
    per_layer = max(1, round(args.neurons / engine.adapter.n_layers * 2))  # a patch spread over ~half the layers
    print(f"\n## one layer, one decode step ({BATCH} rows, d={engine.adapter.out_weight(0).shape[0]}, "
          f"F={engine.adapter.d_mlp}, {N_PATCHES} patches x {per_layer} neurons), median of 200, us\n")
    print("| step | us | ratio |\n|---|---|---|")
    layer = one_layer(engine, per_layer, args.device)
    first = next(iter(layer.values()))
    for k, v in layer.items():
        print(f"| {k} | {v:.1f} | {v / first:.2f} |")
    print("\n## loading a patch, median of 20, ms\n\n| step | ms |\n|---|---|")
    for k, v in load_times(engine, patches).items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
