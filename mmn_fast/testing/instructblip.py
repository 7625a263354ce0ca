"""Tiny random InstructBLIP (ViT + Q-Former + LLaMA text decoder) saved as a local checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                          InstructBlipQFormerConfig, InstructBlipVisionConfig)

from .common import (IMAGE, as_dtype, generation_config, heads_for, image_processor, llama_config, out_dir, quiet,
                     tiny_bert_tokenizer, tiny_tokenizer)


def tiny_instructblip(path, *, seed: int = 0, num_layers: int = 2, hidden_size: int = 64,
                      intermediate_size: int = 96, image_size: int = 32, patch_size: int = 8,
                      vision_hidden: int = 32, qformer_hidden: int = 32, num_query_tokens: int = 32,
                      torch_dtype: torch.dtype = torch.float32) -> Path:
    """Save a random-weight `InstructBlipForConditionalGeneration` + `InstructBlipProcessor` to `path`.

    The processor prepends `num_query_tokens` `<image>` tokens to every prompt (before any padding
    and before <s>); the model replaces their embeddings with the Q-Former outputs.
    """

    path = out_dir(path)
    # InstructBlipProcessor (5.x) reads `tokenizer.image_token.content`: a tokenizer with a plain-string
    # `image_token` breaks it, so this one has none and the processor uses its own AddedToken("<image>").
    tok, qtok = tiny_tokenizer(named_image_token=False), tiny_bert_tokenizer()
    vision = InstructBlipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                      num_hidden_layers=2, num_attention_heads=heads_for(vision_hidden),
                                      image_size=image_size, patch_size=patch_size)
    qformer = InstructBlipQFormerConfig(vocab_size=len(qtok), hidden_size=qformer_hidden,
                                        intermediate_size=2 * qformer_hidden, num_hidden_layers=2,
                                        num_attention_heads=heads_for(qformer_hidden), max_position_embeddings=512,
                                        pad_token_id=qtok.pad_token_id, cross_attention_frequency=1)
    text = llama_config(tok, num_layers=num_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_heads=heads_for(hidden_size))
    config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                                image_token_index=tok.convert_tokens_to_ids(IMAGE))
    for name in ("bos", "eos", "pad"):
        setattr(config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).to(as_dtype(torch_dtype)).eval()
    model.generation_config = generation_config(tok)
    processor = InstructBlipProcessor(image_processor=image_processor("blip", image_size), tokenizer=tok,
                                      qformer_tokenizer=qtok, num_query_tokens=num_query_tokens)
    with quiet():
        model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
