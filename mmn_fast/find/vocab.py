"""Neuron vocabulary: the tokens each neuron's output vector promotes, `top-k of W_U W_out[:, i]`."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import MMNError
from ..io import save_safetensors
from ..kernels import vocab_topk

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


def top_tokens(engine, layer: int, index: int, k: int = 10) -> list[tuple[str, int, float]]:
    """(token, id, logit) of the k tokens neuron (layer, index) promotes most."""
    ad = engine.adapter
    if not 0 <= layer < ad.n_layers or not 0 <= index < ad.d_mlp:
        raise MMNError(f"neuron ({layer}, {index}) out of range: layers 0..{ad.n_layers - 1}, "
                       f"neurons 0..{ad.d_mlp - 1}")
    with torch.no_grad():
        col = ad.out_weight(layer)[:, index : index + 1]  # [d, 1]
        values, ids = neuron_topk(engine, col, k)
    toks = engine.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    return list(zip(toks, ids[0].tolist(), values[0].tolist()))


def vocab_table(engine, k: int = 10, chunk: int = 4096, cache_dir: str | Path | None = None,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every neuron's top-k tokens: (values [L, F, k] fp32, token ids [L, F, k] int64).

    Computed layer by layer over vocabulary chunks (extra memory O(F x chunk), never F x V), and
    cached as safetensors keyed by the weights' fingerprint when `cache_dir` is given. On the
    engine's Triton backend (k <= 64) one filtering GEMM per layer (`vocab_topk`).
    """
    _check_k(engine, k)
    ad = engine.adapter
    path = Path(cache_dir) / f"vocab-{engine.fingerprint}-k{k}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") == engine.fingerprint and meta.get("k") == str(k):
                return f.get_tensor("values"), f.get_tensor("token_ids")
    values, ids = [], []
    with torch.no_grad():
        for layer in tqdm(range(ad.n_layers), desc="top tokens", unit="layer", disable=not progress):
            v, i = neuron_topk(engine, ad.out_weight(layer), k, chunk)
            values.append(v.cpu())
            ids.append(i.cpu())
    values_t, ids_t = torch.stack(values), torch.stack(ids)
    if path is not None:
        save_safetensors(path, {"values": values_t, "token_ids": ids_t},
                         {"format_version": FORMAT_VERSION, "fingerprint": engine.fingerprint, "k": str(k)})
    return values_t, ids_t
