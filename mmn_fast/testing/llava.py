"""Tiny random LLaVA (CLIP vision tower + LLaMA text decoder) saved as a local checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor,
                          LlavaProcessor)

from ..model.templates import LLAVA_CHAT_TEMPLATE
from .common import (IMAGE, as_dtype, generation_config, heads_for, image_processor, llama_config, out_dir, quiet,
                     tiny_tokenizer)


def llava_model(*, seed: int = 0, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 96,
                image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 2,
                torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(random-weight `LlavaForConditionalGeneration`, `LlavaProcessor` with chat template), in memory.

    The prompt has (image_size // patch_size) ** 2 image tokens (CLIP's CLS is dropped by the "default"
    feature strategy): 16 at the defaults, 256 for image_size=128, patch_size=8. `device`: where the
    weights are created (benchmarks build LLaMA-7B-shaped layers straight on the GPU).
    """

    tok = tiny_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE)
    n_image_tokens = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=heads_for(vision_hidden), projection_dim=vision_hidden)
    text = llama_config(tok, num_layers=num_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_heads=heads_for(hidden_size), max_positions=max(1024, 4 * n_image_tokens))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         image_seq_length=n_image_tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    for name in ("bos", "eos", "pad"):
        setattr(config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(as_dtype(torch_dtype)).eval()
    model.generation_config = generation_config(tok)
    # num_additional_image_tokens=1: CLIP's CLS, which the "default" strategy drops again.
    processor = LlavaProcessor(image_processor=image_processor("clip", image_size), tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default", image_token=IMAGE,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def tiny_llava(path, **shape) -> Path:
    """Save a random-weight `LlavaForConditionalGeneration` + `LlavaProcessor` (with chat template) to
    `path`; `shape`: the keyword arguments of `llava_model`."""
    path = out_dir(path)
    model, processor = llava_model(**shape)
    with quiet():
        model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_llava_next(path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a random-weight `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` to `path`.

    Any-resolution tiling over the pinpoints 1x2, 2x1 and 2x2 tiles of `image_size`: a wide, a tall and a
    square image get different numbers of image tokens (52, 56 and 36 at the defaults), so one batch
    mixes them.
    """

    path = out_dir(path)
    tok = tiny_tokenizer()
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = llama_config(tok, num_layers=2, hidden_size=64, intermediate_size=96, num_heads=heads_for(64),
                        max_positions=2048)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    for name in ("bos", "eos", "pad"):
        setattr(config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = generation_config(tok)
    image_proc = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy="default", image_token=IMAGE,
                                   num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    with quiet():
        model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
