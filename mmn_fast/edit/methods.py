"""Editing multi-modal neurons: pick the neurons of a concept, give them new output vectors, get a Patch.

Every method changes only the output vectors W_out^l[:, i] of the selected neurons (docs/editing.md):

- suppress: w' = scale * w (scale 0 silences the neurons' direct and indirect effects).
- swap (closed form): the minimal change of w (it lies in span{u_s, u_t}) that moves `strength` times
  the neuron's direct logit contribution from the source token to the target token
  (u = the unembedding rows scaled by the final norm's weight).
- optimize: w' = w + delta, delta learned with Adam on the edit images: target-word NLL + KL to the
  unedited model's next-token distributions at every other caption position + an L2 penalty.
- perturb: w' = w + sigma * N(0, I), the paper's causal-effect probe (with random neurons: its control).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT
from ..model.patch_file import DENSE, Patch, gather_rows, make_patch
from ..run.aggregate import ConceptAggregator, open_results
from ..run.runinfo import check_run_model

Neuron = tuple  # (layer, index); in models with mixture-of-experts layers (layer, expert, index), expert -1 dense


# -------------------------------------------------------------------------------------- selection
def _unit_size(ad, layer: int, expert: int) -> int:
    """Neurons of the unit (layer, expert); 0 when the model has no such unit."""
    try:
        return int(ad.unit_weight(layer, expert).shape[1])
    except MMNError:
        return 0


def _usable(engine, neurons, exclude_layers) -> list[Neuron]:
    ad, skip = engine.adapter, set(exclude_layers or ())
    out = []
    for n in neurons:
        n = tuple(int(x) for x in n)
        layer, expert, index = (n[0], DENSE, n[1]) if len(n) == 2 else n
        if layer not in skip and 0 <= index < _unit_size(ad, layer, expert):
            out.append(n)
    return out


def concept_neurons(engine, source: str, n: int, results=None, images=None, exclude_layers=(),
                    prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 32, batch_size: int = 8) -> list[Neuron]:
    """The top-n neurons of `source`: from a find results directory (its corpus aggregate,
    concepts.json), from a list of ImageResult, or by running find on `images`."""
    word = source.lower()
    if results is not None and isinstance(results, (str, Path)):
        if (Path(results) / "run.json").is_file():  # the run's neuron indices must be this model's
            check_run_model(open_results(results), engine, "the edit")
        path = Path(results) / "concepts.json"
        try:
            concepts = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MMNError(f"cannot read '{path}' ({e}); give the output directory of `mmn find`") from None
        if word not in concepts:
            raise MMNError(f"concept '{source}' is not in {path}; it names {', '.join(list(concepts)[:10])}")
        ranked = [_ranked(c) for c in concepts[word]["neurons"]]
    else:
        if results is None:
            if images is None:
                raise MMNError("give results (a find output directory or ImageResults) or images to select neurons")
            results = engine.find(images, concepts=[word], top_k=max(50, 2 * n), prompt=prompt,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
        agg = ConceptAggregator()
        for r in results:
            agg.add(r)
        summary = agg.summary(top_n=10 ** 9)
        if word not in summary:
            raise MMNError(f"no caption names '{source}': the model does not say it on these images")
        ranked = [_ranked(c) for c in summary[word]["neurons"]]
    picked = _usable(engine, ranked, exclude_layers)[:n]
    if len(picked) < n:
        raise MMNError(f"only {len(picked)} neurons of '{source}' are ranked (after layer exclusions), {n} asked; "
                       "run find with a larger --top-k or ask for fewer neurons")
    return picked


def _ranked(c: dict) -> Neuron:
    """A concepts.json / summary neuron as a tuple: (layer, index), or (layer, expert, index)."""
    return (c["layer"], c["expert"], c["index"]) if "expert" in c else (c["layer"], c["index"])


def random_neurons(engine, n: int, exclude_layers=(), seed: int = 0) -> list[Neuron]:
    """n neurons drawn uniformly without replacement (the control of the causal-effect test); in a model
    with mixture-of-experts layers, from every expert's neurons too, as (layer, expert, index)."""
    ad, skip = engine.adapter, set(exclude_layers or ())
    units = [(l, e, _unit_size(ad, l, e)) for l, e in ad.units() if l not in skip]
    total = sum(size for *_, size in units)
    if n > total:
        raise MMNError(f"{n} random neurons asked, {total} available")
    picked = []
    for k in random.Random(seed).sample(range(total), n):  # flat over the units, in order
        for l, e, size in units:
            if k < size:
                picked.append((l, e, k) if ad.is_moe else (l, k))
                break
            k -= size
    return sorted(picked)


def _by_unit(neurons) -> dict:
    """{layer (dense) or (layer, expert): neuron indices [n]}: make_patch's keys."""
    out: dict = {}
    for n in sorted({tuple(int(x) for x in n) for n in neurons}):
        key = n[0] if len(n) == 2 or n[1] == DENSE else (n[0], n[1])
        out.setdefault(key, []).append(n[-1])
    return {k: torch.tensor(ix, dtype=torch.int64) for k, ix in out.items()}


def _rows(engine, neurons) -> dict:
    """{layer or (layer, expert): (idx [n], current output vectors [n, d] on CPU)}."""
    ad = engine.adapter
    return {k: (idx, gather_rows(ad.unit_weight(*(k if isinstance(k, tuple) else (k,))), idx).cpu())
            for k, idx in _by_unit(neurons).items()}


def word_token(tokenizer, word: str) -> int:
    """Id of the first sub-token of `word` as it appears inside a caption ("a <word>")."""
    try:
        enc = tokenizer("a " + word, add_special_tokens=False, return_offsets_mapping=True)
        ids = [t for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if e > 2]
    except (NotImplementedError, KeyError, TypeError):  # slow tokenizer: no offsets
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise MMNError(f"the tokenizer does not know the word '{word}'")
    return ids[0]


def _patch(engine, rows: dict, method: str, concepts: dict, params: dict) -> Patch:
    return make_patch(engine.adapter, rows, method, concepts, params, source=engine.source)


# ---------------------------------------------------------------------------------------- methods
def suppress(engine, neurons, scale: float = 0.0, source: str | None = None) -> Patch:
    """w' = scale * w for each selected neuron."""
    rows = {l: (idx, v * scale) for l, (idx, v) in _rows(engine, neurons).items()}
    return _patch(engine, rows, "suppress", {"source": source}, {"scale": scale, "neurons": len(neurons)})


def perturb(engine, neurons, sigma: float, seed: int = 0, source: str | None = None) -> Patch:
    """w' = w + sigma * N(0, I) (absolute sigma, in weight units; seeded)."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for l, (idx, v) in _rows(engine, neurons).items():
        noise = torch.randn(tuple(v.shape), generator=gen, dtype=torch.float32)  # [n, d]
        rows[l] = (idx, (v.float().cpu() + sigma * noise).to(v.dtype))
    return _patch(engine, rows, "perturb", {"source": source}, {"sigma": sigma, "seed": seed, "neurons": len(neurons)})


def unembed_directions(engine, tokens: list[int]) -> torch.Tensor:
    """[d, K] float64: the unembedding rows as the residual stream sees them (times the final
    RMSNorm/LayerNorm scale, the direct-logit direction)."""
    ad = engine.adapter
    w_u = ad.unembed_weight().detach()
    rows = w_u[torch.tensor(tokens, device=w_u.device)].double()  # [K, d]
    if ad.final_norm is not None and ad.norm_weight() is not None:
        rows = rows * ad.norm_weight().double().to(rows.device)
    return rows.t().cpu()


def swap(engine, neurons, source: str, target: str, strength: float = 1.0) -> Patch:
    """Closed form. With U = [u_s, u_t] ([d, 2]) and c = U^T w = (c_s, c_t) (the neuron's direct
    contributions to the source and target logits per unit of activation),
    w' = w + U (U^T U)^+ (y - c) with y = ((1 - strength) c_s, c_t + strength c_s): the
    smallest change after which U^T w' = y (strength 1 moves the whole source contribution)."""
    tok = engine.tokenizer
    s_id, t_id = word_token(tok, source), word_token(tok, target)
    if s_id == t_id:  # the edit would move a logit onto itself: no change at all
        raise MMNError(f"'{source}' and '{target}' start with the same token ({tok.convert_ids_to_tokens(s_id)!r}): "
                       "swap edits first sub-tokens, so it cannot tell them apart; use --method optimize")
    u = unembed_directions(engine, [s_id, t_id])  # [d, 2]
    g_inv = torch.linalg.pinv(u.t() @ u)  # [2, 2]
    rows = {}
    for l, (idx, v) in _rows(engine, neurons).items():
        w = v.double().cpu()  # [n, d]
        c = w @ u  # [n, 2]
        y = torch.stack([(1 - strength) * c[:, 0], c[:, 1] + strength * c[:, 0]], dim=1)  # [n, 2]
        rows[l] = (idx, (w + (y - c) @ g_inv @ u.t()).to(v.dtype))
    return _patch(engine, rows, "swap", {"source": source, "target": target},
                  {"strength": strength, "source_token": s_id, "target_token": t_id, "neurons": len(neurons)})


def replace_word(caption: str, source: str, target: str) -> str:
    """Every whole-word `source` (any case) replaced by `target` in the case of the word it
    replaces: "Red apples" -> "Blue apples", "RED" -> "BLUE", "red" -> "blue"."""
    def cased(m: re.Match) -> str:
        word = m.group(0)
        if len(word) > 1 and word.isupper():
            return target.upper()
        if word[:1].isupper():
            return target[:1].upper() + target[1:]
        return target

    return re.sub(rf"\b{re.escape(source)}\b", cased, caption, flags=re.IGNORECASE)


def names(caption: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", caption, flags=re.IGNORECASE) is not None


def _sequences(engine, captions: list[str], source: str, target: str):
    """Caption ids (+ EOS) of the edited captions, and per caption the token steps of the target word."""
    tok, eos = engine.tokenizer, engine.tokenizer.eos_token_id
    ids, steps = [], []
    for cap in captions:
        text = replace_word(cap, source, target) if names(cap, source) else cap
        spans = [m.span() for m in re.finditer(rf"\b{re.escape(target)}\b", text, flags=re.IGNORECASE)] \
            if names(cap, source) else []
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(list(enc["input_ids"]) + ([eos] if eos is not None else []))
        steps.append([j for j, (s, e) in enumerate(enc["offset_mapping"]) if any(s < b and e > a for a, b in spans)])
    return ids, steps


@dataclass
class OptimizeOptions:
    """The settings of `optimize`. lr is relative: in units of the RMS entry of the selected vectors
    (so it transfers across model sizes); l2_weight multiplies sum ||delta||^2 / sum ||w||^2 over the
    selected neurons; training stops early once the target word's first token leads every other
    token by `margin` logits at every edited position, else after `steps` Adam steps."""

    steps: int = 50
    lr: float = 0.1
    kl_weight: float = 1.0
    l2_weight: float = 0.01
    margin: float = 2.0
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 32  # of the captions made when none are given


@dataclass
class _EditBatch:
    """The edit images teacher-forced on their edited captions, and the caption positions each loss term reads."""

    full: dict  # model inputs: prompt and caption
    index: torch.Tensor  # [B, S] positions predicting caption tokens
    cap: torch.Tensor  # [B, S] caption token ids (0 past a caption's end)
    is_t: torch.Tensor  # [B, S] bool: tokens of the target word (the NLL term)
    keep: torch.Tensor  # [B, S] bool: every other caption token (the KL term)


def optimize(engine, neurons, source: str, target: str, images, *, captions: list[str] | None = None,
             options: OptimizeOptions | None = None, **settings) -> Patch:
    """Learn delta [n, d] per selected layer with Adam (see `OptimizeOptions`; its fields may also be
    given as keywords: `optimize(engine, neurons, "red", "blue", images, steps=20)`).

    images: the edit images; those whose caption (`captions`, else made now) names `source` give
    the NLL term, all give the KL term.
    """
    opts = replace(options or OptimizeOptions(), **settings)
    experts = [k for k in _by_unit(neurons) if isinstance(k, tuple)]
    if experts:
        raise MMNError(f"method 'optimize' learns edits of dense layers' neurons only; {len(experts)} unit(s) of the "
                       f"selection are experts of mixture-of-experts layers ({experts[:3]} as (layer, expert)): use "
                       "method 'swap' or 'suppress' for them, or leave those neurons out")
    images = list(images)
    captions = captions if captions is not None else engine.caption(images, opts.prompt,
                                                                    max_new_tokens=opts.max_new_tokens)
    if not any(names(c, source) for c in captions):
        raise MMNError(f"no caption of the edit images names '{source}'")
    seqs, tsteps = _sequences(engine, captions, source, target)
    if not any(tsteps):
        raise MMNError(f"cannot locate the tokens of '{target}' in the edited captions")
    rows = _rows(engine, neurons)
    deltas, done = _learn_deltas(engine, rows, _edit_batch(engine, images, seqs, tsteps, opts.prompt), opts)
    new = {l: (idx, (v.float() + deltas[l].detach().cpu()).to(v.dtype)) for l, (idx, v) in rows.items()}
    params = {"steps": done, "max_steps": opts.steps, "lr": opts.lr, "kl_weight": opts.kl_weight,
              "l2_weight": opts.l2_weight, "margin": opts.margin, "n_images": len(images),
              "n_edit": int(sum(1 for s in tsteps if s)), "neurons": len(neurons), "prompt": opts.prompt}
    return _patch(engine, new, "optimize", {"source": source, "target": target}, params)


def _edit_batch(engine, images: list, seqs: list[list[int]], tsteps: list[list[int]], prompt: str) -> _EditBatch:
    inputs = engine.encode(images, prompt, None)
    full, index = engine.teacher_forced(inputs, seqs)  # index [B, S]: positions predicting caption tokens
    lengths = torch.tensor([len(s) for s in seqs])
    valid = torch.arange(index.shape[1])[None, :] < lengths[:, None]  # [B, S]
    is_t = torch.zeros_like(valid)
    for b, st in enumerate(tsteps):
        is_t[b, st] = True
    cap = torch.tensor([s + [0] * (index.shape[1] - len(s)) for s in seqs])  # [B, S]
    return _EditBatch(full, index, cap, is_t, valid & ~is_t)


def _learn_deltas(engine, rows: dict, batch: _EditBatch, opts: OptimizeOptions) -> tuple[dict, int]:
    """{layer: delta [n, d] fp32 on the layer's device} learned with the model frozen and its swap
    lock held (forward hooks add them to the output projections), and the number of steps taken."""
    ad, model = engine.adapter, engine.model
    ref = torch.cat([v for _, v in rows.values()]).float()  # [n, d] on CPU
    scale, ref_sq = float(ref.pow(2).mean().sqrt()) or 1.0, float(ref.pow(2).sum()) or 1.0
    deltas = {l: torch.zeros(tuple(v.shape), device=ad.out_weight(l).device, requires_grad=True)
              for l, (_, v) in rows.items()}  # [n, d] fp32
    opt = torch.optim.Adam(list(deltas.values()), lr=opts.lr * scale)
    full, index = batch.full, batch.index

    def logprobs():  # [B, S, V] fp32 at the caption positions, on the logits' device
        logits = model(**full, use_cache=False).logits
        at = index.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1])
        return torch.log_softmax(logits.gather(1, at).float(), -1)

    def hook(l, idx):
        def add(h, out):  # out += h[..., idx] @ delta: exactly W_out[:, idx] += delta^T
            return out + (h[..., idx] @ deltas[l].to(out.dtype))
        return add

    flags = [p.requires_grad for p in model.parameters()]
    done = 0
    with engine.swap_lock:
        try:
            model.requires_grad_(False)
            with torch.no_grad():
                ref_lp = logprobs()
            is_t, keep, cap = (t.to(ref_lp.device) for t in (batch.is_t, batch.keep, batch.cap))
            ref_lp = ref_lp[keep]  # [K, V]
            handles = [ad.hook_site(l).register(hook(l, idx.to(ad.out_weight(l).device)), output=True)
                       for l, (idx, _) in rows.items()]
            try:
                for done in range(opts.steps + 1):
                    lp = logprobs()
                    lp_t, want = lp[is_t], cap[is_t][:, None]  # [T, V], [T, 1] at the target-word positions
                    tgt = lp_t.gather(1, want)[:, 0]  # [T]
                    lead = tgt - lp_t.scatter(1, want, float("-inf")).amax(-1)  # [T] over the best other token
                    if done == opts.steps or bool((lead >= opts.margin).all()):
                        break
                    nll = -tgt.mean()
                    kl = (ref_lp.exp() * (ref_lp - lp[keep])).sum(-1).mean() if ref_lp.numel() else 0.0
                    l2 = sum(d.pow(2).sum().to(lp.device) for d in deltas.values()) / ref_sq
                    loss = nll + opts.kl_weight * kl + opts.l2_weight * l2
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            finally:
                for h in handles:
                    h.remove()
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
    return deltas, done


METHODS = ("suppress", "swap", "optimize", "perturb")


def make_edit(engine, method: str, neurons, source: str, target: str | None = None, images=None,
              captions=None, **params) -> Patch:
    """One entry point for the four methods (params: scale | strength | optimize's | sigma, seed)."""
    if method == "suppress":
        return suppress(engine, neurons, scale=params.get("scale", 0.0), source=source)
    if method == "perturb":
        return perturb(engine, neurons, sigma=params.get("sigma", 0.1), seed=params.get("seed", 0), source=source)
    if target is None:
        raise MMNError(f"method '{method}' needs a target word")
    if method == "swap":
        return swap(engine, neurons, source, target, strength=params.get("strength", 1.0))
    if method == "optimize":
        if images is None:
            raise MMNError("method 'optimize' needs edit images")
        keys = {f.name for f in fields(OptimizeOptions)}
        return optimize(engine, neurons, source, target, images, captions=captions,
                        **{k: v for k, v in params.items() if k in keys and v is not None})
    raise MMNError(f"unknown edit method {method!r}; use one of {', '.join(METHODS)}")
