"""Ratio table: find vs plain generate, reference vs find, gradient baseline vs find, side by side.

    python bench/run_bench.py [--repeats 5] [--skip-demo]

Medians of `repeats` runs each, measured in one process, interleaved per model.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import NEW_TOKENS, demo_engine, find, median_time, plain_generate, random_llava_engine, reference  # noqa: E402


def measure(name, eng, images, max_new_tokens, repeats):
    find(eng, images, max_new_tokens)  # warm-up
    plain_generate(eng, images, max_new_tokens)
    t_plain = median_time(lambda: plain_generate(eng, images, max_new_tokens), repeats)
    t_find = median_time(lambda: find(eng, images, max_new_tokens), repeats)
    # The slow baselines run on fewer images; every figure is reported per image.
    n, n_slow = len(images), max(1, len(images) // 4)
    t_ref = median_time(lambda: reference(eng, images[:n_slow], max_new_tokens), 1) / n_slow
    t_grad = median_time(lambda: find(eng, images[:n_slow], max_new_tokens, method="grad"), 1) / n_slow
    return dict(model=name, plain=t_plain / n, find=t_find / n, ref=t_ref, grad=t_grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    rows = []
    eng, imgs = random_llava_engine()
    rows.append(measure(f"random LLaVA 8L/512d/256 img tok, {NEW_TOKENS} new tok, 8 images", eng, imgs,
                        NEW_TOKENS, args.repeats))
    if not args.skip_demo:
        eng, imgs = demo_engine()
        rows.append(measure("demo model (4L/128d/16 img tok), 8 images, <=12 tok", eng, imgs, 12, args.repeats))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("seconds per image (medians); find and generate batched by 8, reference batch 1 without KV cache")
    print(f"| model | generate s | find s | find/generate | reference s | reference/find | grad s | grad/find |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain']:.3f} | {r['find']:.3f} | {r['find'] / r['plain']:.3f} | "
              f"{r['ref']:.2f} | {r['ref'] / r['find']:.1f} | {r['grad']:.3f} | {r['grad'] / r['find']:.2f} |")


if __name__ == "__main__":
    main()
