"""`mmn heatmap`, `mmn metrics`, `mmn report`. Bad input raises MMNError (one line, exit 2)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from ..edit.methods import word_token
from ..errors import MMNError
from ..explain.metrics import ALL, MetricOptions, RunModelWarning, check_run_model, compute_metrics, summary_table
from ..explain.report import write_report
from ..find.engine import DEFAULT_PROMPT
from ..find.results import neuron_label, parse_neuron
from ..find.heatmap import COLORMAPS, DEFAULT_CMAP, DISPLAY_MIN, maps, safe_name, save_heatmap
from ..io import write_json
from ..model.inputs import load_image
from ..run.aggregate import open_results
from .common import add_model_options, deprecated, load_engine


@contextlib.contextmanager
def _model_notices():
    """Print the library's RunModelWarning (a model other than the run's) as one "mmn: warning:" line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunModelWarning)
        try:
            yield
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, RunModelWarning):
                    print(f"mmn: warning: {w.message}", file=sys.stderr)
                else:
                    others.append(w)
    for w in others:  # anything else as Python would have shown it
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def cmd_heatmap(args: argparse.Namespace) -> int:
    if args.neurons is not None and args.neurons < 1:
        raise MMNError(f"--neurons must be at least 1, got {args.neurons}")
    n = args.neurons or 10
    word = args.concept.strip().lower()
    picked = parse_neuron(args.neuron) if args.neuron else None
    image = load_image(args.image)
    res_dir = None
    if args.results and not picked:
        res_dir = open_results(args.results)
    engine = load_engine(args)
    ad = engine.adapter
    if res_dir is not None:  # the run's neuron indices must be this model's
        with _model_notices():
            check_run_model(res_dir, engine, "the heatmap")
    res = engine.find([image], concepts=[word], top_k=max(n, 1), prompt=args.prompt, prefix=args.prefix,
                      max_new_tokens=args.max_new_tokens)[0]
    con = next((c for c in res.concepts if c.word.lower() == word), None)
    if picked:
        if ad.is_moe:
            raise MMNError("--neuron names a dense model's neuron (layer, index); this model has mixture-of-experts "
                           "layers: leave --neuron out to map the concept's top (layer, expert, index) neurons")
        neurons = [picked]
        l, i = picked
        if not (0 <= l < ad.n_layers and 0 <= i < ad.d_mlp):
            raise MMNError(f"neuron {neuron_label(l, i)} out of range: layers 0..{ad.n_layers - 1}, neurons 0..{ad.d_mlp - 1}")
    elif res_dir is not None:
        neurons = [(x["layer"], x["expert"], x["index"]) if ad.is_moe else (x["layer"], x["index"])
                   for x in res_dir.top_neurons(word, n)]
        if not neurons:
            raise MMNError(f"'{word}' is not a concept of the run in {args.results}")
    elif con is None:
        raise MMNError(f"the model's caption {res.caption!r} does not name '{word}': give --neuron L<layer>.<index>, or "
                       "--results DIR to use a run's top neurons for it")
    else:
        neurons = [tuple(x[:3 if ad.is_moe else 2]) for x in con.neurons[:n]]  # MoE: (layer, expert, index)
    if args.method == "occlusion" and con is None:
        raise MMNError(f"--method occlusion needs the caption to name '{word}' (it reads the neurons at that word); "
                       f"the caption is {res.caption!r}")
    token = con.token_id if con is not None else word_token(engine.tokenizer, word)
    item = (0, neurons, token, res.output_ids, con.step if con else None)
    hm = maps(engine, [image], [item], args.method, orient=not args.raw, prompt=args.prompt, prefix=args.prefix,
              percentile=args.percentile)[0]
    stem = Path(args.out) / f"{safe_name(Path(args.image).stem)}.{safe_name(word)}"
    meta = {"id": Path(args.image).stem, "image": str(args.image), "concept": word, "caption": res.caption,
            "neurons": [list(x) for x in neurons], "method": args.method, "oriented": not args.raw,
            "percentile": args.percentile}
    info = save_heatmap(hm, stem, meta, args.cmap, display_min=DISPLAY_MIN)
    print(f"caption: {res.caption}")
    labels = [neuron_label(x[0], x[-1], x[1] if len(x) == 3 else None) for x in neurons[:10]]
    print(f"{len(neurons)} neuron(s) {', '.join(labels)}{' ...' if len(neurons) > 10 else ''}; "
          f"mask keeps {100 * info['mask_fraction']:.1f}% of pixels")
    print(f"written {stem}.heatmap.png, {stem}.mask.png, {stem}.json")
    return 0


def _words(value: str | None):
    return [w.strip() for w in value.split(",") if w.strip()] if value else None


def cmd_metrics(args: argparse.Namespace) -> int:
    model = args.model or open_results(args.results).run.get("model")  # run.json checked there
    if not model:
        raise MMNError(f"the run in '{args.results}' names no model (run.json): pass --model")
    metrics = tuple(_words(args.metrics) or ALL)
    bad = sorted(set(metrics) - set(ALL))
    if bad:
        raise MMNError(f"unknown metric(s) {bad}: choose from {', '.join(ALL)}")
    options = dict(n=args.neurons, k=args.top_tokens, concepts=_words(args.concepts), max_concepts=args.max_concepts,
                   min_images=args.min_images, max_images=args.max_images if args.max_images else None,
                   random_sets=args.random_sets, seed=args.seed, causal_images=args.causal_images,
                   causal_modes=tuple(_words(args.causal_modes) or ()), sigma=args.sigma,
                   batch_size=args.batch_size, metrics=metrics)
    MetricOptions(**options).validate()  # before the model loads
    engine = load_engine(args, model)
    with _model_notices():
        out = compute_metrics(engine, args.results, images=args.images, progress=not args.quiet, **options)
    path = Path(args.out or args.results) / "metrics.json"
    write_json(path, out)
    print(summary_table(out))
    print(f"{len(out['concepts'])} concepts, {out['records']} images; written {path}")
    few, many = out["left_out"].get("fewer_images", []), out["left_out"].get("past_max_concepts", [])
    if few:
        print(f"left out {len(few)} concept(s) named in fewer than {args.min_images} images (--min-images): "
              f"{', '.join(few[:10])}{' ...' if len(few) > 10 else ''}")
    if many:
        print(f"left out {len(many)} less frequent concept(s) past --max-concepts {args.max_concepts}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.neurons < 1:
        raise MMNError(f"--neurons must be at least 1, got {args.neurons}")
    if args.examples < 0:
        raise MMNError(f"--examples must be at least 0, got {args.examples}")
    if args.results is None and args.results_dir is None:
        raise MMNError("give the run: mmn report --results DIR")
    if args.results is None:
        deprecated("a positional run directory", "--results DIR")
    args.results_dir = args.results or args.results_dir
    engine = None
    if not args.no_model:
        model = args.model
        if model is None:
            model = open_results(args.results_dir).run.get("model")  # run.json checked there
            if model and not (Path(model) / "config.json").is_file():
                print(f"mmn: note: the run's model '{model}' is not a local checkpoint here; the report has no top "
                      "tokens or computed heatmaps (pass --model PATH)", file=sys.stderr)
                model = None
        if model:
            engine = load_engine(args, model)
    with _model_notices():
        path = write_report(args.results_dir, args.out, engine, neurons=args.neurons, examples=args.examples,
                            method=args.method)
    print(f"report written to {path.resolve()}")
    return 0


def register(sub) -> None:
    """Add `heatmap`, `metrics` and `report` to the `mmn` sub-command parsers."""
    h = sub.add_parser("heatmap", help="heatmap and mask of a concept's neurons over an image")
    add_model_options(h)
    h.add_argument("--image", required=True, help='the image to map')
    h.add_argument("--concept", required=True, help="the word whose neurons to map")
    which = h.add_mutually_exclusive_group()
    which.add_argument("--neurons", type=int, default=None, help="mean of the concept's top-N neurons (default 10)")
    which.add_argument("--neuron", default=None, help="one neuron, L<layer>.<index> (e.g. L12.345)")
    h.add_argument("--results", default=None, help="take the concept's top neurons from this find run")
    h.add_argument("--method", default="activation", choices=["activation", "occlusion"],
                   help="activation at the image tokens (the paper), or occlusion of each image token")
    h.add_argument("--percentile", type=float, default=95.0, help="mask: pixels at or above this percentile")
    h.add_argument("--cmap", default=DEFAULT_CMAP, choices=sorted(COLORMAPS),
                   help=f"colour map of the overlay (default {DEFAULT_CMAP}: readable over red objects)")
    h.add_argument("--raw", action="store_true", help="do not orient activations by the sign toward the concept")
    h.add_argument("--prompt", default=DEFAULT_PROMPT, help='the captioning prompt')
    h.add_argument("--prefix", default=None, help="text the caption starts with (e.g. 'An image of')")
    h.add_argument("--max-new-tokens", type=int, default=32, help='caption length limit, in tokens')
    h.add_argument("--out", required=True, help="output directory")
    h.set_defaults(func=cmd_heatmap)

    m = sub.add_parser("metrics", help="the paper's property metrics for a find run (docs/metrics.md)")
    m.add_argument("--results", required=True, help="a finished `mmn find` output directory")
    m.add_argument("--images", default=None, help="the corpus the run read (default: the image paths in results.jsonl)")
    m.add_argument("--out", default=None, help="directory for metrics.json (default: --results)")
    add_model_options(m, required=False, model_help="checkpoint (default: the run's)")
    m.add_argument("--neurons", type=int, default=10, help="top-n neurons per concept")
    m.add_argument("--top-tokens", type=int, default=10, help="top-k tokens per neuron (semantic sensitivity)")
    m.add_argument("--concepts", default=None, help="comma-separated concepts (default: the most frequent)")
    m.add_argument("--max-concepts", type=int, default=20, help='measure at most this many concepts (the most frequent)')
    m.add_argument("--min-images", type=int, default=2, help='leave out concepts named in fewer images (said in the output)')
    m.add_argument("--max-images", type=int, default=1000, help="use the first N result records (0: all)")
    m.add_argument("--random-sets", type=int, default=3, help='random neuron sets per concept (the control)')
    m.add_argument("--causal-images", type=int, default=32, help="images per concept in the causal experiment")
    m.add_argument("--causal-modes", default="zero,noise", help='how the causal metric perturbs the neurons (zero, noise)')
    m.add_argument("--sigma", type=float, default=10.0, help="noise std in units of the RMS entry of W_out")
    m.add_argument("--metrics", default=None, help="subset of semantic,cross_image,specificity,region,causal")
    m.add_argument("--seed", type=int, default=0, help='random neurons, shuffles and noise')
    m.add_argument("--batch-size", type=int, default=16, help='images per forward pass')
    m.add_argument("--quiet", action="store_true", help='no progress bar or per-metric timings')
    m.set_defaults(func=cmd_metrics)

    r = sub.add_parser("report", help="one self-contained HTML report of a find run")
    r.add_argument("--results", default=None, help="a finished `mmn find` output directory")
    r.add_argument("results_dir", nargs="?", default=None, help="deprecated: the run directory as a positional argument")
    r.add_argument("--out", default=None, help="HTML file (default: RESULTS_DIR/report.html)")
    add_model_options(r, required=False, model_help="checkpoint for top tokens and heatmaps (default: the run's)")
    r.add_argument("--no-model", action="store_true", help="do not load the model (no top tokens, no computed heatmaps)")
    r.add_argument("--neurons", type=int, default=10, help="top neurons shown per concept")
    r.add_argument("--examples", type=int, default=3, help="example heatmaps per concept")
    r.add_argument("--method", default="activation", choices=["activation", "occlusion"], help='how heatmaps are made (with --model)')
    r.set_defaults(func=cmd_report)
