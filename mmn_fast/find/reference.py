"""A deliberately plain transcription of the published algorithm: the baseline for tests and
benchmarks. The fast path never calls it.

As in the paper's released code: batch size 1; no KV cache (every decoding step recomputes the
whole sequence); forward hooks on the MLP activation; the full F x V projection of every layer;
a full sort of all L x F scores.
"""
from __future__ import annotations

import contextlib

import torch

from .concepts import select_concepts, split_words


@torch.no_grad()
def reference_find(engine, image, prompt: str, prefix: str | None = None, concepts="all",
                   activation: str = "act_fn", top_k: int = 100, max_new_tokens: int = 32) -> dict:
    """Caption one image greedily without a cache and score its concepts.

    Returns {"output_ids": [...], "concepts": [{"word", "token_id", "step", "neurons"}]}.
    """
    model, ad = engine.model, engine.adapter
    inputs = engine.encode([image], prompt, prefix)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    acts_per_step = []  # step -> list over layers of [F]
    current = {}
    output_ids = []
    with contextlib.ExitStack() as hooks:
        for layer in range(ad.n_layers):
            hooks.enter_context(ad.hook_site(layer, activation).hooked(
                lambda h, layer=layer: current.__setitem__(layer, h[0, -1].float().clone())))
        for _ in range(max_new_tokens):
            current.clear()
            logits = model(**dict(inputs, input_ids=ids, attention_mask=mask), use_cache=False).logits
            acts_per_step.append([current[layer] for layer in range(ad.n_layers)])
            tok = int(logits[0, -1].argmax())
            output_ids.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]], device=ids.device)], 1)
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype, device=mask.device)], 1)
            if tok in engine.eos_ids:
                break
    # The preparation step of the released code: W_U @ W_out for every layer, [V, F] each.
    w_u = ad.unembed_weight().float()
    full_proj = [w_u @ ad.out_weight(layer).float() for layer in range(ad.n_layers)]
    text, words = split_words(engine.tokenizer, output_ids)
    results = []
    for word in select_concepts(text, words, concepts, engine.tagger):
        tok = output_ids[word.step]
        scores = torch.cat([acts_per_step[word.step][layer] * full_proj[layer][tok]
                            for layer in range(ad.n_layers)])  # [L * F]
        order = torch.sort(scores, descending=True)
        f = ad.d_mlp
        neurons = [[int(j) // f, int(j) % f, float(v)]
                   for v, j in zip(order.values[:top_k], order.indices[:top_k])]
        results.append({"word": word.text, "token_id": tok, "step": word.step, "neurons": neurons})
    return {"output_ids": output_ids, "concepts": results}
