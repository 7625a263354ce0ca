"""Scheduler benchmarks on the demo model: throughput by batch size, memory over a long run,
2 processes vs 1, and the WebDataset reader alone.

    python bench/run_scheduler.py [--images 2000] [--long 10000]

Each figure comes from `mmn find` subprocesses (so peak RSS is the run's own) with one torch
thread per process, measured in one go; the corpus is generated once into a temp directory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from mmn_fast.demo import build_demo_model, make_examples, save_examples
from mmn_fast.run.corpus import iter_samples, open_corpus

FIND = ["--concepts", "all", "--max-new-tokens", "12", "--top-k", "20", "--quiet", "--checkpoint-seconds", "30",
        "--shard-size", "100"]


def run_find(model, images, out, *extra) -> tuple[float, float]:
    """(seconds, peak RSS MB of the child) for one `mmn find` run in a fresh process."""
    cmd = [sys.executable, "-c", _CHILD, "find", "--model", str(model), "--images", str(images), "--out", str(out),
           *FIND, *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"mmn find failed: {done.stderr[-2000:]}")
    peak_kb = int(done.stderr.rsplit("MAXRSS ", 1)[1].split()[0])
    return seconds, peak_kb / 1024


# `mmn` in a child that reports its own peak RSS (KB) last on stderr.
_CHILD = ("import resource, sys\nfrom mmn_fast.cli.main import main\nrc = main(sys.argv[1:])\n"
          "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)")


def images_per_second(out: Path, seconds: float) -> tuple[float, float]:
    """(images/s over the whole process, images/s over the scoring loop alone: model load excluded)."""
    run = json.loads((out / "run.json").read_text())
    n = run["totals"]["images"]
    return n / seconds, n / run["seconds"]


def write_tars(examples, root: Path, per_shard: int = 1000) -> str:
    root.mkdir(parents=True, exist_ok=True)
    n_shards = (len(examples) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tf:
            for i, (img, cap) in enumerate(examples[s * per_shard:(s + 1) * per_shard]):
                for ext, data in (("png", _png(img)), ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / f"shard-{{00000..{n_shards - 1:05d}}}.tar")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000, help="corpus size for the throughput rows")
    ap.add_argument("--long", type=int, default=10000, help="corpus size of the long run (RSS)")
    args = ap.parse_args()
    model = build_demo_model(progress=False)
    work = Path(tempfile.mkdtemp(prefix="mmn_sched_bench_"))
    examples = make_examples(args.long, seed=2024)
    long_manifest = save_examples(examples, work / "long")
    lines = long_manifest.read_text().splitlines()
    short_manifest = work / "long" / "short.jsonl"
    short_manifest.write_text("\n".join(lines[: args.images]) + "\n")
    first_k = work / "long" / "first1k.jsonl"
    first_k.write_text("\n".join(lines[:1000]) + "\n")

    rows = []
    for bs in (1, 4, 16):
        t, rss = run_find(model, short_manifest, work / f"bs{bs}", "--batch-size", str(bs), "--num-workers", "1")
        rows.append((f"1 process, batch {bs}", images_per_second(work / f"bs{bs}", t), rss))
    t1, _ = run_find(model, short_manifest, work / "p1", "--batch-size", "16", "--num-workers", "0")
    t2, _ = run_find(model, short_manifest, work / "p2", "--batch-size", "16", "--num-workers", "0", "--nproc", "2")
    r1, r2 = images_per_second(work / "p1", t1), images_per_second(work / "p2", t2)
    tk, rss_1k = run_find(model, first_k, work / "k1", "--batch-size", "16", "--num-workers", "1")
    tl, rss_10k = run_find(model, long_manifest, work / "k10", "--batch-size", "16", "--num-workers", "1")

    pattern = write_tars(examples, work / "tars")
    corpus = open_corpus(pattern)
    reads = {}
    for workers in (0, 2):
        t0 = time.perf_counter()
        n = sum(1 for s in iter_samples(corpus, list(range(corpus.n_shards)), num_workers=workers) if s.error is None)
        reads[workers] = n / (time.perf_counter() - t0)

    print(f"# demo model, {os.cpu_count()} cores, torch {torch.__version__}, one torch thread per process; "
          "wall time of whole `mmn find` runs (process start and model load included)")
    print("| run | images/s (whole process) | images/s (scoring loop) | peak RSS MB |")
    print("|---|---|---|---|")
    for name, (ips, loop), rss in rows:
        print(f"| {name} ({args.images} images) | {ips:.0f} | {loop:.0f} | {rss:.0f} |")
    print(f"| 1 process x 1 thread, batch 16 ({args.images} images) | {r1[0]:.0f} | {r1[1]:.0f} | |")
    print(f"| 2 processes x 1 thread (--nproc 2), batch 16 | {r2[0]:.0f} | {r2[1]:.0f} | |")
    print(f"\n2 processes / 1 process: {r2[0] / r1[0]:.2f}x whole process, {r2[1] / r1[1]:.2f}x scoring loop "
          "(target >= 1.6x)")
    print(f"peak RSS: 1,000 images {rss_1k:.0f} MB, {args.long:,} images {rss_10k:.0f} MB "
          f"(ratio {rss_10k / rss_1k:.3f}; flat = within 10%); {args.long:,} images at "
          f"{images_per_second(work / 'k10', tl)[1]:.0f} images/s (scoring loop)")
    print(f"WebDataset reader alone ({args.long:,} PNG images in {corpus.n_shards} tar shards, decoded): "
          f"{reads[0]:.0f} images/s in-process, {reads[2]:.0f} images/s with 2 workers")


if __name__ == "__main__":
    main()
