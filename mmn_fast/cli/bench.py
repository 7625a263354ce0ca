"""`mmn bench`: images/s of captioning, find and two-phase find, overheads, neurons/s, peak memory and (CUDA)
the act_score kernel's bandwidth, per batch size, on the user's model and hardware (mmn_fast/run/bench.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT
from ..io import write_json
from ..run.bench import BenchSettings, bench_table, run_bench
from .common import add_model_options, load_engine

MODEL_MISSING = ("--model is required: the local Hugging Face checkpoint folder to measure "
                 "(e.g. mmn bench --model path/to/llava-1.5-7b-hf)")


def _settings(args: argparse.Namespace) -> BenchSettings:
    concepts = args.concepts if args.concepts in ("nouns", "all", "auto") else [
        w for w in args.concepts.split(",") if w.strip()]
    return BenchSettings(batch_sizes=args.batch_size, n_images=args.n_images, max_new_tokens=args.max_new_tokens,
                         repeats=args.repeats, images=args.images, prompt=args.prompt, concepts=concepts)


def _device_guess(args: argparse.Namespace) -> str:
    """The device the model will load on (defaults depend on it), known before it loads."""
    if args.device_map is not None:
        return "cuda"
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_json_path(path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise MMNError(f"--json '{path}' is a folder: give a file name, e.g. {Path(path) / 'bench.json'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise MMNError(f"--json '{path}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise MMNError(f"--json '{path}': folder '{parent}' is not writable")


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.model:
        raise MMNError(MODEL_MISSING)
    try:
        device = torch.device(_device_guess(args))
    except RuntimeError:
        raise MMNError(f"--device '{args.device}' is not a device: give cpu, cuda or cuda:N") from None
    settings = _settings(args).resolved(device)
    settings.check()  # bad numbers and a bad corpus: one line, before the model loads
    _check_json_path(args.json)
    engine = load_engine(args)
    report = run_bench(engine, settings, progress=not args.quiet)
    print(bench_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"\nfigures written to {Path(args.json).resolve()}")
    return 0


def register(sub) -> None:
    b = sub.add_parser("bench", help="measure captioning and find speed and memory on your model and hardware")
    add_model_options(b, required=False)
    b.add_argument("--images", default=None,
                   help="a corpus as `mmn find --images` takes (its first --n-images are used); default: random "
                        "images of the processor's input size")
    b.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="N",
                   help="one or more batch sizes, one table row each (default: 1 8 on CPU, 8 32 on CUDA)")
    b.add_argument("--n-images", type=int, default=None,
                   help="images per measurement (default: twice the largest batch size)")
    b.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit, in tokens")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is reported)")
    b.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning prompt")
    b.add_argument("--concepts", default="all", help="what find scores: all | nouns | comma-separated words")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON to FILE")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
