"""`mmn demo`: build (once) the trained demo model, find its neurons on fresh images, explain them."""
from __future__ import annotations

import json
from pathlib import Path

from ..find.engine import load
from ..run.runner import run_find, summary_table
from ..find.vocab import top_tokens

FRESH_SEED = 20241125  # not a training or held-out seed of the demo recipe


def run_demo(out_dir: str | Path = "mmn_demo_out", cache_dir=None, n_images: int = 24, top_k: int = 20,
             device=None, progress: bool = True, n_neurons: int = 3) -> dict:
    from .build import build_demo_model
    from .data import make_examples, save_examples

    path = build_demo_model(cache_dir, progress=progress)
    info = json.loads((Path(path) / "demo_info.json").read_text())
    print(f"demo model: {path} (held-out exact-match {100 * info.get('heldout_accuracy', float('nan')):.1f}%)")
    engine = load(path, device=device)
    out = Path(out_dir)
    manifest = save_examples(make_examples(n_images, seed=FRESH_SEED), out / "images")
    summary = run_find(engine, manifest, out, progress=progress, concepts="all", top_k=top_k, max_new_tokens=12,
                       overwrite=True)
    results = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    truth = {rec["id"]: rec["caption"] for rec in map(json.loads, Path(manifest).read_text().splitlines())}
    correct = sum(r["caption"] == truth.get(r["id"]) for r in results)
    print(f"captions: {correct}/{len(results)} exactly right on fresh images\n")
    print(summary_table(summary))
    print("\ntop neurons per concept, with the tokens each one promotes:")
    for word, info_w in summary.items():
        parts = []
        for n in info_w["neurons"][:n_neurons]:
            toks = " ".join(t for t, _, _ in top_tokens(engine, n["layer"], n["index"], k=3))
            parts.append(f"L{n['layer']}.{n['index']} [{toks}]")
        print(f"  {word:<10} " + "; ".join(parts))
    print(f"\nresults written to {out.resolve()} (results.jsonl, concepts.json, run.json, images/)")
    return summary
