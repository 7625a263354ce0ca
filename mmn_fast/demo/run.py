"""`mmn demo`: build (once) the trained demo model, find its neurons on fresh images, explain them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..find.engine import load
from ..find.vocab import activation_signs, concept_tokens, promoted_tokens
from ..run.runner import run_find
from .build import build_demo_model, default_cache_dir
from .data import make_examples, save_examples

FRESH_SEED = 20241125  # not a training or held-out seed of the demo recipe


@dataclass
class DemoRun:
    """What `run_demo` found, for the command line to show."""
    model_path: Path
    heldout_accuracy: float  # the demo model's exact-match caption accuracy on its held-out set
    out_dir: Path
    correct: int  # captions exactly right on the fresh images
    captions: int
    concepts: dict  # concepts.json
    # word -> (layer, index, tokens) per top neuron: the tokens it promotes given the sign of its activation
    # at the concept (the bottom of W_U W_out[:, i] where it fires negative; signs below)
    top_tokens: dict[str, list[tuple[int, int, list[str]]]]
    signs: dict[str, list[int]] | None = None  # word -> +1 / -1 per top neuron: the sign of its activation there


def run_demo(out_dir: str | Path | None = None, cache_dir=None, n_images: int = 24, top_k: int = 20,
             device=None, progress: bool = True, n_neurons: int = 3) -> DemoRun:
    """out_dir: where the find run goes (default `demo-run/` in the cache root, never the working folder)."""
    path = build_demo_model(cache_dir, progress=progress)
    info = json.loads((Path(path) / "demo_info.json").read_text())
    engine = load(path, device=device)
    out = Path(out_dir) if out_dir is not None else Path(cache_dir or default_cache_dir()).expanduser() / "demo-run"
    manifest = save_examples(make_examples(n_images, seed=FRESH_SEED), out / "images")
    summary = run_find(engine, manifest, out, progress=progress, concepts="all", top_k=top_k, max_new_tokens=12,
                       overwrite=True)
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    truth = {rec["id"]: rec["caption"] for rec in map(json.loads, Path(manifest).read_text().splitlines())}
    correct = sum(r["caption"] == truth.get(r["id"]) for r in results)
    tokens, signs = _promoted(engine, summary, concept_tokens(results), n_neurons)
    return DemoRun(model_path=Path(path), heldout_accuracy=info.get("heldout_accuracy", float("nan")), out_dir=out,
                   correct=correct, captions=len(results), concepts=summary, top_tokens=tokens, signs=signs)


def _promoted(engine, summary: dict, token_ids: dict[str, int], n: int, k: int = 3):
    """Per concept, its top-n neurons' activation signs there and the k tokens each promotes given it."""
    tokens, signs = {}, {}
    for word, info in summary.items():
        top = info["neurons"][:n]
        neurons = [(x["layer"], x["index"]) for x in top]
        signs[word] = activation_signs(engine, token_ids[word], neurons, [x["mean_score"] for x in top])
        tokens[word] = [(l, i, toks) for (l, i), toks in zip(neurons, promoted_tokens(engine, neurons, signs[word], k))]
    return tokens, signs
