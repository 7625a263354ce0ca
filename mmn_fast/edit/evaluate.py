"""Evaluating an edit, and the `mmn edit` pipeline (select, edit, evaluate, random control, save).

Metrics, on captions made greedily before and under the patch:
- success: edit images whose caption named the source: the edited caption is the original with the
  source word replaced by the target ("replace"), or, for methods without a target (suppress,
  perturb), no longer names the source ("remove").
- generality: the same on held-out images whose caption names the source (not used for editing).
- locality: held-out images whose caption does not name the source: the caption is unchanged
  (exact match rate).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import MMNError
from ..find.concepts import check_word_list
from ..find.engine import DEFAULT_PROMPT
from ..run.corpus import iter_samples, open_corpus
from .methods import concept_neurons, make_edit, names, random_neurons, replace_word

TARGETED = ("swap", "optimize")  # methods judged by "replace"; the others by "remove"


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


class EditEval:
    """Base captions of the edit and held-out images, made once; `score(patch)` captions under it."""

    def __init__(self, engine, source: str, target: str | None, edit_images, heldout_images,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32, batch_size: int = 8):
        self.engine, self.source, self.target = engine, source, target
        self.edit_images, self.heldout_images = list(edit_images), list(heldout_images)
        self.kw = dict(prompt=prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.edit_base = engine.caption(self.edit_images, **self.kw)
        self.heldout_base = engine.caption(self.heldout_images, **self.kw)

    def _ok(self, base: str, new: str, criterion: str) -> bool:
        if criterion == "replace":
            return new == replace_word(base, self.source, self.target)
        return not names(new, self.source)

    def score(self, patch, criterion: str | None = None) -> dict:
        """{"success", "generality", "locality" (rates, None when no image qualifies), "criterion", "n_*"}."""
        criterion = criterion or ("replace" if patch.method in TARGETED and self.target else "remove")
        with self.engine.patched(patch):
            edit_new = self.engine.caption(self.edit_images, **self.kw)
            held_new = self.engine.caption(self.heldout_images, **self.kw)
        src = self.source
        succ = [self._ok(b, n, criterion) for b, n in zip(self.edit_base, edit_new) if names(b, src)]
        gen = [self._ok(b, n, criterion) for b, n in zip(self.heldout_base, held_new) if names(b, src)]
        loc = [b == n for b, n in zip(self.heldout_base, held_new) if not names(b, src)]
        return {"success": _rate(succ), "generality": _rate(gen), "locality": _rate(loc), "criterion": criterion,
                "n_success": len(succ), "n_generality": len(gen), "n_locality": len(loc),
                "examples": [(b, n) for b, n in zip(self.heldout_base, held_new) if b != n][:3]}


def corpus_images(spec) -> list:
    """The images (PIL) of a corpus, in corpus order, read like `mmn find` reads its --images: a
    folder, a JSONL/CSV manifest, WebDataset tar shards, parquet files or one image. Samples that
    cannot be read are left out with a warning."""
    corpus = open_corpus(spec)
    images, bad = [], []
    for s in iter_samples(corpus, list(range(corpus.n_shards))):
        if s.error is None:
            images.append(s.image)
        else:
            bad.append(s)
    if bad:
        warnings.warn(f"{len(bad)} image(s) of '{spec}' cannot be read and are left out (first: "
                      f"{bad[0].source}: {bad[0].error})", stacklevel=2)
    if not images:
        raise MMNError(f"'{spec}' holds no readable image")
    return images


def _images_from(source) -> tuple[list, Path | None]:
    """(images, results dir or None) from a find output directory (the image paths of its
    results.jsonl) or a corpus (`corpus_images`)."""
    path = Path(source)
    if path.is_dir() and (path / "parts").is_dir() and not (path / "run.json").is_file():
        raise MMNError(f"'{path}' holds a find run that is not finished (no run.json yet): run the same `mmn find` "
                       "command again to finish it, then edit from it")
    if path.is_dir() and (path / "concepts.json").is_file():
        images = []
        results = path / "results.jsonl"
        if results.is_file():
            for n, line in enumerate(results.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        raise MMNError(f"{results}:{n} is not valid JSON (a truncated run? run find again with the "
                                       "same command to finish it)") from None
                    if isinstance(rec, dict) and rec.get("image"):
                        images.append(rec["image"])
        return images, path
    return corpus_images(path), None


def run_edit(engine, source: str, target: str | None, method: str, n: int, from_, eval_images=None,
             exclude_layers=(), random: bool = False, control: bool = True, seed: int = 0,
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32, batch_size: int = 8, evaluate: bool = True,
             **params) -> tuple:
    """Select the top-n neurons of `source` (or n random ones), edit them, and evaluate the edit and,
    with `control`, the same method on n random neurons. Returns (patch, report rows).

    from_: a find output directory (neurons from its concepts.json, edit images from results.jsonl),
    a corpus path (`corpus_images`) or images. Held-out images: `eval_images` (a corpus path or
    images), else every other image of `from_` is held out.
    """
    # Words the tokenizer cannot spell (mapped to <unk>) would give a useless patch: refuse them, as find does.
    check_word_list(engine.tokenizer, [w for w in (source, target) if w])
    images, results_dir = _images_from(from_) if isinstance(from_, (str, Path)) else (list(from_), None)
    if eval_images is not None:
        heldout = corpus_images(eval_images) if isinstance(eval_images, (str, Path)) else list(eval_images)
        edit_images = images
    else:
        edit_images, heldout = images[0::2], images[1::2]
    if not edit_images:
        raise MMNError("no edit images: give a find output directory with results.jsonl, or images")
    kw = dict(prompt=prompt, max_new_tokens=max_new_tokens)
    top = (concept_neurons(engine, source, n, results=results_dir, exclude_layers=exclude_layers,
                           batch_size=batch_size, **kw) if results_dir is not None else
           concept_neurons(engine, source, n, images=edit_images, exclude_layers=exclude_layers,
                           batch_size=batch_size, **kw))
    rand = random_neurons(engine, n, exclude_layers, seed=seed)
    ev = EditEval(engine, source, target, edit_images, heldout, batch_size=batch_size, **kw) if evaluate else None
    captions = None
    if method == "optimize":
        captions = ev.edit_base if ev else engine.caption(edit_images, batch_size=batch_size, **kw)
    opt_kw = {**params, "seed": seed, **(kw if method == "optimize" else {})}
    patch = make_edit(engine, method, rand if random else top, source, target, edit_images, captions, **opt_kw)
    patch.params["selection"] = "random" if random else "top"
    rows = []
    if ev is not None:
        rows.append({"method": method, "neurons": f"{'random' if random else 'top'}-{n}", **ev.score(patch)})
        if control and not random:
            ctrl = make_edit(engine, method, rand, source, target, edit_images, captions, **opt_kw)
            rows.append({"method": method, "neurons": f"random-{n}", **ev.score(ctrl)})
    return patch, rows


def report_table(rows: list[dict]) -> str:
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    lines = [f"{'method':<9} {'neurons':<10} {'criterion':<9} {'success':>8} {'generality':>10} {'locality':>8}"
             f"   (images: edit / held-out with / without the concept)"]
    for r in rows:
        lines.append(f"{r['method']:<9} {r['neurons']:<10} {r['criterion']:<9} {pct(r['success']):>8} "
                     f"{pct(r['generality']):>10} {pct(r['locality']):>8}   "
                     f"({r['n_success']} / {r['n_generality']} / {r['n_locality']})")
    return "\n".join(lines)
