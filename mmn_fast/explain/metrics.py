"""The paper's property metrics for a finished `mmn find` run; definitions and formulas: docs/metrics.md.

Reuse: a concept's top-n neurons come from the run's aggregates, each image's own top-n ranking and
caption from results.jsonl (cross-image invariance needs nothing else). One teacher-forced pass over
the run's captions records the chosen neurons (specificity) and each caption token's probability
(the causal baseline); region invariance re-scores the same captions teacher-forced with the image
tokens shuffled (no generation); only the causal experiment generates captions again.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..edit.methods import names, perturb, random_neurons, suppress, word_token
from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT
from ..find.heatmap import concept_signs, language_model, trace
from ..find.vocab import activation_signs, neuron_ends, output_vectors
from ..model.inputs import load_image
from ..run.aggregate import open_results
from ..run.corpus import iter_samples, open_corpus
# RunModelWarning and check_run_model are imported from here too (mmn_fast.cli.explain, user code)
from ..run.runinfo import RunModelWarning, check_run_model, ids_digest, model_name, run_fingerprint  # noqa: F401

FORMAT_VERSION = 1
ALL = ("semantic", "cross_image", "specificity", "region", "causal")

log = logging.getLogger(__name__)


@dataclass
class MetricOptions:
    n: int = 10  # top-n neurons per concept
    k: int = 10  # top-k tokens per neuron (semantic sensitivity)
    concepts: list | None = None  # default: the most frequent ones
    max_concepts: int = 20
    min_images: int = 2
    max_images: int | None = 1000  # records of results.jsonl used (the first ones)
    random_sets: int = 3  # random neuron sets of size n: the control of every metric
    seed: int = 0
    rbo_p: float = 0.9
    max_pairs: int = 2000  # image pairs sampled per concept (cross-image)
    causal_images: int = 32  # images naming the concept, per concept
    causal_modes: tuple = ("zero", "noise")
    sigma: float = 10.0  # noise std, in units of the RMS entry of the output projections
    batch_size: int = 16
    metrics: tuple = ALL

    def validate(self) -> None:
        if self.n < 1 or self.k < 1 or self.random_sets < 1:
            raise MMNError("n, k and random_sets must be at least 1")
        for name, flag in (("batch_size", "--batch-size"), ("causal_images", "--causal-images"),
                           ("max_concepts", "--max-concepts")):
            value = getattr(self, name)
            if value is None and name == "max_concepts":  # None: every concept
                continue
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise MMNError(f"{name} ({flag}) must be an integer of at least 1, got {value!r}")
        if self.max_images is not None and (not isinstance(self.max_images, (int, np.integer)) or self.max_images < 0):
            raise MMNError(f"max_images (--max-images) must be at least 0 (0 or None: every record), "
                           f"got {self.max_images!r}")
        bad = set(self.metrics) - set(ALL)
        if bad:
            raise MMNError(f"unknown metric(s) {sorted(bad)}: choose from {', '.join(ALL)}")
        bad = set(self.causal_modes) - {"zero", "noise"}
        if bad:
            raise MMNError(f"unknown causal mode(s) {sorted(bad)}: use zero and/or noise")


# ----------------------------------------------------------------------------------- measures
def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def rbo(a, b, p: float = 0.9) -> float:
    """Rank-biased overlap of two rankings truncated at depth D = max(len): (1-p)/(1-p^D) sum_d p^(d-1) A_d,
    A_d = |a[:d] & b[:d]| / d; 1 for identical rankings, 0 for disjoint ones."""
    a, b = [tuple(x) for x in a], [tuple(x) for x in b]
    depth = max(len(a), len(b))
    if depth == 0:
        return 1.0
    sa, sb, total = set(), set(), 0.0
    for d in range(1, depth + 1):
        if d <= len(a):
            sa.add(a[d - 1])
        if d <= len(b):
            sb.add(b[d - 1])
        total += p ** (d - 1) * len(sa & sb) / d
    return (1 - p) / (1 - p ** depth) * total


def auroc(pos, neg) -> float | None:
    """P(score of a positive > score of a negative) + 0.5 P(tie) (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return None
    x = np.concatenate([pos, neg])
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):  # average ranks over ties
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _norm_token(s: str) -> str:
    return s.replace("\u2581", " ").replace("\u0120", " ").replace("##", "").strip().lower()


# ----------------------------------------------------------------------------------- shuffle
@contextlib.contextmanager
def shuffled_image_tokens(engine, seed: int = 0):
    """Inside the block every forward pass permutes each row's image-token embeddings among its image
    positions (seeded, a new permutation per row and call): the paper's shuffle experiment."""
    ad, state = engine.adapter, {}
    gen = torch.Generator().manual_seed(seed)

    def top_hook(_m, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["mask"] = None if ids is None else (ids == ad.image_token_id)

    def lm_hook(_m, args, kwargs):
        e, mask = kwargs.get("inputs_embeds"), state.get("mask")
        if e is None or mask is None or tuple(mask.shape) != tuple(e.shape[:2]) or not bool(mask.any()):
            return None
        e = e.clone()
        for b in range(e.shape[0]):
            pos = mask[b].nonzero()[:, 0].to(e.device)
            e[b, pos] = e[b, pos[torch.randperm(len(pos), generator=gen).to(e.device)]]
        return args, dict(kwargs, inputs_embeds=e)

    handles = [engine.model.register_forward_pre_hook(top_hook, with_kwargs=True),
               language_model(engine).register_forward_pre_hook(lm_hook, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------- inputs
def _load_images(records: list[dict], images=None) -> list:
    if images is None:
        out = []
        for r in records:
            try:
                out.append(load_image(r["image"]))
            except MMNError as e:
                raise MMNError(f"{e} (record '{r['id']}'); pass --images with the corpus the run read") from None
        return out
    corpus = open_corpus(images)
    want, found = {r["id"] for r in records}, {}
    for s in iter_samples(corpus, list(range(corpus.n_shards))):
        if s.key in want and s.error is None:
            found[s.key] = s.image
    missing = [r["id"] for r in records if r["id"] not in found]
    if missing:
        raise MMNError(f"{len(missing)} images of the run are not in {images} (first: '{missing[0]}')")
    return [found[r["id"]] for r in records]


def _first(rec: dict) -> dict[str, dict]:
    """word -> its first-occurrence concept entry in a record."""
    out = {}
    for c in rec["concepts"]:
        out.setdefault(c["word"].lower(), c)
    return out


# ----------------------------------------------------------------------------------- metrics
def compute_metrics(engine, results_dir, images=None, progress: bool = False, **options) -> dict:
    """Every metric of `options.metrics` for the run in `results_dir`; returns the metrics.json object.
    progress: log each metric's seconds when it is done (logger `mmn_fast.explain.metrics`, level INFO)."""
    engine.adapter.require_dense("mmn metrics (the paper's properties, over [layer, index] neurons)")
    opts = MetricOptions(**options)
    opts.validate()
    res = open_results(results_dir)
    mismatch = check_run_model(res, engine, "the metrics")
    run_opts = dict(res.run.get("options", {}))
    prompt, prefix = run_opts.get("prompt", DEFAULT_PROMPT), run_opts.get("prefix")
    activation = run_opts.get("activation", "down_proj_input")
    records = []
    for rec in res:
        records.append(rec)
        if opts.max_images and len(records) >= opts.max_images:
            break
    if not records:
        raise MMNError(f"'{results_dir}' has no result records")
    counts = res.concepts
    if opts.concepts:
        missing = [w for w in opts.concepts if w.lower() not in counts]
        if missing:
            raise MMNError(f"concept(s) {missing} not in the run; it has {', '.join(list(counts)[:12])}")
        words = [w.lower() for w in opts.concepts]
    else:
        ranked = sorted(counts.items(), key=lambda x: (-x[1], x[0]))
        words = [w for w, c in ranked if c >= opts.min_images][: opts.max_concepts]
        left_out = {"fewer_images": sorted(w for w, c in ranked if c < opts.min_images),
                    "past_max_concepts": [w for w, c in ranked if c >= opts.min_images][opts.max_concepts:]}
    if not words:
        raise MMNError(f"no concept of the run names at least {opts.min_images} images; lower --min-images")
    firsts = [_first(r) for r in records]
    tokens = {}
    for w in words:
        ids = Counter(f[w]["token_id"] for f in firsts if w in f)
        tokens[w] = ids.most_common(1)[0][0] if ids else word_token(engine.tokenizer, w)
    tops = {w: res.top_neurons(w, opts.n) for w in words}
    top = {w: [(n["layer"], n["index"]) for n in tops[w]] for w in words}
    rand_sets = [random_neurons(engine, opts.n, seed=opts.seed + r) for r in range(opts.random_sets)]
    out = {"format_version": FORMAT_VERSION, "results_dir": str(results_dir),
           "model": model_name(engine), "weight_fingerprint": engine.fingerprint,  # what computed the metrics
           "run": {"model": res.run.get("model"), "weight_fingerprint": run_fingerprint(res),  # what they belong to
                   "images": (res.run.get("totals") or {}).get("images"),
                   "ids_sha1": ids_digest(r["id"] for r in records)},
           "options": asdict(opts), "run_options": run_opts, "records": len(records), "concepts": {}, "seconds": {},
           "left_out": {} if opts.concepts else left_out}  # concepts of the run not measured, and why
    if mismatch:
        out["warning"] = mismatch
    per = out["concepts"]
    for w in words:
        per[w] = {"images": sum(w in f for f in firsts), "token_id": int(tokens[w]), "neurons": [list(x) for x in top[w]]}
    pil = None
    if {"specificity", "region", "causal"} & set(opts.metrics):
        pil = _load_images(records, images)
    ctx = dict(engine=engine, opts=opts, records=records, firsts=firsts, words=words, tokens=tokens, top=top,
               top_scores={w: [n["mean_score"] for n in tops[w]] for w in words}, res=res, rand=rand_sets,
               pil=pil, prompt=prompt, prefix=prefix, activation=activation, run_opts=run_opts)
    base = None
    for name in ALL:
        if name not in opts.metrics:
            continue
        t0 = time.perf_counter()
        if name == "semantic":
            _semantic(ctx, per)
        elif name == "cross_image":
            _cross_image(ctx, per)
        elif name == "specificity":
            base = _traced(ctx)
            _specificity(ctx, base, per)
        elif name == "region":
            _region(ctx, per)
        elif name == "causal":
            _causal(ctx, base, per)
        out["seconds"][name] = round(time.perf_counter() - t0, 3)
        if progress:
            log.info("  %s: %.1fs", name, out["seconds"][name])
    out["summary"] = summarise(per)
    return out


def _semantic(ctx, per) -> None:
    """Each neuron's k promoted tokens given the sign of its activation at the concept (docs/metrics.md)."""
    engine, opts = ctx["engine"], ctx["opts"]
    tok = engine.tokenizer
    fold = bool(ctx["run_opts"].get("fold_final_norm"))
    union = list(dict.fromkeys([n for w in ctx["words"] for n in ctx["top"][w]] + [n for s in ctx["rand"] for n in s]))
    with torch.no_grad():
        ends = neuron_ends(engine, output_vectors(engine, union), opts.k)  # [N, k] each end
        emb = engine.model.get_input_embeddings().weight.detach()  # rows cast to fp32 when used
    sides = {n: (ends.top_ids[j].tolist(), ends.bottom_ids[j].tolist()) for j, n in enumerate(union)}

    def one(word, toks):
        t = ctx["tokens"][word]
        e = emb[t].float()
        v = emb[torch.tensor(toks, device=emb.device)].float()  # [k, d]
        hit = any(x == t or _norm_token(s) == word for x, s in zip(toks, tok.convert_ids_to_tokens(toks)))
        return float(hit), float((v @ e / (v.norm(dim=1) * e.norm()).clamp_min(1e-12)).max())

    def measure(word, neurons, signs):
        """signs: +1 / -1 per neuron (its promoted end), 0 where unknown (both ends, each weighing half)."""
        hits, coss = [], []
        for n, s in zip(neurons, signs):
            got = [one(word, toks) for toks in ([sides[n][0]] if s > 0 else [sides[n][1]] if s < 0 else sides[n])]
            hits.append(_mean([h for h, _ in got]))
            coss.append(_mean([c for _, c in got]))
        return {"hit_rate": _mean(hits), "cosine": _mean(coss)}

    for w in ctx["words"]:
        t, top = ctx["tokens"][w], ctx["top"][w]
        signs = activation_signs(engine, t, top, ctx["top_scores"][w], fold)
        rand_signs, source = _random_signs(ctx, w, fold)
        rnd = [measure(w, s, g) for s, g in zip(ctx["rand"], rand_signs)]
        key = [f"{l}.{i}" for l, i in top]
        per[w]["semantic"] = {
            "top": measure(w, top, signs),
            "random": {k: _mean([r[k] for r in rnd]) for k in ("hit_rate", "cosine")},
            "top_tokens": {q: tok.convert_ids_to_tokens(sides[n][0]) for q, n in zip(key, top)},  # W_U W_out's top
            "signs": dict(zip(key, signs)),  # of each neuron's activation at the concept
            "promoted_tokens": {q: tok.convert_ids_to_tokens(sides[n][0 if s > 0 else 1])
                                for q, n, s in zip(key, top, signs)},
            "random_signs": source}


def _random_signs(ctx, word, fold) -> tuple[list[list[int]], str]:
    """Per random set, each neuron's activation sign at the concept from a dense run's mean scores over
    the images naming it ("run"); a sparse run keeps no statistics of them: 0s ("both ends")."""
    try:
        means = ctx["res"].mean_scores(word)  # [L, F]
    except MMNError:
        return [[0] * len(s) for s in ctx["rand"]], "both ends"
    return [activation_signs(ctx["engine"], ctx["tokens"][word], s, [float(means[l, i]) for l, i in s], fold)
            for s in ctx["rand"]], "run"


def _pairs(rng, xs, ys, same: bool, limit: int):
    if same:
        allp = [(xs[a], xs[b]) for a in range(len(xs)) for b in range(a + 1, len(xs))] if len(xs) <= 64 else None
    else:
        allp = [(x, y) for x in xs for y in ys] if len(xs) * len(ys) <= limit else None
    if allp is not None:
        return allp if len(allp) <= limit else rng.sample(allp, limit)
    out = []
    while len(out) < limit:
        a = rng.choice(xs)
        b = rng.choice(xs if same else ys)
        if a != b:
            out.append((a, b))
    return out


def _cross_image(ctx, per) -> None:
    opts, firsts = ctx["opts"], ctx["firsts"]
    rng = random.Random(opts.seed)
    n, p = opts.n, opts.rbo_p
    lists = [{w: [tuple(x[:2]) for x in c["neurons"][:n]] for w, c in f.items()} for f in firsts]
    chance = [(random_neurons(ctx["engine"], n, seed=10_000 + 2 * r), random_neurons(ctx["engine"], n, seed=10_001 + 2 * r))
              for r in range(50)]
    chance_j = _mean([jaccard(a, b) for a, b in chance])
    for w in ctx["words"]:
        have = [i for i, f in enumerate(firsts) if w in f]
        lack = [i for i, f in enumerate(firsts) if w not in f and f]
        within = _pairs(rng, have, lack, True, opts.max_pairs) if len(have) > 1 else []
        across = _pairs(rng, have, lack, False, opts.max_pairs) if have and lack else []
        wj = [jaccard(lists[a][w], lists[b][w]) for a, b in within]
        wr = [rbo(lists[a][w], lists[b][w], p) for a, b in within]
        aj, ar = [], []
        for a, b in across:
            other = rng.choice(sorted(lists[b]))
            aj.append(jaccard(lists[a][w], lists[b][other]))
            ar.append(rbo(lists[a][w], lists[b][other], p))
        per[w]["cross_image"] = {"within": {"jaccard": _mean(wj), "rbo": _mean(wr), "pairs": len(within)},
                                 "across": {"jaccard": _mean(aj), "rbo": _mean(ar), "pairs": len(across)},
                                 "chance": {"jaccard": chance_j}}


@dataclass
class _Base:
    """Per record, from one teacher-forced pass: oriented responses and caption-token probabilities."""
    neurons: list
    cap_max: np.ndarray  # [R, N] max over caption positions of the activation
    cap_min: np.ndarray  # [R, N]
    img_mean: np.ndarray  # [R, N] mean over image tokens
    probs: list = field(default_factory=list)  # per record: [S] caption-token probabilities


def _traced(ctx) -> _Base:
    opts, recs = ctx["opts"], ctx["records"]
    union = list(dict.fromkeys([n for w in ctx["words"] for n in ctx["top"][w]] + [n for s in ctx["rand"] for n in s]))
    cmax, cmin, imean, probs = [], [], [], []
    for s in range(0, len(recs), opts.batch_size):
        part = recs[s : s + opts.batch_size]
        caps = [r["output_ids"] or [ctx["engine"].tokenizer.eos_token_id or 0] for r in part]
        t = trace(ctx["engine"], ctx["pil"][s : s + opts.batch_size], union, caps, ctx["prompt"], ctx["prefix"],
                  ctx["activation"], probs=True)
        for b, c in enumerate(caps):
            rows = t.acts[b, t.index[b, : len(c)]]  # [S_b, N]
            cmax.append(rows.max(0).values.numpy())
            cmin.append(rows.min(0).values.numpy())
            imean.append(t.image_rows(b).mean(0).numpy())
            probs.append(t.token_probs[b, : len(c)].tolist())
    return _Base(union, np.stack(cmax), np.stack(cmin), np.stack(imean), probs)


def _specificity(ctx, base: _Base, per) -> None:
    col = {n: j for j, n in enumerate(base.neurons)}
    for w in ctx["words"]:
        labels = np.array([w in f for f in ctx["firsts"]])

        def measure(neurons):
            a_cap, a_img = [], []
            for n, s in zip(neurons, concept_signs(ctx["engine"], ctx["tokens"][w], neurons)):
                j = col[n]
                resp = base.cap_max[:, j] if s > 0 else -base.cap_min[:, j]
                a_cap.append(auroc(resp[labels], resp[~labels]))
                img = s * base.img_mean[:, j]
                a_img.append(auroc(img[labels], img[~labels]))
            return {"auroc": _mean(a_cap), "auroc_image": _mean(a_img)}

        rnd = [measure(r) for r in ctx["rand"]]
        per[w]["specificity"] = {"top": measure(ctx["top"][w]),
                                 "random": {k: _mean([r[k] for r in rnd]) for k in ("auroc", "auroc_image")},
                                 "positives": int(labels.sum()), "negatives": int((~labels).sum())}


def _region(ctx, per) -> None:
    engine, opts, recs, words = ctx["engine"], ctx["opts"], ctx["records"], ctx["words"]
    keep = [i for i, f in enumerate(ctx["firsts"]) if any(w in f for w in words)]
    ro = ctx["run_opts"]
    kw = {k: ro[k] for k in ("activation", "fold_final_norm", "positions", "reduce", "method") if k in ro}
    # the run's lists hold its top_k neurons only: compare both rankings at the same depth m
    m = min(opts.n, int(ro["top_k"])) if ro.get("top_k") else opts.n
    shuffled = {}
    with shuffled_image_tokens(engine, opts.seed):
        found = engine.iter_find([ctx["pil"][i] for i in keep], captions=[recs[i]["output_ids"] for i in keep],
                                 ids=[str(i) for i in keep], concepts=list(words), top_k=m,
                                 prompt=ctx["prompt"], prefix=ctx["prefix"], batch_size=opts.batch_size, **kw)
        for r in found:
            shuffled[int(r.id)] = _first({"concepts": [c.__dict__ for c in r.concepts]})
    rng = random.Random(opts.seed + 1)
    ad = engine.adapter
    for w in words:
        js, rs, cj, cr = [], [], [], []
        for i in keep:
            if w not in ctx["firsts"][i] or w not in shuffled.get(i, {}):
                continue
            a = [tuple(x[:2]) for x in ctx["firsts"][i][w]["neurons"][:m]]
            b = [tuple(x[:2]) for x in shuffled[i][w]["neurons"][:m]]
            js.append(jaccard(a, b))
            rs.append(rbo(a, b, opts.rbo_p))
            flat = rng.sample(range(ad.n_layers * ad.d_mlp), len(a))
            c = [(f // ad.d_mlp, f % ad.d_mlp) for f in flat]
            cj.append(jaccard(a, c))
            cr.append(rbo(a, c, opts.rbo_p))
        per[w]["region"] = {"top": {"jaccard": _mean(js), "rbo": _mean(rs), "images": len(js), "depth": m},
                            "random": {"jaccard": _mean(cj), "rbo": _mean(cr)}}


def _causal(ctx, base: _Base | None, per) -> None:
    engine, opts, recs = ctx["engine"], ctx["opts"], ctx["records"]
    ad = engine.adapter
    max_new = int(ctx["run_opts"].get("max_new_tokens", 32))
    with torch.no_grad():
        sq = sum(float(ad.out_weight(l).float().pow(2).sum()) for l in range(ad.n_layers))
        rms = (sq / (ad.n_layers * ad.out_weight(0).numel())) ** 0.5
    for w in ctx["words"]:
        idx = [i for i, f in enumerate(ctx["firsts"]) if w in f and names(recs[i]["caption"], w)][: opts.causal_images]
        if not idx:
            continue
        imgs = [ctx["pil"][i] for i in idx]
        caps = [recs[i]["output_ids"] for i in idx]
        steps = [ctx["firsts"][i][w]["step"] for i in idx]
        if base is not None:
            p0 = [base.probs[i][s] for i, s in zip(idx, steps)]
        else:
            p0 = _step_probs(ctx, imgs, caps, steps)
        entry = {"images": len(idx), "sigma_abs": opts.sigma * rms}
        for mode in opts.causal_modes:
            def run(neurons, seed):
                patch = (suppress(engine, neurons, 0.0, source=w) if mode == "zero"
                         else perturb(engine, neurons, opts.sigma * rms, seed=seed, source=w))
                with engine.patched(patch):
                    new = engine.caption(imgs, ctx["prompt"], ctx["prefix"], max_new, opts.batch_size)
                    p1 = _step_probs(ctx, imgs, caps, steps)
                return {"disappear": _mean([float(not names(c, w)) for c in new]),
                        "changed": _mean([float(c != recs[i]["caption"]) for c, i in zip(new, idx)]),
                        "prob_drop": _mean([a - b for a, b in zip(p0, p1)])}

            top = run(ctx["top"][w], opts.seed)
            rnd = [run(s, opts.seed + 1 + r) for r, s in enumerate(ctx["rand"])]
            entry[mode] = {"top": top, "random": {k: _mean([r[k] for r in rnd]) for k in top}}
        per[w]["causal"] = entry


def _step_probs(ctx, imgs, caps, steps) -> list[float]:
    out, bs = [], ctx["opts"].batch_size
    for s in range(0, len(imgs), bs):
        t = trace(ctx["engine"], imgs[s : s + bs], [], caps[s : s + bs], ctx["prompt"], ctx["prefix"],
                  ctx["activation"], probs=True)
        out += [float(t.token_probs[b, st]) for b, st in enumerate(steps[s : s + bs])]
    return out


# ----------------------------------------------------------------------------------- summary
def _rows():
    """(key, label, path to the top-n value, path to the control value) of each summary row."""
    top_rnd, rows = ("top", "random"), []
    for key, label, head, pair, field_ in (
            ("semantic_hit_rate", "semantic: concept among top-k tokens", ("semantic",), top_rnd, "hit_rate"),
            ("semantic_cosine", "semantic: best cosine to concept", ("semantic",), top_rnd, "cosine"),
            ("region_jaccard", "region: Jaccard shuffled vs in order", ("region",), top_rnd, "jaccard"),
            ("region_rbo", "region: RBO shuffled vs in order", ("region",), top_rnd, "rbo"),
            ("cross_image_jaccard", "cross-image: Jaccard same vs other concept", ("cross_image",),
             ("within", "across"), "jaccard"),
            ("cross_image_rbo", "cross-image: RBO same vs other concept", ("cross_image",), ("within", "across"), "rbo"),
            ("specificity_auroc", "specificity: AUROC (caption positions)", ("specificity",), top_rnd, "auroc"),
            ("specificity_auroc_image", "specificity: AUROC (image tokens)", ("specificity",), top_rnd, "auroc_image"),
            ("causal_zero_disappear", "causal zero: concept disappears", ("causal", "zero"), top_rnd, "disappear"),
            ("causal_zero_prob_drop", "causal zero: probability drop", ("causal", "zero"), top_rnd, "prob_drop"),
            ("causal_noise_disappear", "causal noise: concept disappears", ("causal", "noise"), top_rnd, "disappear"),
            ("causal_noise_prob_drop", "causal noise: probability drop", ("causal", "noise"), top_rnd, "prob_drop")):
        rows.append((key, label, (*head, pair[0], field_), (*head, pair[1], field_)))
    return rows


SUMMARY_ROWS = _rows()


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarise(per: dict) -> dict:
    """key -> {"label", "top", "random"}: each metric's mean over the concepts that have it."""
    out = {}
    for key, label, tp, rp in SUMMARY_ROWS:
        top = _mean([_get(v, tp) for v in per.values()])
        if top is not None:
            out[key] = {"label": label, "top": top, "random": _mean([_get(v, rp) for v in per.values()])}
    return out


def summary_table(metrics: dict) -> str:
    def f(v):
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f"{'metric':<44} {'top-n':>6} {'random':>6}"]
    for row in metrics.get("summary", {}).values():
        lines.append(f"{row['label']:<44} {f(row['top'])} {f(row['random'])}")
    return "\n".join(lines)
