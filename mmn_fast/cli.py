"""`mmn` command line: find, top-tokens, demo. Bad input ends in one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine import DEFAULT_PROMPT
from .errors import MMNError


def _engine(args):
    from .engine import load

    return load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)


def _concepts_arg(value: str):
    return value if value in ("nouns", "all", "auto") else [w for w in value.split(",") if w.strip()]


def cmd_find(args) -> int:
    from .runner import run_find, summary_table

    engine = _engine(args)
    summary = run_find(
        engine, args.images, args.out, teacher_forced=args.teacher_forced, progress=not args.quiet,
        prompt=args.prompt, prefix=args.prefix, concepts=_concepts_arg(args.concepts),
        activation=args.activation, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, fold_final_norm=args.fold_final_norm, positions=args.positions,
        reduce=args.reduce, method=args.method,
    )
    print(summary_table(summary))
    print(f"results written to {Path(args.out).resolve()} (results.jsonl, concepts.json, run.json)")
    return 0


def cmd_top_tokens(args) -> int:
    from .vocab import top_tokens, vocab_table

    engine = _engine(args)
    if args.layer is not None and args.neuron is not None:
        for tok, tid, val in top_tokens(engine, args.layer, args.neuron, args.k):
            print(f"{tok!r:>20} {tid:>8} {val:+.4f}")
        return 0
    if args.layer is not None or args.neuron is not None:
        raise MMNError("give both --layer and --neuron for one neuron, or neither for the whole table")
    cache = args.cache_dir or (Path(args.model) / ".mmn_cache")
    values, ids = vocab_table(engine, k=args.k, cache_dir=cache, progress=not args.quiet)
    print(f"top-{args.k} tokens of {values.shape[0]} x {values.shape[1]} neurons cached in {Path(cache).resolve()}")
    return 0


def cmd_demo(args) -> int:
    from .demo_run import run_demo

    run_demo(out_dir=args.out, cache_dir=args.cache_dir, n_images=args.n_images, top_k=args.top_k,
             device=args.device, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmn", description="Find multi-modal neurons in vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, required=True):
        sp.add_argument("--model", required=required, help="local Hugging Face checkpoint directory")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        sp.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: checkpoint's)")
        sp.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                        help="kernels (default: $MMN_BACKEND, else auto: Triton on CUDA)")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("find", help="caption images and score the neurons of each concept")
    model_args(f)
    f.add_argument("--images", required=True, help="a folder of images or a JSONL manifest")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--prompt", default=DEFAULT_PROMPT)
    f.add_argument("--prefix", default=None, help='text the answer starts with, e.g. "An image of"')
    f.add_argument("--concepts", default="auto", help="nouns | all | comma-separated words (default: nouns if spaCy, else all)")
    f.add_argument("--activation", default="down_proj_input", choices=["down_proj_input", "act_fn"])
    f.add_argument("--top-k", type=int, default=50)
    f.add_argument("--max-new-tokens", type=int, default=32)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--fold-final-norm", action="store_true", help="exact attribution through the final norm")
    f.add_argument("--positions", default="last", choices=["last", "image"])
    f.add_argument("--reduce", default="mean", choices=["mean", "max"], help="over image positions")
    f.add_argument("--method", default="act", choices=["act", "grad"])
    f.add_argument("--teacher-forced", action="store_true", help="score the manifest's captions in one pass")
    f.set_defaults(func=cmd_find)

    t = sub.add_parser("top-tokens", help="tokens each neuron promotes most")
    model_args(t)
    t.add_argument("--layer", type=int)
    t.add_argument("--neuron", type=int)
    t.add_argument("-k", type=int, default=10)
    t.add_argument("--cache-dir", default=None, help="where the whole-model table is cached")
    t.set_defaults(func=cmd_top_tokens)

    d = sub.add_parser("demo", help="build (once) the trained demo model and find its neurons")
    d.add_argument("--out", default="mmn_demo_out")
    d.add_argument("--cache-dir", default=None, help="demo model cache (default: $MMN_CACHE or ~/.cache/mmn_fast)")
    d.add_argument("--n-images", type=int, default=24)
    d.add_argument("--top-k", type=int, default=20)
    d.add_argument("--device", default=None)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MMNError as e:
        print(f"mmn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
