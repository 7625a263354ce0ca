"""`mmn find` (on one process, or launched on N with torchrun), `mmn top-tokens` and `mmn demo`.
Bad input raises MMNError (one line, exit 2)."""
from __future__ import annotations

import argparse
import codecs
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from ..demo.run import run_demo
from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT, FindOptions
from ..find.heatmap import safe_name
from ..find.results import neuron_label, parse_unit_neuron
from ..find.vocab import both_ends, vocab_table
from ..io import user_cache_dir
from ..model.inputs import MAX_IMAGE_BYTES
from ..run.runner import RunSettings, check_run, run_corpus, summary_table
from .caption import add_server_options, caption_phase, check_caption_options
from .common import add_model_options, check_words_before_loading, deprecated, load_engine

DEVICE_MAP_WITH_PROCESSES = ("--device-map spreads one model over this machine's GPUs; do not combine it with "
                             "--nproc or torchrun (one replica per process)")


# ------------------------------------------------------------------------------------------ find
def cmd_find(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1:
        return _launch_torchrun(args)
    _init_distributed(args)
    settings, options = _run_settings(args), _find_options(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # a torchrun launch was checked once by its launcher
        check_run(args.images, args.out, settings, options)  # all that needs no model, before it loads
    if isinstance(options.concepts, list):
        check_words_before_loading(args, options.concepts)
    engine = load_engine(args)
    t0 = time.perf_counter()
    if args.two_phase:
        _caption_phase(args, engine, settings.captions)
    summary = run_corpus(engine, args.images, args.out, settings, options)
    if "concepts_json" not in summary:  # not rank 0
        return 0
    if summary["skipped"]:
        print(f"mmn: warning: {summary['skipped']} images skipped (reasons in {Path(args.out) / 'skipped.jsonl'})",
              file=sys.stderr)
    print(summary_table(summary["concepts_json"]))
    print(f"{summary['images']} images, {summary['skipped']} skipped, {len(summary['concepts_json'])} concepts "
          f"({summary['concepts']} mentions), "
          f"{summary['neurons_scored']:,} neurons scored in {time.perf_counter() - t0:.1f}s")
    print(f"results written to {Path(args.out).resolve()} (results.jsonl, skipped.jsonl, concepts.json, "
          "aggregates.*, run.json)")
    return 0


def _check_caption_modes(args: argparse.Namespace, world: int) -> None:
    """--captions, --two-phase, --teacher-forced and --server: which go together."""
    if args.two_phase and args.captions is not None:
        raise MMNError("--two-phase makes its own captions file (DIR/captions.jsonl); --captions scores a given one: "
                       "give one of them")
    if args.teacher_forced and (args.two_phase or args.captions is not None):
        raise MMNError("--teacher-forced scores the corpus' own captions: leave out --captions / --two-phase")
    if args.server is not None and not args.two_phase:
        raise MMNError("--server captions with a server in the caption phase of --two-phase (or use `mmn caption "
                       "--server URL`, then `mmn find --captions FILE`)")
    if args.two_phase:
        check_caption_options(args)
        if world > 1:
            raise MMNError("--two-phase runs on one process: caption first (`mmn caption`, or --two-phase alone), "
                           "then score on many with `mmn find --captions FILE --nproc N`")


def _caption_phase(args: argparse.Namespace, engine, path: str) -> None:
    """--two-phase: every image captioned into DIR/captions.jsonl (resumed: only those not there yet)."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    counts, source = caption_phase(args, path, None if args.server is not None else engine)
    if not args.quiet:
        print(f"caption phase: {counts['written']} captions written to {path} by {source} "
              f"({counts['before']} were there already)")


def _concepts_arg(value: str) -> str | list[str]:
    return value if value in ("nouns", "all", "auto") else [w for w in value.split(",") if w.strip()]


def _find_options(args: argparse.Namespace) -> FindOptions:
    return FindOptions(
        prompt=args.prompt, prefix=args.prefix, concepts=_concepts_arg(args.concepts), activation=args.activation,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        fold_final_norm=args.fold_final_norm, positions=args.positions, reduce=args.reduce, method=args.method,
    )


def _run_settings(args: argparse.Namespace, world: int | None = None) -> RunSettings:
    """world: None under torchrun or alone ($WORLD_SIZE), N when checking for a launch of N processes."""
    _check_caption_modes(args, world or int(os.environ.get("WORLD_SIZE", "1")))
    return RunSettings(
        teacher_forced=args.teacher_forced, progress=not args.quiet, num_workers=args.num_workers,
        shard_size=args.shard_size, checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds, overwrite=args.overwrite, aggregate=args.aggregate,
        world=world, heatmaps=args.heatmaps, max_failed_batches=args.max_failed_batches,
        max_image_bytes=args.max_image_bytes,
        captions=str(Path(args.out) / "captions.jsonl") if args.two_phase else args.captions,
        two_phase=args.two_phase,
    )


def _init_distributed(args: argparse.Namespace) -> None:
    """Under torchrun: one process group (NCCL on GPU, gloo on CPU), one device and a share of the cores."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return
    if args.device_map is not None:
        raise MMNError(DEVICE_MAP_WITH_PROCESSES)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    # A rank that runs out of shards waits at the final barrier for the slowest one: hours, on a big
    # corpus, so the process group's timeout (default 10-30 minutes) must not end the job.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(days=30))


# ------------------------------------------------------------------------- launching N processes
def _launch_torchrun(args: argparse.Namespace) -> int:
    """`mmn find --nproc N ...` = `torchrun --standalone --nproc-per-node N -m mmn_fast find ...`, after
    the checks that need no model (so that bad input is one line, not N failing processes)."""
    if os.environ.get("WORLD_SIZE"):
        raise MMNError("--nproc is for launching; this process already runs under torchrun")
    if args.device_map is not None:
        raise MMNError(DEVICE_MAP_WITH_PROCESSES)
    check_run(args.images, args.out, _run_settings(args, world=args.nproc), _find_options(args))
    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "mmn_fast", *rest]
    return run_torchrun(cmd)


_ERROR_MARK = b"mmn: error:"


class _StderrFilter:
    """Passes a child's stderr through as it comes (progress bars included) up to the end of the
    first line holding 'mmn: error:'; what follows (other ranks' copies of the error, torchrun's own
    log lines and ChildFailedError traceback) is held back, and shown only if the launch succeeds."""

    def __init__(self, write):
        self.write = write
        self.tail = b""  # the last bytes passed on, to find a mark split between two reads
        self.in_error = False  # passing on the rest of the error line
        self.held: list[bytes] | None = None  # set once the error line is complete

    def feed(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        if not self.in_error:
            window = self.tail + data
            j = window.find(_ERROR_MARK)
            if j < 0:
                self.write(data)
                self.tail = window[-(len(_ERROR_MARK) - 1):]
                return
            self.in_error = True
            start = max(0, j - len(self.tail))  # where the mark (or what is left of it) starts in data
            self.write(data[:start])
            data = data[start:]
        end = data.find(b"\n")
        if end < 0:
            self.write(data)
            return
        self.write(data[:end + 1])
        self.held = [data[end + 1:]]

    def close(self, failed: bool) -> bool:
        """End of the stream; returns whether an error line was seen (and the rest dropped, if failed)."""
        if not self.in_error:
            return False
        if not failed and self.held:
            self.write(b"".join(self.held))
        return True


def run_torchrun(cmd: list[str]) -> int:
    """Run the launcher with its stderr filtered: when a rank ended with an `mmn: error:` line and the
    launch failed, that line alone is shown and the exit code is 2, as for one process."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(data: bytes) -> None:
        text = decoder.decode(data)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()

    filt = _StderrFilter(write)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    fd = proc.stderr.fileno()

    def drain() -> None:
        while True:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            filt.feed(data)

    try:
        drain()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too: let it stop its processes; a second one kills it
        try:
            drain()
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        raise
    rc = proc.wait()
    proc.stderr.close()
    seen = filt.close(failed=rc != 0)
    return 2 if rc != 0 and seen else rc


# ------------------------------------------------------------------------------ top-tokens, demo
def cmd_top_tokens(args: argparse.Namespace) -> int:
    neuron = _one_neuron(args)
    engine = load_engine(args)
    if neuron is not None:
        layer, expert, index = neuron
        ends = both_ends(engine, layer, index, args.k, expert)
        for side, end in (("positive", "top"), ("negative", "bottom")):
            print(f"promoted when {neuron_label(layer, index, expert)} fires {side} ({end} of W_U W_out[:, i]):")
            for tok, tid, val in ends[side]:
                print(f"{tok!r:>20} {tid:>8} {val:+.4f}")
        return 0
    engine.adapter.require_dense("mmn top-tokens without --neuron (a table of every [layer, index] neuron); give "
                                 "--neuron L<layer>.E<expert>.<index> for one expert neuron")
    cache = args.cache_dir or user_cache_dir() / "top-tokens" / safe_name(Path(args.model).resolve().name, 64)
    table = vocab_table(engine, k=args.k, cache_dir=cache, progress=not args.quiet, both=True)
    print(f"top-{args.k} and bottom-{args.k} tokens (promoted when firing positive / negative) of "
          f"{table.top_ids.shape[0]} x {table.top_ids.shape[1]} neurons cached in {Path(cache).resolve()}")
    return 0


def _one_neuron(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """(layer, expert, index) of --neuron L<layer>.<index> (expert -1) or L<layer>.E<expert>.<index>; the old
    `--layer L --neuron I` still works, with a note."""
    if args.layer is None:
        return None if args.neuron is None else parse_unit_neuron(args.neuron)
    if args.neuron is None or not args.neuron.isdigit():
        raise MMNError("give one neuron as --neuron L<layer>.<index> (e.g. --neuron L12.345), or nothing for the "
                       "whole table")
    deprecated("--layer L --neuron I", "--neuron L<layer>.<index>")
    return args.layer, -1, int(args.neuron)


def cmd_demo(args: argparse.Namespace) -> int:
    demo = run_demo(out_dir=args.out, cache_dir=args.cache_dir, n_images=args.n_images, top_k=args.top_k,
                    device=args.device, progress=not args.quiet)
    print(f"demo model: {demo.model_path} (held-out exact-match {100 * demo.heldout_accuracy:.1f}%)")
    print(f"captions: {demo.correct}/{demo.captions} exactly right on fresh images\n")
    print(summary_table(demo.concepts))
    print("\ntop neurons per concept, the sign of each one's activation there, and the tokens it promotes")
    print("given that sign (top of W_U W_out[:, i] when +, bottom when -):")
    for word, neurons in demo.top_tokens.items():
        signs = demo.signs[word]
        print(f"  {word:<10} " + "; ".join(f"{neuron_label(layer, index)} {'+' if s > 0 else '-'} [{' '.join(toks)}]"
                                         for (layer, index, toks), s in zip(neurons, signs)))
    print(f"\nresults written to {demo.out_dir.resolve()} (results.jsonl, concepts.json, run.json, images/)")
    return 0


# -------------------------------------------------------------------------------------- parsers
def register(sub) -> None:
    """Add `find`, `top-tokens` and `demo` to the `mmn` sub-command parsers."""
    f = sub.add_parser("find", help="caption images and score the neurons of each concept")
    add_model_options(f)
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--images", required=True, help="a folder of images, a JSONL/CSV manifest, WebDataset tar shards or Parquet files")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--prompt", default=DEFAULT_PROMPT, help='the captioning prompt')
    f.add_argument("--prefix", default=None, help='text the answer starts with, e.g. "An image of"')
    f.add_argument("--concepts", default="auto", help="nouns | all | comma-separated words (default: nouns if spaCy, else all)")
    f.add_argument("--activation", default="down_proj_input", choices=["down_proj_input", "act_fn"], help="the output projection's exact input, or act_fn's output (the paper's released code)")
    f.add_argument("--top-k", type=int, default=50, help='neurons kept per concept')
    f.add_argument("--max-new-tokens", type=int, default=32, help='caption length limit, in tokens')
    f.add_argument("--batch-size", type=int, default=8, help='images per forward pass')
    f.add_argument("--fold-final-norm", action="store_true", help="exact attribution through the final norm")
    f.add_argument("--positions", default="last", choices=["last", "image"], help='score at the position predicting the concept, or from the image tokens')
    f.add_argument("--reduce", default="mean", choices=["mean", "max"], help="over image positions")
    f.add_argument("--method", default="act", choices=["act", "grad"], help='activation x direct logit projection (the paper), or activation x gradient')
    f.add_argument("--teacher-forced", action="store_true", help="score the manifest's captions in one pass")
    f.add_argument("--captions", default=None,
                   help="score the captions of this JSONL file (as `mmn caption` writes it: id, caption or "
                        "output_ids) teacher-forced, joined to the images by id")
    f.add_argument("--two-phase", action="store_true",
                   help="caption every image first (the model, or --server) into DIR/captions.jsonl, then score "
                        "those captions teacher-forced")
    add_server_options(f)
    f.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes (0: in-process)")
    f.add_argument("--shard-size", type=int, default=1000, help="images per shard for folders/manifests/parquet")
    f.add_argument("--checkpoint-every", type=int, default=256, help="checkpoint after this many images ...")
    f.add_argument("--checkpoint-seconds", type=float, default=60.0, help="... or this many seconds")
    f.add_argument("--max-failed-batches", type=int, default=8,
                   help="stop after this many batches in a row with no usable image (0: never stop)")
    f.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="skip an image (file, tar member, parquet cell) larger than this many bytes "
                        f"(default {MAX_IMAGE_BYTES} = {MAX_IMAGE_BYTES >> 20} MiB)")
    f.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start again")
    f.add_argument("--aggregate", default="dense", choices=["dense", "sparse"],
                   help="per-concept statistics of every neuron (dense) or of top-k neurons only (sparse)")
    f.add_argument("--heatmaps", nargs="?", const="activation", default=None, choices=["activation", "occlusion"],
                   help="also write each concept's heatmap and mask per image to DIR/heatmaps/ (default method: "
                        "activation)")
    f.add_argument("--nproc", type=int, default=0, help="launch N processes with torchrun (one per GPU)")
    f.set_defaults(func=cmd_find)

    t = sub.add_parser("top-tokens", help="tokens each neuron promotes when it fires positive and negative")
    add_model_options(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--neuron", default=None, help="one neuron, L<layer>.<index> (e.g. L12.345) or an expert's L<layer>.E<expert>.<index>; none: every neuron's "
                                                  "tokens, as a cached table")
    t.add_argument("--layer", type=int, default=None, help="deprecated: use --neuron L<layer>.<index>")
    t.add_argument("-k", type=int, default=10, help="tokens per end")
    t.add_argument("--cache-dir", default=None,
                   help="where the whole-model table is cached (default: $MMN_CACHE or ~/.cache/mmn_fast, "
                        "under top-tokens/<model folder name>)")
    t.set_defaults(func=cmd_top_tokens)

    d = sub.add_parser("demo", help="build (once) the trained demo model and find its neurons")
    d.add_argument("--out", default=None,
                   help="where the demo's find run goes (default: demo-run/ in $MMN_CACHE or ~/.cache/mmn_fast)")
    d.add_argument("--cache-dir", default=None, help="demo model cache (default: $MMN_CACHE or ~/.cache/mmn_fast)")
    d.add_argument("--n-images", type=int, default=24, help='fresh demo images to caption')
    d.add_argument("--top-k", type=int, default=20, help='neurons kept per concept')
    d.add_argument("--device", default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    d.add_argument("--quiet", action="store_true", help='no progress bars')
    d.set_defaults(func=cmd_demo)
