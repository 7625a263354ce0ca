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

Everything read back is checked first (`run_file`: a regular file whose real path lies inside the run
directory, never a link to a file elsewhere; then its fields): a damaged or hand-edited run is one
MMNError naming the file and the field, not a traceback.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import MMNError
from ..find.results import ImageResult
from ..io import save_safetensors, write_json

FORMAT_VERSION = 2  # 2: one tensor per dense concept and statistic
MODES = ("dense", "sparse")
SPARSE_COLUMNS = ("concept", "layer", "index", "topk", "topk_sum", "topk_sumsq")
DENSE_DTYPES = {"sum": torch.float64, "sumsq": torch.float64, "topk_sum": torch.float64, "topk": torch.int32}
RERUN = "rerun `mmn find` into the folder (--overwrite to start again)"  # the fix for a damaged run


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
        for *neuron, score in top:  # [layer, index, score], or [layer, expert, index, score] (MoE models)
            key = tuple(neuron)
            cell = table.get(key)
            if cell is None:
                table[key] = [1, score, score * score]
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
            rows = [(key, c, s / c) for key, (c, s, _) in self.sparse.get(word, {}).items()]
            rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
            return [{"layer": key[0], **({"expert": key[1]} if len(key) == 3 else {}), "index": key[-1], "count": c,
                     "mean_score": m} for key, c, m in rows[:n]]
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
        # Neurons are (layer, index), or (layer, expert, index) in models with mixture-of-experts layers: then
        # an "expert" column (-1 for a dense layer's neurons) sits beside the others.
        experts = any(len(key) == 3 for table in self.sparse.values() for key in table)
        cells = [(c, key[0], key[-1], key[1] if len(key) == 3 else -1, *v)
                 for c, w in enumerate(words) for key, v in self.sparse.get(w, {}).items()]
        if not cells:
            return {}, index
        cols = list(zip(*cells))
        out = {"concept": torch.tensor(cols[0], dtype=torch.int32), "layer": torch.tensor(cols[1], dtype=torch.int32),
               "index": torch.tensor(cols[2], dtype=torch.int32), "topk": torch.tensor(cols[4], dtype=torch.int64),
               "topk_sum": torch.tensor(cols[5], dtype=torch.float64),
               "topk_sumsq": torch.tensor(cols[6], dtype=torch.float64)}
        if experts:
            out["expert"] = torch.tensor(cols[3], dtype=torch.int32)
        return out, index

    def save(self, stem: str | Path) -> None:
        """`<stem>.safetensors` then `<stem>.json` (the index, written last), both atomically. The stem
        is used as is (no suffix replaced): checkpoints are `rank-000.agg-<seq>`."""
        tensors, index = self.tensors()
        save_safetensors(f"{stem}.safetensors", tensors, {"format_version": str(FORMAT_VERSION)})
        write_json(f"{stem}.json", index)

    @classmethod
    def load(cls, stem: str | Path) -> "NeuronStats":
        """Read `save`'s pair back; every field and tensor is checked against the index first."""
        try:
            index = json.loads(Path(f"{stem}.json").read_text())
            tensors = load_file(f"{stem}.safetensors")
        except (OSError, ValueError) as e:
            raise MMNError(f"cannot read aggregates '{stem}': {e}") from None
        if not isinstance(index, dict):
            raise MMNError(f"'{stem}.json' is not an aggregates index (a JSON object); {RERUN}")
        if index.get("format_version") != FORMAT_VERSION:
            raise MMNError(f"aggregates '{stem}' have format version {index.get('format_version')!r}; "
                           f"this mmn_fast reads version {FORMAT_VERSION}")
        _check_index(f"{stem}.json", index)
        stats = cls(index["mode"], index["n_layers"], index["d_mlp"])
        words = index["concepts"]
        stats.images = dict(zip(words, index["images"]))
        if stats.mode == "dense":
            for row, w in enumerate(index.get("dense_rows", [])):
                stats.dense[w] = {k: _tensor(tensors, f"{row}/{k}", stem, (stats.n_layers, stats.d_mlp))
                                  for k in ("sum", "sumsq", "topk_sum", "topk")}
        elif tensors:
            cols = [_tensor(tensors, k, stem, None) for k in SPARSE_COLUMNS]
            experts = _tensor(tensors, "expert", stem, None) if "expert" in tensors else None
            _check_sparse(stem, cols, len(words), stats.n_layers, None if experts is not None else stats.d_mlp, experts)
            es = experts.tolist() if experts is not None else None
            for j, (c, l, i, n, s, ss) in enumerate(zip(*(c.tolist() for c in cols))):
                stats.sparse[words[c]][(l, i) if es is None else (l, es[j], i)] = [n, s, ss]
        return stats


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_index(name: str, index: dict) -> None:
    """The fields of an aggregates index, before any is used."""
    def bad(field, want):
        raise MMNError(f"'{name}': field '{field}' must be {want}, got {index.get(field)!r:.80}; {RERUN}")

    if index.get("mode") not in MODES:
        bad("mode", "'dense' or 'sparse'")
    for key in ("n_layers", "d_mlp"):
        if not _is_int(index.get(key)) or index[key] < 0:
            bad(key, "an integer >= 0")
    words, images = index.get("concepts"), index.get("images")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(set(words)) != len(words):
        bad("concepts", "a list of distinct words")
    if not isinstance(images, list) or len(images) != len(words) or not all(_is_int(n) and n >= 0 for n in images):
        bad("images", f"a list of {len(words)} image counts (one per concept)")
    rows = index.get("dense_rows", [])
    if not isinstance(rows, list) or not set(rows) <= set(words) or len(set(rows)) != len(rows):
        bad("dense_rows", "a list of distinct words of 'concepts'")


def _tensor(tensors: dict, key: str, stem, shape: tuple | None) -> torch.Tensor:
    t = tensors.get(key)
    want = DENSE_DTYPES.get(key.rpartition("/")[2]) if shape else None
    if t is None or (shape and (tuple(t.shape) != shape or t.dtype != want)) or (not shape and t.dim() != 1):
        got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
        need = f"{want} {shape}" if shape else "a column"
        raise MMNError(f"'{stem}.safetensors': tensor '{key}' is {got}, where its index needs {need}; {RERUN}")
    return t


def _check_sparse(stem, cols: list[torch.Tensor], n_words: int, n_layers: int, d_mlp: int | None,
                  experts: torch.Tensor | None = None) -> None:
    """Sparse columns: one length, concept rows and neuron coordinates in range (expert >= -1; an expert's
    neuron index is bounded by its own width, which the index does not record)."""
    if experts is not None and (len(experts) != len(cols[0]) or experts.dtype.is_floating_point
                                or (len(experts) and int(experts.min()) < -1)):
        raise MMNError(f"'{stem}.safetensors': the 'expert' column differs in length from the others, is not "
                       f"integer, or holds values below -1; {RERUN}")
    if len({len(c) for c in cols}) != 1 or any(c.dtype.is_floating_point for c in cols[:4]):
        raise MMNError(f"'{stem}.safetensors': the sparse columns differ in length, or a count or coordinate "
                       f"column is not integer; {RERUN}")
    for col, (name, hi) in zip(cols, (("concept", n_words), ("layer", n_layers), ("index", d_mlp))):
        if len(col) and (int(col.min()) < 0 or (hi and int(col.max()) >= hi)):
            span = f"0..{hi - 1}" if hi else "0 and up"
            raise MMNError(f"'{stem}.safetensors': column '{name}' holds values outside {span}; {RERUN}")


def inside_run(root: str | Path, path: str | Path) -> bool:
    """Whether the real path of `path` (links and `..` resolved) lies inside the run directory `root`."""
    base = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), base]) == base


def outside_run(root: str | Path, path: str | Path) -> str | None:
    """Why `path`, a file the run directory `root` points to, may not be read through the run (None
    when it may): it must be a regular file whose real path lies inside `root` (a link or `..` to a
    file elsewhere would put that file into a report, a merge or a shared folder)."""
    if not inside_run(root, path):
        return "leads outside the run directory"
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isfile(path):
        return "is not a regular file"
    return None


def run_file(root: str | Path, path: str | Path) -> Path:
    """`path` when `outside_run` allows it, else MMNError naming the file (and where a link leads)."""
    why = outside_run(root, path)
    if why:
        real = os.path.realpath(path)
        to = f" (to '{real}')" if real != os.path.abspath(path) else ""
        raise MMNError(f"'{path}' {why}{to}: a run reads only its own files (put the file itself there), or {RERUN}")
    return Path(path)


# run.json fields other modules use: (key, types, what); None is allowed for every one
_RUN_FIELDS = (("model", str, "a string"), ("adapter", dict, "an object"), ("options", dict, "an object"),
               ("totals", dict, "an object"), ("weight_fingerprint", str, "a string"),
               ("format_version", int, "an integer"), ("seconds", (int, float), "a number"))
_OPTION_TYPES = {"prompt": (str,), "prefix": (str, type(None)), "activation": (str,), "top_k": (int,),
                 "max_new_tokens": (int,), "fold_final_norm": (bool,)}


def check_run_json(name, run) -> None:
    """The run.json fields the library reads: their types, and positive model sizes."""
    if not isinstance(run, dict):
        raise MMNError(f"'{name}' is not a run.json of mmn find (a JSON object; got {type(run).__name__}); {RERUN}")
    for key, types, what in _RUN_FIELDS:
        v = run.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise MMNError(f"'{name}': field '{key}' must be {what}, got {v!r:.80}; {RERUN}")
    for key in ("n_layers", "d_mlp"):
        v = (run.get("adapter") or {}).get(key)
        if v is not None and (not _is_int(v) or v < 1):
            raise MMNError(f"'{name}': field 'adapter.{key}' must be an integer >= 1, got {v!r:.80}; {RERUN}")
    for key, v in (run.get("totals") or {}).items():
        if not _is_int(v) or v < 0:
            raise MMNError(f"'{name}': field 'totals.{key}' must be an integer >= 0, got {v!r:.80}; {RERUN}")
    for key, types in _OPTION_TYPES.items():
        v = (run.get("options") or {}).get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise MMNError(f"'{name}': field 'options.{key}' must be {' or '.join(t.__name__ for t in types)}, "
                           f"got {v!r:.80}; {RERUN}")


def check_record(rec, where: str, n_layers: int | None = None, d_mlp: int | None = None) -> dict:
    """A results.jsonl record as readers use it (id, image, caption, output_ids, each concept's word,
    token, step and [layer, index, score] neurons ([layer, expert, index, score] in models with
    mixture-of-experts layers), in range when the model's sizes are known); `where`:
    the file and line, for the message. Returns the record."""
    def bad(field, want, got):
        raise MMNError(f"{where}: field '{field}' must be {want}, got {got!r:.80}; {RERUN}")

    if not isinstance(rec, dict):
        raise MMNError(f"{where} is not a result record (a JSON object); {RERUN}")
    for key, types, what in (("id", (str, int), "a string"), ("image", str, "a string"), ("caption", str, "a string"),
                             ("output_ids", list, "a list of token ids"), ("concepts", list, "a list")):
        if not isinstance(rec.get(key), types):
            bad(key, what, rec.get(key))
    if not all(_is_int(t) for t in rec["output_ids"]):
        bad("output_ids", "a list of token ids", rec["output_ids"])
    span = (f"layer in 0..{n_layers - 1}" if n_layers else "layer >= 0") + " and " + \
        (f"index in 0..{d_mlp - 1}" if d_mlp else "index >= 0")
    n_layers, d_mlp = n_layers or float("inf"), d_mlp or float("inf")
    for j, c in enumerate(rec["concepts"]):
        if not (isinstance(c, dict) and isinstance(c.get("word"), str) and _is_int(c.get("token_id"))
                and _is_int(c.get("step")) and isinstance(c.get("neurons"), list)):
            bad(f"concepts[{j}]", "an object with word, token_id, step and neurons", c)
        for k, x in enumerate(c["neurons"]):
            if type(x) is list and len(x) == 4:  # [layer, expert, index, score]: an expert's width is its own
                if not (all(type(v) is int for v in x[:3]) and type(x[3]) in (int, float) and 0 <= x[0] < n_layers
                        and x[1] >= -1 and x[2] >= 0):
                    bad(f"concepts[{j}].neurons[{k}]", "[layer, expert, index, score] with layer in range, "
                                                       "expert >= -1 and index >= 0", x)
            elif not (type(x) is list and len(x) >= 2 and type(x[0]) is int and type(x[1]) is int
                      and 0 <= x[0] < n_layers and 0 <= x[1] < d_mlp):
                bad(f"concepts[{j}].neurons[{k}]", f"[layer, index, score] with {span}", x)
    return rec


class Results:
    """A finished `find` run directory: `open_results(DIR)`. Every file is read through `run_file`
    and checked (run.json at once, the rest when first used)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        run_json = self.file("run.json")
        try:
            self.run = json.loads(run_json.read_text())
        except (OSError, ValueError):
            raise MMNError(f"'{self.path}' is not a finished find run (no readable run.json)") from None
        check_run_json(run_json, self.run)
        adapter = self.run.get("adapter") or {}
        self.sizes = (adapter.get("n_layers"), adapter.get("d_mlp"))  # None where run.json does not say
        self._stats = None

    def file(self, name: str) -> Path:
        """DIR/name; when it exists (or is a link) it must be a regular file inside the run (`run_file`).
        A missing file is left to the reader (an OSError, as before)."""
        path = self.path / name
        return run_file(self.path, path) if os.path.lexists(path) else path

    @property
    def stats(self) -> NeuronStats:
        if self._stats is None:
            for name in ("aggregates.json", "aggregates.safetensors"):
                self.file(name)
            stats = NeuronStats.load(self.path / "aggregates")
            n_layers, d_mlp = self.sizes
            if None not in self.sizes and (stats.n_layers, stats.d_mlp) != self.sizes:
                raise MMNError(f"'{self.path / 'aggregates.json'}' is for {stats.n_layers} x {stats.d_mlp} neurons, "
                               f"run.json for {n_layers} x {d_mlp}; {RERUN}")
            self._stats = stats
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
        """The result records (dicts) of results.jsonl, streamed, each checked (`check_record`)."""
        path = self.file("results.jsonl")
        with open(path) as f:
            for n, line in enumerate(f, 1):
                yield check_record(self._line(path, n, line), f"'{path}' line {n}", *self.sizes)

    def skipped(self) -> list[dict]:
        p = self.file("skipped.jsonl")
        if not p.is_file():
            return []
        recs = [self._line(p, n, line) for n, line in enumerate(p.read_text().splitlines(), 1)]
        bad = next((n for n, r in enumerate(recs, 1) if not isinstance(r, dict)), None)
        if bad:
            raise MMNError(f"'{p}' line {bad} is not a skipped-sample record (a JSON object); {RERUN}")
        return recs

    @staticmethod
    def _line(path: Path, n: int, line: str):
        try:
            return json.loads(line)
        except ValueError as e:
            raise MMNError(f"'{path}' line {n} is not valid JSON ({e.msg}; the file may be cut short); "
                           f"{RERUN}") from None


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
