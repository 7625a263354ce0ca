"""Explain on the demo model: `mmn metrics`, `mmn report` and heatmaps over N demo images (default 1,000).

    OMP_NUM_THREADS=1 MMN_CACHE=/tmp/mmncache python bench/run_explain.py [--images 1000] [--workdir DIR]

Runs `mmn find` once (for context and as the input), then times, in this process after one model load:
every metric of `compute_metrics` (its per-metric seconds), the report with top tokens and computed
heatmaps, and `write_heatmaps` over the whole corpus (what `find --heatmaps` adds), activation and
occlusion; and the two commands end to end as a user runs them (new Python process, model load, all).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mmn_fast
from mmn_fast.demo import build_demo_model, make_examples, save_examples
from mmn_fast.find.heatmap import maps, write_heatmaps
from mmn_fast.explain.metrics import compute_metrics, summary_table
from mmn_fast.explain.report import write_report
from mmn_fast.io import write_json
from mmn_fast.run.runner import run_find


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--causal-images", type=int, default=32)
    ap.add_argument("--occlusion-images", type=int, default=50)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmn_explain_bench_"))
    model_path = build_demo_model(progress=False)
    engine = mmn_fast.load(model_path, device="cpu")
    examples = make_examples(args.images, seed=777)
    manifest = save_examples(examples, work / "images")
    images = [im for im, _ in examples]
    rows = []

    def timed(name, fn, n):
        t0 = time.perf_counter()
        out = fn()
        s = time.perf_counter() - t0
        rows.append((name, s, n / s if s > 0 else float("inf")))
        return out

    run = work / "run"
    timed("find (context: captions + scores)", lambda: run_find(
        engine, manifest, run, progress=False, concepts="all", top_k=20, max_new_tokens=12,
        batch_size=args.batch_size, num_workers=0, overwrite=True), args.images)
    # k=1: the demo's vocabulary has 53 tokens (the paper's k=10 of 32,000 is 0.03% of the vocabulary).
    m = timed("metrics, all five (in process)", lambda: compute_metrics(
        engine, run, k=1, batch_size=args.batch_size, causal_images=args.causal_images), args.images)
    for name, s in m["seconds"].items():
        rows.append((f"  {name}", s, args.images / s if s > 0 else float("inf")))
    write_json(run / "metrics.json", m)
    timed("report with tokens + heatmaps (in process)", lambda: write_report(run, engine=engine), args.images)

    def all_heatmaps():
        recs = [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]
        for s in range(0, len(recs), args.batch_size):
            write_heatmaps(engine, images[s : s + args.batch_size], recs[s : s + args.batch_size],
                           work / "heatmaps", n=10)
    timed("write_heatmaps, activation, every concept", all_heatmaps, args.images)

    k = min(args.occlusion_images, args.images)
    res = engine.find(images[:k], concepts="all", top_k=10, max_new_tokens=12, batch_size=args.batch_size)
    items = [(b, [tuple(x[:2]) for x in r.concepts[0].neurons], r.concepts[0].token_id, r.output_ids,
              r.concepts[0].step) for b, r in enumerate(res) if r.concepts]
    timed(f"heatmaps, occlusion, one concept x {k} images", lambda: maps(engine, images[:k], items, "occlusion"), k)

    env = dict(os.environ, MMN_CACHE=str(Path(model_path).parent))
    for name, cmd in (("`mmn metrics` end to end", ["metrics", "--results", str(run), "--out", str(work / "m2"),
                                                    "--quiet", "--top-tokens", "1", "--batch-size", str(args.batch_size)]),
                      ("`mmn report` end to end", ["report", str(run), "--out", str(work / "report2.html")])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmn_fast", *cmd], check=True, env=env, capture_output=True)
        s = time.perf_counter() - t0
        rows.append((name, s, args.images / s))

    print(f"demo model, {args.images} images, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}; work dir {work}")
    print(f"{'stage':<46} {'seconds':>8} {'images/s':>9}")
    for name, s, rate in rows:
        print(f"{name:<46} {s:8.2f} {rate:9.1f}")
    print(f"report: {(run / 'report.html').stat().st_size / 1e6:.2f} MB")
    print(summary_table(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
