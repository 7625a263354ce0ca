"""Ratio table: find vs plain generate, reference vs find, gradient baseline vs find, side by side.

    python bench/run_bench.py [--repeats 5] [--skip-demo]          # CPU: random LLaVA 8L/512d, a host-bound
                                                                    # 32L/64d one, and the demo model
    python bench/run_bench.py --gpu [--repeats 5]                   # GPU: LLaMA-7B-shaped layers, bf16,
                                                                    # find on the triton and torch backends

Medians of `repeats` runs each, measured in one process, interleaved per model.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (HOST_BOUND, NEW_TOKENS, demo_engine, find, gpu_llava_engines, hooks_peer, median_time,  # noqa: E402
                    plain_generate, random_llava_engine, reference)


def measure(name, eng, images, max_new_tokens, repeats):
    """Per image: plain generate (transformers' default cache), the engine's caption (its KV cache), find,
    the plain-hooks peer, the reference and the grad baseline. The first four are interleaved, once each per
    repeat, so a machine that slows down or speeds up meanwhile hits them alike."""
    runs = {"plain": lambda: plain_generate(eng, images, max_new_tokens),
            "caption": lambda: eng.caption(images, max_new_tokens=max_new_tokens, batch_size=8),
            "find": lambda: find(eng, images, max_new_tokens),
            "peer": lambda: hooks_peer(eng, images, max_new_tokens)}
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(median_time(fn, 1))
    t = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    t_plain, t_find = t["plain"], t["find"]
    # The slow baselines run on fewer images; every figure is reported per image.
    n, n_slow = len(images), max(1, len(images) // 4)
    t_ref = median_time(lambda: reference(eng, images[:n_slow], max_new_tokens), repeats) / n_slow
    t_grad = median_time(lambda: find(eng, images[:n_slow], max_new_tokens, method="grad"), repeats) / n_slow
    return dict(model=name, plain=t_plain / n, caption=t["caption"] / n, find=t_find / n, peer=t["peer"] / n,
                ref=t_ref, grad=t_grad)


def measure_gpu(repeats):
    """find (triton and torch backends, and triton with the kernel at decode steps too) vs plain
    generate, same weights, interleaved, per image."""
    engines, images = gpu_llava_engines()
    eng = engines["triton"]
    n = len(images)
    for e in engines.values():
        find(e, images, NEW_TOKENS)  # warm-up (Triton compiles here)
    plain_generate(eng, images, NEW_TOKENS)
    t = {"generate": [], **{b: [] for b in engines}, "kernel_decode": []}

    def kernel_at_decode():
        eng.decode_with_kernel = True
        try:
            return find(eng, images, NEW_TOKENS)
        finally:
            eng.decode_with_kernel = False

    kernel_at_decode()  # warm-up of the decode-shaped kernel
    for _ in range(repeats):  # interleaved, so drifting clocks hit every variant alike
        t["generate"].append(median_time(lambda: plain_generate(eng, images, NEW_TOKENS), 1))
        for b, e in engines.items():
            t[b].append(median_time(lambda: find(e, images, NEW_TOKENS), 1))
        t["kernel_decode"].append(median_time(kernel_at_decode, 1))
    med = {k: sorted(v)[len(v) // 2] / n for k, v in t.items()}
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; random LLaVA, 8 LLaMA-7B-shaped layers "
          f"(4096/11008), 576 image tokens, bf16, batch 8, {NEW_TOKENS} new tokens; seconds per image (medians of {repeats})")
    print("| generate s | find (triton) s | find/generate | find (torch hooks) s | find/generate "
          "| find (triton, kernel at decode steps too) s | find/generate |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {med['generate']:.4f} | {med['triton']:.4f} | {med['triton'] / med['generate']:.3f} | "
          f"{med['torch']:.4f} | {med['torch'] / med['generate']:.3f} | "
          f"{med['kernel_decode']:.4f} | {med['kernel_decode'] / med['generate']:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU table instead (needs CUDA)")
    args = ap.parse_args()
    if args.gpu:
        return measure_gpu(args.repeats)
    rows = []
    eng, imgs = random_llava_engine()
    rows.append(measure(f"random LLaVA 8L/512d/256 img tok, {NEW_TOKENS} new tok, 8 images", eng, imgs,
                        NEW_TOKENS, args.repeats))
    eng, imgs = random_llava_engine(shape=HOST_BOUND)
    rows.append(measure(f"random LLaVA 32L/64d/16 img tok (host-bound), {NEW_TOKENS} new tok, 8 images", eng, imgs,
                        NEW_TOKENS, args.repeats))
    if not args.skip_demo:
        eng, imgs = demo_engine()
        rows.append(measure("demo model (4L/128d/16 img tok), 8 images, <=12 tok", eng, imgs, 12, args.repeats))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("seconds per image (medians); generate = Hugging Face generate with its default (dynamic) cache; caption = "
          "the engine's captioning (its KV cache, static by default); peer = generate + plain forward hooks + scoring "
          "(bench/common.py hooks_peer); batches of 8; reference batch 1 without KV cache")
    print("| model | generate s | caption s | find s | find/generate | find/caption | peer s | peer/find "
          "| reference s | reference/find | grad s | grad/find |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain']:.3f} | {r['caption']:.3f} | {r['find']:.3f} | {r['find'] / r['plain']:.3f} | "
              f"{r['find'] / r['caption']:.3f} | {r['peer']:.3f} | {r['peer'] / r['find']:.2f} | "
              f"{r['ref']:.2f} | {r['ref'] / r['find']:.1f} | {r['grad']:.3f} | {r['grad'] / r['find']:.2f} |")


if __name__ == "__main__":
    main()
