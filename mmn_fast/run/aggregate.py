"""Per-concept neuron statistics over a corpus, in memory that does not grow with the corpus.

Each (image, concept word) pair counts once (the word's first occurrence in the caption). Two modes:

- dense: for every neuron of every concept, over the images naming the concept: the sum and the
  sum of squares of its score, the number of images where it ranked in the concept's top-k and
  the sum of its scores there. Memory: concepts x layers x neurons x 28 bytes (three float64 sums
  and one int32 count), e.g. 1,000 concepts on LLaVA-7B (32 x 11008 neurons): 9.9 GB.
- sparse: only neurons that reached an image's top-k are kept, with their top-k count, score sum
  and sum of squares there, for corpora with many thousands of concepts. Per distinct (concept,
  neuron) pair that ever ranked in a top-k (at most images x top_k): about 242 bytes of memory (a
  dict entry with a tuple key and a list of three numbers), about 209 bytes more at the peak of a
  save (the stacked columns), 36 bytes on disk (three int32, one int64, two float64). Measured on
  972,283 pairs (50 concepts, 32 x 11008 neurons, Python 3.11) with tracemalloc: see
  docs/scaling.md, "Aggregates", for the script.

Stored as `aggregates.safetensors` (dense: tensors `<row>/<statistic>` [L, F]; sparse: stacked
columns; no pickle) plus `aggregates.json` (format version, mode, concepts in row order, image
counts), written straight to disk without an in-memory copy of the table. `open_results(DIR)` reads a run back.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import MMNError
from ..find.results import ImageResult
from ..io import save_safetensors, write_json

FORMAT_VERSION = 2  # 2: one tensor per dense concept and statistic
MODES = ("dense", "sparse")


class NeuronStats:
    """Accumulator. `add(word, scores [L, F], top [[layer, index, score], ...])` per (image, word)."""

    def __init__(self, mode: str, n_layers: int, d_mlp: int):
        if mode not in MODES:
            raise MMNError(f"aggregate mode must be 'dense' or 'sparse', got {mode!r}")
        self.mode, self.n_layers, self.d_mlp = mode, n_layers, d_mlp
        self.images: dict[str, int] = {}  # word -> images naming it, in first-seen order
        self.dense: dict[str, dict[str, torch.Tensor]] = {}  # word -> {"sum","sumsq","topk_sum": f64, "topk": i32} [L, F]
        self.sparse: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(dict)  # word -> (l, i) -> [n, sum, sumsq]

    def add(self, word: str, scores: torch.Tensor | None, top: list[list]) -> None:
        self.images[word] = self.images.get(word, 0) + 1
        if self.mode == "dense":
            if scores is None:
                raise MMNError("dense aggregates need every neuron's score: run find with keep_scores=True")
            d = self.dense.get(word)
            if d is None:
                z = torch.zeros(self.n_layers, self.d_mlp, dtype=torch.float64)
                d = self.dense[word] = {"sum": z, "sumsq": z.clone(), "topk_sum": z.clone(),
                                        "topk": torch.zeros(self.n_layers, self.d_mlp, dtype=torch.int32)}
            s = scores.detach().to("cpu", torch.float64)  # [L, F]
            d["sum"] += s
            d["sumsq"] += s * s
            if top:
                layer = torch.tensor([t[0] for t in top])
                index = torch.tensor([t[1] for t in top])
                d["topk"][layer, index] += 1
                d["topk_sum"][layer, index] += s[layer, index]
            return
        table = self.sparse[word]
        for layer, index, score in top:
            cell = table.get((layer, index))
            if cell is None:
                table[(layer, index)] = [1, score, score * score]
            else:
                cell[0] += 1
                cell[1] += score
                cell[2] += score * score

    def merge(self, other: "NeuronStats") -> None:
        """Add another accumulator's statistics (same mode and model) into this one."""
        if (other.mode, other.n_layers, other.d_mlp) != (self.mode, self.n_layers, self.d_mlp):
            raise MMNError("cannot merge aggregates of different modes or models")
        for word, n in other.images.items():
            self.images[word] = self.images.get(word, 0) + n
        for word, d in other.dense.items():
            if word not in self.dense:
                self.dense[word] = {k: v.clone() for k, v in d.items()}
            else:
                for k, v in d.items():
                    self.dense[word][k] += v
        for word, table in other.sparse.items():
            mine = self.sparse[word]
            for key, (n, s, ss) in table.items():
                cell = mine.get(key)
                if cell is None:
                    mine[key] = [n, s, ss]
                else:
                    cell[0] += n
                    cell[1] += s
                    cell[2] += ss

    # ------------------------------------------------------------------ queries
    def top_neurons(self, word: str, n: int = 50) -> list[dict]:
        """Neurons that most often ranked in the word's top-k (ties: higher mean score there)."""
        rows = []
        if self.mode == "dense":
            d = self.dense.get(word)
            if d is None:
                return []
            count = d["topk"].flatten()
            hit = count.nonzero().squeeze(1)
            for flat, c, s in zip(hit.tolist(), count[hit].tolist(), d["topk_sum"].flatten()[hit].tolist()):
                rows.append((flat // self.d_mlp, flat % self.d_mlp, c, s / c))
        else:
            rows = [(l, i, c, s / c) for (l, i), (c, s, _) in self.sparse.get(word, {}).items()]
        rows.sort(key=lambda r: (-r[2], -r[3], r[0], r[1]))
        return [{"layer": l, "index": i, "count": c, "mean_score": m} for l, i, c, m in rows[:n]]

    def summary(self, top_n: int = 50) -> dict:
        """concepts.json: per word, images naming it and its most frequent top-k neurons."""
        words = sorted(self.images, key=lambda w: (-self.images[w], w))
        return {w: {"images": self.images[w], "neurons": self.top_neurons(w, top_n)} for w in words}

    # ------------------------------------------------------------------ storage
    def tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(stacked tensors, JSON index) for safetensors; rows follow index['concepts']."""
        words = list(self.images)
        index = {"format_version": FORMAT_VERSION, "mode": self.mode, "n_layers": self.n_layers,
                 "d_mlp": self.d_mlp, "concepts": words, "images": [self.images[w] for w in words]}
        if self.mode == "dense":  # one tensor per (concept, statistic): no stacked copy of the whole table
            dense_words = [w for w in words if w in self.dense]
            index["dense_rows"] = dense_words
            return {f"{row}/{k}": self.dense[w][k] for row, w in enumerate(dense_words)
                    for k in ("sum", "sumsq", "topk_sum", "topk")}, index
        cells = [(c, l, i, *v) for c, w in enumerate(words) for (l, i), v in self.sparse.get(w, {}).items()]
        if not cells:
            return {}, index
        cols = list(zip(*cells))
        return {"concept": torch.tensor(cols[0], dtype=torch.int32), "layer": torch.tensor(cols[1], dtype=torch.int32),
                "index": torch.tensor(cols[2], dtype=torch.int32), "topk": torch.tensor(cols[3], dtype=torch.int64),
                "topk_sum": torch.tensor(cols[4], dtype=torch.float64),
                "topk_sumsq": torch.tensor(cols[5], dtype=torch.float64)}, index

    def save(self, stem: str | Path) -> None:
        """`<stem>.safetensors` then `<stem>.json` (the index, written last), both atomically. The stem
        is used as is (no suffix replaced): checkpoints are `rank-000.agg-<seq>`."""
        tensors, index = self.tensors()
        save_safetensors(f"{stem}.safetensors", tensors, {"format_version": str(FORMAT_VERSION)})
        write_json(f"{stem}.json", index)

    @classmethod
    def load(cls, stem: str | Path) -> "NeuronStats":
        try:
            index = json.loads(Path(f"{stem}.json").read_text())
            tensors = load_file(f"{stem}.safetensors")
        except (OSError, ValueError) as e:
            raise MMNError(f"cannot read aggregates '{stem}': {e}") from None
        if index.get("format_version") != FORMAT_VERSION:
            raise MMNError(f"aggregates '{stem}' have format version {index.get('format_version')!r}; "
                           f"this mmn_fast reads version {FORMAT_VERSION}")
        stats = cls(index["mode"], index["n_layers"], index["d_mlp"])
        words = index["concepts"]
        stats.images = dict(zip(words, index["images"]))
        if stats.mode == "dense":
            for row, w in enumerate(index.get("dense_rows", [])):
                stats.dense[w] = {k: tensors[f"{row}/{k}"] for k in ("sum", "sumsq", "topk_sum", "topk")}
        elif tensors:
            cols = [tensors[k].tolist() for k in ("concept", "layer", "index", "topk", "topk_sum", "topk_sumsq")]
            for c, l, i, n, s, ss in zip(*cols):
                stats.sparse[words[c]][(l, i)] = [n, s, ss]
        return stats


class Results:
    """A finished `find` run directory: `open_results(DIR)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.run = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError):
            raise MMNError(f"'{self.path}' is not a finished find run (no readable run.json)") from None
        self._stats = None

    @property
    def stats(self) -> NeuronStats:
        if self._stats is None:
            self._stats = NeuronStats.load(self.path / "aggregates")
        return self._stats

    @property
    def concepts(self) -> dict[str, int]:
        """word -> number of images naming it."""
        return dict(self.stats.images)

    def top_neurons(self, word: str, n: int = 50) -> list[dict]:
        return self.stats.top_neurons(word, n)

    def mean_scores(self, word: str) -> torch.Tensor:
        """[L, F] mean score of every neuron over the images naming `word` (dense runs only)."""
        st = self.stats
        if st.mode != "dense":
            raise MMNError("mean scores over all neurons need a dense run (--aggregate dense)")
        if word not in st.dense:
            raise MMNError(f"'{word}' is not a concept of this run")
        return st.dense[word]["sum"] / st.images[word]

    def __iter__(self):
        """The result records (dicts) of results.jsonl, streamed."""
        with open(self.path / "results.jsonl") as f:
            for line in f:
                yield json.loads(line)

    def skipped(self) -> list[dict]:
        p = self.path / "skipped.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def open_results(path: str | Path) -> Results:
    """Open a `mmn find` output directory: results, skipped samples and per-concept aggregates."""
    return Results(path)


class ConceptAggregator:
    """In memory, per concept word: the images that name it and the neurons that most often rank in
    its top-k, with their mean score there. The same statistics as a corpus run's sparse aggregates
    (`NeuronStats`): each (image, word) pair counts once, at the word's first
    occurrence in the caption."""

    def __init__(self):
        self.stats = NeuronStats("sparse", 0, 0)  # sparse statistics need no model sizes

    def add(self, result: ImageResult) -> None:
        seen = set()
        for c in result.concepts:
            word = c.word.lower()
            if word not in seen:
                seen.add(word)
                self.stats.add(word, None, c.neurons)

    def summary(self, top_n: int = 50) -> dict:
        return self.stats.summary(top_n)
