"""`find` over an image folder or manifest, written to DIR/results.jsonl, concepts.json, run.json."""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path

from .engine import Engine, FindOptions
from .errors import MMNError
from .inputs import list_images
from .io import atomic_open, write_json
from .results import ConceptAggregator


def _versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {"mmn_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def run_find(engine: Engine, images: str | Path, out_dir: str | Path, teacher_forced: bool = False,
             progress: bool = True, **options) -> dict:
    """Score every image and write the three output files atomically. Returns concepts.json's content."""
    from tqdm.auto import tqdm

    opts = FindOptions(**options)
    opts.validate()
    items = list_images(images)
    captions = None
    if teacher_forced:
        missing = [it.id for it in items if not it.caption]
        if missing:
            raise MMNError(f"teacher-forced mode needs a caption for every image; {len(missing)} have none "
                           f"(first: '{missing[0]}'); add \"caption\" to the manifest lines")
        captions = [it.caption for it in items]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    agg = ConceptAggregator()
    bar = tqdm(total=len(items), desc="find", unit="img", disable=not progress, file=sys.stderr)
    try:
        with atomic_open(out / "results.jsonl") as f:
            for res in engine.iter_find(items, captions=captions, progress=bar, **dataclasses.asdict(opts)):
                f.write(json.dumps(res.to_dict()) + "\n")
                agg.add(res)
    finally:
        bar.close()
    summary = agg.summary(top_n=opts.top_k)
    write_json(out / "concepts.json", summary)
    write_json(out / "run.json", {
        "format_version": 1,
        "model": engine.source or type(engine.model).__name__,
        "weight_fingerprint": engine.fingerprint,
        "adapter": engine.adapter.describe(),
        "images": str(images),
        "n_images": len(items),
        "teacher_forced": teacher_forced,
        "options": dataclasses.asdict(opts),
        "device": str(engine.device),
        "backend": engine.backend,
        "dtype": str(next(engine.model.parameters()).dtype).replace("torch.", ""),
        "versions": _versions(),
    })
    return summary


def summary_table(summary: dict, max_rows: int = 20, neurons: int = 3) -> str:
    """A short text table: concept, images, its most frequent top neurons (layer:index)."""
    lines = [f"{'concept':<16} {'images':>6}  top neurons (layer:index x count)"]
    for word, info in list(summary.items())[:max_rows]:
        top = ", ".join(f"{n['layer']}:{n['index']} x{n['count']}" for n in info["neurons"][:neurons])
        lines.append(f"{word:<16} {info['images']:>6}  {top}")
    if len(summary) > max_rows:
        lines.append(f"... {len(summary) - max_rows} more concepts in concepts.json")
    return "\n".join(lines)
