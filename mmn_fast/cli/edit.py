"""`mmn edit` and `mmn patch bake|inspect|verify`. Bad input raises MMNError (one line, exit 2)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from pathlib import Path

from ..edit.bake import bake
from ..edit.evaluate import report_table, run_edit
from ..edit.export import export_peft
from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT
from ..model.live import check_patch
from ..model.patch_file import load_patch
from .common import add_model_options, deprecated, load_engine


def _layers(value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MMNError(f"--exclude-layers takes comma-separated layer numbers, got {value!r}") from None


def cmd_edit(args: argparse.Namespace) -> int:
    if args.neurons < 1:
        raise MMNError(f"--neurons must be at least 1, got {args.neurons}")
    if args.method in ("swap", "optimize") and not args.target:
        raise MMNError(f"--method {args.method} needs --target WORD")
    out = Path(args.out)  # checked before the (long) edit and evaluation, whose result it must hold
    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):
        raise MMNError(f"--out '{out}' must be a file path (its folder is created if missing)")
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise MMNError(f"--out '{out}' exists: choose another path, or add --overwrite to replace it")
    if args.from_ is not None:
        deprecated("--from", "--results DIR (a find run) or --images CORPUS")
    engine = load_engine(args)
    params = {"scale": args.scale, "strength": args.strength, "sigma": args.sigma,
              "steps": args.steps, "lr": args.lr, "kl_weight": args.kl_weight, "l2_weight": args.l2_weight,
              "margin": args.margin}
    patch, rows = run_edit(engine, args.source, args.target, args.method, args.neurons,
                           args.results or args.images or args.from_,
                           eval_images=args.eval_images, exclude_layers=_layers(args.exclude_layers),
                           random=args.random, control=not args.no_control, seed=args.seed, prompt=args.prompt,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           evaluate=not args.no_eval, **params)
    if rows:
        patch.params["evaluation"] = [{k: v for k, v in r.items() if k != "examples"} for r in rows]
        print(report_table(rows))
    out = patch.save(args.out)
    units = f"{len(patch.units())} unit(s) (layers and experts)" if patch.expert_entries else f"{len(patch.entries)} layer(s)"
    print(f"patch written to {out.resolve()}: {patch.n_neurons} neurons in {units}, "
          f"method {patch.method}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.patch_opt is None and args.patch is None:
        raise MMNError("give the patch file: mmn patch inspect --patch FILE")
    if args.patch_opt is None:
        deprecated("a positional patch file", "--patch FILE")
    print(load_patch(args.patch_opt or args.patch).describe(max_indices=args.max_indices))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    rows = check_patch(load_engine(args), args.patch)
    meaning = {"base": "matches the patch's base (applies cleanly)", "applied": "already holds the patched vectors",
               "mismatch": "MISMATCH: neither the base nor the patched vectors"}
    for r in rows:
        print(f"layer {r['layer']:>3}  {r['n']:>5} neurons  {meaning[r['status']]}")
    states = {r["status"] for r in rows}
    verdict = ("applies cleanly" if states == {"base"} else "already applied" if states == {"applied"}
               else "does NOT match this model (apply with force only for deliberate cross-model use)")
    print(f"patch {args.patch}: {verdict}")
    return 0 if states <= {"base"} or states == {"applied"} else 1


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (`timeout`, a job scheduler, `docker stop`) ends a bake as Ctrl-C does: by an exception,
    so that its temporary folder (up to a model's size) is removed rather than left beside --out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_bake(args: argparse.Namespace) -> int:
    with _sigterm_exits():
        done = bake(args.model, args.patch, args.out, force=args.force)
    print(f"baked {len(args.patch)} patch(es) into {Path(args.out).resolve()}: rewrote {', '.join(done['rewritten'])}; "
          f"linked {len(done['linked'])}, copied {len(done['copied'])} other file(s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.patch_opt is None and args.patch is None:
        raise MMNError("give the patch file: mmn patch export --patch FILE --model PATH --out DIR")
    if args.patch_opt is not None and args.patch is not None:
        raise MMNError("give the patch file once: --patch FILE")
    done = export_peft(args.patch_opt or args.patch, args.model, args.out, overwrite=args.overwrite, force=args.force)
    print(f"PEFT LoRA adapter written to {Path(done['out']).resolve()}: rank {done['rank']}, {done['neurons']} "
          f"neurons in {len(done['target_modules'])} module(s) ({', '.join(done['target_modules'][:3])}"
          f"{', ...' if len(done['target_modules']) > 3 else ''})")
    return 0


def register(sub) -> None:
    """Add `edit` and `patch` to the `mmn` sub-command parsers."""
    e = sub.add_parser("edit", help="edit a concept's neurons; write a .mmnpatch.safetensors file and report")
    add_model_options(e)
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--results", default=None,
                       help="a finished `mmn find` output directory: neurons from its concepts.json, images from its "
                            "results.jsonl")
    where.add_argument("--images", default=None,
                       help="images to find the neurons on and evaluate with (folder, JSONL/CSV manifest, tar shards, "
                            "Parquet)")
    where.add_argument("--from", dest="from_", default=None, help="deprecated: --results DIR or --images CORPUS")
    e.add_argument("--source", required=True, help="the concept word to edit")
    e.add_argument("--target", default=None, help="the word to say instead (swap, optimize)")
    e.add_argument("--method", default="optimize", choices=["suppress", "swap", "optimize", "perturb"],
                   help="how the neurons' output vectors change (docs/editing.md)")
    e.add_argument("--neurons", type=int, default=20, help="how many top neurons of the concept to edit")
    e.add_argument("--out", required=True, help="patch file to write (e.g. red2blue.mmnpatch.safetensors)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument("--eval-images", default=None, help="held-out images (default: every other image of --from)")
    e.add_argument("--exclude-layers", default=None, help="comma-separated layers never to edit")
    e.add_argument("--random", action="store_true", help="edit as many uniformly random neurons instead (control)")
    e.add_argument("--no-control", action="store_true", help="skip evaluating the random-neuron control")
    e.add_argument("--no-eval", action="store_true", help="write the patch without evaluating it")
    e.add_argument("--seed", type=int, default=0, help="random neurons and perturb noise")
    e.add_argument("--scale", type=float, default=0.0, help="suppress: factor on the output vectors")
    e.add_argument("--strength", type=float, default=1.0, help="swap: share of the source contribution moved")
    e.add_argument("--sigma", type=float, default=0.1, help="perturb: noise std (weight units)")
    e.add_argument("--steps", type=int, default=50, help="optimize: most Adam steps")
    e.add_argument("--lr", type=float, default=0.1, help="optimize: step size relative to the vectors' RMS entry")
    e.add_argument("--kl-weight", type=float, default=1.0,
                   help="optimize: weight of the KL term keeping the other positions unchanged")
    e.add_argument("--l2-weight", type=float, default=0.01, help="optimize: weight of the L2 penalty on the deltas")
    e.add_argument("--margin", type=float, default=2.0, help="optimize: stop once the target leads by this many logits")
    e.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning prompt")
    e.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit, in tokens")
    e.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    e.set_defaults(func=cmd_edit)

    p = sub.add_parser("patch", help="inspect, verify, bake or export a patch file")
    psub = p.add_subparsers(dest="patch_command", required=True)
    i = psub.add_parser("inspect", help="what a patch touches, and its metadata")
    i.add_argument("--patch", dest="patch_opt", default=None, help="the patch file")
    i.add_argument("patch", nargs="?", default=None, help="deprecated: the patch file as a positional argument")
    i.add_argument("--max-indices", type=int, default=12, help="neuron indices listed per layer")
    i.set_defaults(func=cmd_inspect)
    v = psub.add_parser("verify", help="check a patch against a model (exit 1 on mismatch)")
    add_model_options(v)
    v.add_argument("--patch", required=True, help="the patch file")
    v.set_defaults(func=cmd_verify)
    b = psub.add_parser("bake", help="write a checkpoint with the patch(es) baked in")
    b.add_argument("--model", required=True, help="the local checkpoint to copy with the patch(es) baked in")
    b.add_argument("--patch", required=True, action="append", help="repeat to bake several, in stacking order")
    b.add_argument("--out", required=True, help="the new checkpoint folder (missing or empty, outside --model)")
    b.add_argument("--force", action="store_true", help="bake even if the base vectors do not match")
    b.set_defaults(func=cmd_bake)
    x = psub.add_parser("export", help="write the patch as a PEFT LoRA adapter (vLLM, SGLang, LoRAX, PEFT)")
    x.add_argument("--patch", dest="patch_opt", default=None, help="the patch file")
    x.add_argument("patch", nargs="?", default=None, help="the patch file, as a positional argument")
    x.add_argument("--format", default="peft", choices=["peft"], help="adapter format (default: peft)")
    x.add_argument("--model", required=True, help="the local checkpoint the adapter is for")
    x.add_argument("--out", required=True, help="the adapter folder to write")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it holds an adapter")
    x.add_argument("--force", action="store_true", help="export even if the base vectors do not match")
    x.set_defaults(func=cmd_export)
