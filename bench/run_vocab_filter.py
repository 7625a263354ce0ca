"""The vocab_topk filter method's candidate counts against its buffer capacity, and (with
--interpret) an exactness check at a real vocabulary size under triton's CPU interpreter.

    python bench/run_vocab_filter.py               # candidate counts, a few seconds
    python bench/run_vocab_filter.py --interpret   # + the kernel at V = 32000, default tiles (~10 s)

Random bf16 weights scaled like a trained layer's; the probe is the kernel's own (every 8th token).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from mmn_fast.kernels import vocab_topk_triton  # noqa: E402


def counts(d=256, f=2000, shapes=((32000, 64), (32000, 10), (128256, 64))):
    from mmn_fast.kernels._vocab_filter_triton import default_capacity, probe_thresholds

    print(f"candidates per row (d = {d}, {f} neurons, probe every 8th token)")
    print("| V | k | mean | p99 | max | capacity |")
    print("|---|---|---|---|---|---|")
    for v, k in shapes:
        torch.manual_seed(0)
        w_out = (torch.randn(d, f) / d**0.5).bfloat16()
        w_u = (torch.randn(v, d) / d**0.5).bfloat16()
        top, _, n_probe = probe_thresholds(w_out, w_u, k, 8, True, False)
        cnt = (w_out.float().t() @ w_u.float().t() >= top[:, None]).sum(1).float()
        cap = default_capacity(k, v, n_probe)
        print(f"| {v} | {k} | {cnt.mean():.0f} | {cnt.quantile(0.99):.0f} | {cnt.max():.0f} | {cap} |")


def interpret(d=256, f=300, v=32000, k=64):
    mod = importlib.import_module("mmn_fast.kernels._vocab_filter_triton")
    redone = []
    exact_rows = mod.exact_rows
    mod.exact_rows = lambda w, *a, **kw: redone.append(w.shape[1]) or exact_rows(w, *a, **kw)
    torch.manual_seed(0)
    w_out = (torch.randn(d, f) / d**0.5).bfloat16()
    w_u = (torch.randn(v, d) / d**0.5).bfloat16()
    t0 = time.perf_counter()
    got = vocab_topk_triton(w_out, w_u, k, both=True)
    secs = time.perf_counter() - t0
    exact = w_out.double().t() @ w_u.double().t()
    print(f"\ninterpreter, d = {d}, F = {f}, V = {v}, k = {k}, default 128x128x64 tiles: {secs:.1f} s, "
          f"rows recomputed: {sum(redone)}")
    for name, vals, ids, largest in (("top", got.top_values, got.top_ids, True),
                                     ("bottom", got.bottom_values, got.bottom_ids, False)):
        want = exact.topk(k, 1, largest=largest).indices
        agree = (ids.sort(1).values == want.sort(1).values).float().mean().item()
        err = (vals.double() - exact.gather(1, ids)).abs().max().item()
        print(f"{name}-k: id agreement with float64 {agree:.4f}, max |value error| {err:.1e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--interpret", action="store_true")
    args = ap.parse_args()
    counts()
    if args.interpret:
        interpret()
