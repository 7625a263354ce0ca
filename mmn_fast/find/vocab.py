"""Neuron vocabulary: the tokens each neuron's output vector promotes.

A neuron adds `a x W_out[:, i]` to the residual stream, so it promotes the top of `W_U W_out[:, i]`
when its activation `a` is positive and the bottom (the most negative entries) when `a` is negative.
Shown for a concept, a neuron's tokens are the end its activation there picks (`activation_signs`,
`promoted_tokens`); shown alone, both ends (`both_ends`).
"""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import MMNError
from ..io import save_safetensors
from ..kernels import VocabTopK, token_projection, vocab_topk

FORMAT_VERSION = "1"


def _check_k(engine, k) -> None:
    v = engine.adapter.unembed_weight().shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= v:
        raise MMNError(f"k must be a whole number of tokens from 1 to the vocabulary size {v}, got {k!r}")


def neuron_topk(engine, w_out: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens of the output vectors w_out [d, N] on the engine's backend (`vocab_topk`: the
    Triton kernel where it takes the weights and k, else the chunked torch walk, `chunk` tokens a
    step). (values, ids) [N, k]."""
    _check_k(engine, k)
    return vocab_topk(w_out, engine.adapter.unembed_weight(), k, backend=engine.backend, chunk=chunk)


def neuron_ends(engine, w_out: torch.Tensor, k: int, chunk: int = 4096) -> VocabTopK:
    """Top-k and bottom-k tokens of the output vectors w_out [d, N] in one pass (`vocab_topk(both=True)`):
    what each neuron promotes when it fires positive (top) and negative (bottom, most negative first)."""
    _check_k(engine, k)
    return vocab_topk(w_out, engine.adapter.unembed_weight(), k, both=True, backend=engine.backend, chunk=chunk)


def _check_neuron(engine, layer: int, index: int) -> None:
    ad = engine.adapter
    if not 0 <= layer < ad.n_layers or not 0 <= index < ad.d_mlp:
        raise MMNError(f"neuron ({layer}, {index}) out of range: layers 0..{ad.n_layers - 1}, "
                       f"neurons 0..{ad.d_mlp - 1}")


def output_vectors(engine, neurons) -> torch.Tensor:
    """Output vectors of neurons [(layer, index)] as [d, N], on W_U's device (layers may sit on others)."""
    ad = engine.adapter
    dev = ad.unembed_weight().device
    for l, i in neurons:
        _check_neuron(engine, int(l), int(i))
    return torch.stack([ad.out_weight(int(l))[:, int(i)].to(dev) for l, i in neurons], 1)  # [d, N]


def top_tokens(engine, layer: int, index: int, k: int = 10) -> list[tuple[str, int, float]]:
    """(token, id, logit) of the k largest entries of W_U W_out[:, index]: what neuron (layer, index)
    promotes when it fires positive (`both_ends` gives the negative side too)."""
    _check_neuron(engine, layer, index)
    with torch.no_grad():
        col = engine.adapter.out_weight(layer)[:, index : index + 1]  # [d, 1]
        values, ids = neuron_topk(engine, col, k)
    toks = engine.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return list(zip(toks, ids[0].tolist(), values[0].tolist()))


def both_ends(engine, layer: int, index: int, k: int = 10, expert: int = -1) -> dict[str, list[tuple[str, int, float]]]:
    """{"positive": top-k, "negative": bottom-k} (token, id, logit) of W_U W_out[:, index]: the tokens
    neuron (layer, index) promotes when it fires positive, and when it fires negative (most negative
    logit first). expert: the neuron's expert in a mixture-of-experts layer (-1: a dense layer's)."""
    w = engine.adapter.unit_weight(layer, expert)  # [d, F]; MMNError for a unit the model does not have
    if not 0 <= index < w.shape[1]:
        raise MMNError(f"neuron index {index} out of range: that unit has neurons 0..{w.shape[1] - 1}")
    with torch.no_grad():
        ends = neuron_ends(engine, w[:, index : index + 1], k)  # [1, k] each
    out = {}
    for side, values, ids in (("positive", ends.top_values, ends.top_ids),
                              ("negative", ends.bottom_values, ends.bottom_ids)):
        out[side] = list(zip(engine.tokenizer.convert_ids_to_tokens(ids[0].tolist()), ids[0].tolist(),
                             values[0].tolist()))
    return out


def activation_signs(engine, token_id: int, neurons, scores, fold_final_norm: bool = False) -> list[int]:
    """The sign (+1 / -1) of each neuron's activation where it was scored for token `token_id`, read off
    the score's factors: score = a x P(t), P(t) = <W_out[:, i], W_U[t]> (through the final norm's scale,
    and centred for a LayerNorm, with `fold_final_norm`, as the run scored), so sign(a) = sign(score) x
    sign(P(t)); +1 where either is 0. neurons: [(layer, index)]; scores: one per neuron (e.g. the
    run's mean score). For --method grad, P(t) is the direct path only."""
    if len(scores) != len(neurons):
        raise MMNError(f"{len(neurons)} neurons but {len(scores)} scores")
    if not neurons:
        return []
    ad = engine.adapter
    with torch.no_grad():
        row = ad.unembed_weight()[int(token_id)][None].float()  # [1, d]
        center = False
        if fold_final_norm and ad.final_norm is not None:
            w = ad.norm_weight()
            row = row * w.to(row.device, row.dtype) if w is not None else row
            center = ad.norm_kind() == "layer"
        proj = token_projection(output_vectors(engine, neurons), row, center)[:, 0]  # [N]
    return [-1 if (s > 0 > p) or (s < 0 < p) else 1 for s, p in zip(map(float, scores), proj.tolist())]


def promoted_ids(engine, neurons, signs, k: int) -> list[list[int]]:
    """Ids of the k tokens each neuron [(layer, index)] promotes given the sign of its activation: the
    top of W_U W_out[:, i] for +1, the bottom (most negative first) for -1."""
    if len(signs) != len(neurons):
        raise MMNError(f"{len(neurons)} neurons but {len(signs)} signs")
    if not neurons:
        return []
    with torch.no_grad():
        ends = neuron_ends(engine, output_vectors(engine, neurons), k)  # [N, k] each
    return [(ends.bottom_ids if s < 0 else ends.top_ids)[j].tolist() for j, s in enumerate(signs)]


def concept_tokens(records, words=None) -> dict[str, int]:
    """word -> the token id a run scored the word at (its first occurrence in the first record naming
    it). records: result records (results.jsonl dicts); with `words`, reading stops once each has one."""
    want = None if words is None else {w.lower() for w in words}
    out: dict[str, int] = {}
    for rec in records:
        for c in rec.get("concepts") or []:
            w = str(c.get("word", "")).lower()
            if (want is None or w in want) and w not in out and isinstance(c.get("token_id"), int):
                out[w] = c["token_id"]
        if want is not None and want <= set(out):
            break
    return out


def promoted_tokens(engine, neurons, signs, k: int) -> list[list[str]]:
    """`promoted_ids` as token strings."""
    return [engine.tokenizer.convert_ids_to_tokens(ids) for ids in promoted_ids(engine, neurons, signs, k)]


def vocab_table(engine, k: int = 10, chunk: int = 4096, cache_dir: str | Path | None = None,
                progress: bool = False, both: bool = False):
    """Every neuron's top-k tokens: (values [L, F, k] fp32, token ids [L, F, k] int64); with both=True a
    VocabTopK of [L, F, k] tensors with the bottom-k too (what each neuron promotes when it fires negative).

    Computed layer by layer over vocabulary chunks (extra memory O(F x chunk), never F x V), and
    cached as safetensors keyed by the weights' fingerprint when `cache_dir` is given (tensors
    `values`, `token_ids`, and `bottom_values`, `bottom_token_ids` once both ends were asked for; a
    file without them is computed again when they are). On the engine's Triton backend (k <= 64) one
    filtering GEMM per layer (`vocab_topk`).
    """
    _check_k(engine, k)
    ad = engine.adapter
    path = Path(cache_dir) / f"vocab-{engine.fingerprint}-k{k}.safetensors" if cache_dir else None
    names = ("values", "token_ids", "bottom_values", "bottom_token_ids")[: 4 if both else 2]
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("fingerprint") == engine.fingerprint and meta.get("k") == str(k)
                    and set(names) <= set(f.keys())):
                got = [f.get_tensor(n) for n in names]
                return VocabTopK(*got) if both else tuple(got)
    parts = [[] for _ in names]
    with torch.no_grad():
        for layer in tqdm(range(ad.n_layers), desc="top tokens", unit="layer", disable=not progress):
            if both:
                res = neuron_ends(engine, ad.out_weight(layer), k, chunk)
            else:
                res = neuron_topk(engine, ad.out_weight(layer), k, chunk)
            for part, t in zip(parts, res):
                part.append(t.cpu())
    tensors = {n: torch.stack(part) for n, part in zip(names, parts)}
    if path is not None:
        meta = {"format_version": FORMAT_VERSION, "fingerprint": engine.fingerprint, "k": str(k)}
        save_safetensors(path, tensors, meta)
    got = [tensors[n] for n in names]
    return VocabTopK(*got) if both else tuple(got)
