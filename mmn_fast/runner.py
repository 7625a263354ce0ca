"""`find` over an image folder or manifest, written to DIR/results.jsonl, concepts.json, run.json."""
from __future__ import annotations

import platform
from pathlib import Path

from .engine import Engine


def _versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {"mmn_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def run_find(engine: Engine, images: str | Path, out_dir: str | Path, teacher_forced: bool = False,
             progress: bool = True, **options) -> dict:
    """Score every image of a folder, manifest, WebDataset or Parquet corpus into `out_dir`
    (results.jsonl, skipped.jsonl, concepts.json, aggregates, run.json); a killed run resumes when
    called again with the same arguments. Returns concepts.json's content (on rank 0).

    options: the fields of `FindOptions`, plus the scheduler's `num_workers`, `shard_size`,
    `checkpoint_every`, `checkpoint_seconds`, `overwrite`, `aggregate` (see `run_corpus`).
    """
    from .scheduler import run_corpus

    summary = run_corpus(engine, images, out_dir, teacher_forced=teacher_forced, progress=progress, **options)
    return summary.get("concepts_json", {})


def summary_table(summary: dict, max_rows: int = 20, neurons: int = 3) -> str:
    """A short text table: concept, images, its most frequent top neurons (layer:index)."""
    lines = [f"{'concept':<16} {'images':>6}  top neurons (layer:index x count)"]
    for word, info in list(summary.items())[:max_rows]:
        top = ", ".join(f"{n['layer']}:{n['index']} x{n['count']}" for n in info["neurons"][:neurons])
        lines.append(f"{word:<16} {info['images']:>6}  {top}")
    if len(summary) > max_rows:
        lines.append(f"... {len(summary) - max_rows} more concepts in concepts.json")
    return "\n".join(lines)
