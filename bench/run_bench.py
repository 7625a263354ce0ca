"""Ratio table: find vs plain generate, reference vs find, gradient baseline vs find, side by side.

    python bench/run_bench.py [--repeats 5] [--skip-demo]          # CPU: random LLaVA 8L/512d, a host-bound
                                                                    # 32L/64d one, and the demo model
    python bench/run_bench.py --gpu [--repeats 3] [--layers 32] [--batches 8 32 64]
                                                                    # GPU: LLaMA-7B-shaped layers, bf16, images/s of
                                                                    # generate, caption, find (triton, torch), two-phase

Medians of `repeats` runs each, measured in one process, interleaved per model.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from mmn_fast import DEFAULT_PROMPT

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


def measure_gpu(repeats, layers=32, batches=(8, 32, 64), **engine_kw):
    """Throughput on CUDA, per batch size (images = batch size, so every variant runs one batch): plain generate
    (transformers' default cache), the engine's caption (kv_cache auto), find on the Triton and torch backends,
    find with the static cache, and two-phase (caption, then find teacher-forced on those captions; Triton).
    Interleaved per repeat. Each row is printed as soon as it is measured (a timeout keeps the rows done)."""
    engines, images = gpu_llava_engines(num_layers=layers, n_images=max(batches), **engine_kw)
    eng = engines.get("triton") or next(iter(engines.values()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {device}, torch {torch.__version__}; random LLaVA, {layers} LLaMA-7B-shaped layers "
          f"(4096/11008), 576 image tokens, bf16, {NEW_TOKENS} new tokens; images/s (medians of {repeats}); "
          "generate = transformers' default (dynamic) cache, caption = the engine's (kv_cache='auto': dynamic on GPUs)")
    print("| batch | generate | caption | find (triton) | find/generate time | find (torch) | find/generate time "
          "| find (triton, static cache) | find/generate time | two-phase (triton) | find (triton) / generate throughput |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for bs in batches:
        imgs = images[:bs]
        runs = {"generate": lambda: plain_generate(eng, imgs, NEW_TOKENS, batch_size=bs),
                "caption": lambda: eng.caption(imgs, max_new_tokens=NEW_TOKENS, batch_size=bs),
                **{f"find_{b}": (lambda e=e: find(e, imgs, NEW_TOKENS, batch_size=bs)) for b, e in engines.items()}}

        def find_static():  # the Triton engine with a static KV cache (auto keeps the dynamic one on GPUs)
            eng.kv_cache = "static"
            try:
                return find(eng, imgs, NEW_TOKENS, batch_size=bs)
            finally:
                eng.kv_cache = "auto"

        def two_phase():
            caps = eng.generate(imgs, [DEFAULT_PROMPT] * bs, NEW_TOKENS).ids
            return find(eng, imgs, NEW_TOKENS, batch_size=bs, captions=caps)

        runs["find_static"], runs["two_phase"] = find_static, two_phase
        try:
            for fn in runs.values():  # warm-up (Triton compiles here)
                fn()
            t = {k: [] for k in runs}
            for _ in range(repeats):
                for k, fn in runs.items():
                    t[k].append(median_time(fn, 1))
        except torch.cuda.OutOfMemoryError:
            print(f"| {bs} | out of memory |", flush=True)
            torch.cuda.empty_cache()
            continue
        med = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
        ips = {k: bs / v for k, v in med.items()}
        fast = "find_triton" if "find_triton" in med else next(k for k in med if k.startswith("find_"))
        cols = [f"{ips[k]:.1f} | {med[k] / med['generate']:.3f}" if k in med else "- | -"
                for k in ("find_triton", "find_torch", "find_static")]
        print(f"| {bs} | {ips['generate']:.1f} | {ips['caption']:.1f} | {cols[0]} | {cols[1]} | {cols[2]} | "
              f"{ips['two_phase']:.1f} | {ips[fast] / ips['generate']:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU table instead (needs CUDA)")
    ap.add_argument("--layers", type=int, default=32, help="GPU: LLaMA-7B-shaped decoder layers (32: the 7B shape)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64], help="GPU: batch sizes")
    args = ap.parse_args()
    if args.gpu:
        return measure_gpu(args.repeats, args.layers, tuple(args.batches))
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
