"""Tiny random Qwen2-VL (multimodal rope: 3-D position ids the model derives from the mask), in memory.

Qwen2-VL is the family where a VLM computes its own position ids (`get_rope_index`): 1-D ids
passed from outside are wrong after the image. The processor here handles images only:
`Qwen2VLProcessor` also builds a video processor, which needs torchvision.
"""
from __future__ import annotations

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from ..model.templates import LLAVA_CHAT_TEMPLATE
from .common import as_dtype, generation_config, tiny_tokenizer

_SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def qwen2_vl_model(*, seed: int = 0, hidden_size: int = 64, intermediate_size: int = 96, num_layers: int = 2,
                   torch_dtype: torch.dtype = torch.float32):
    """(random-weight `Qwen2VLForConditionalGeneration`, an image-only Qwen2-VL processor with a chat
    template). A 32x32 image gives 4 image tokens (8-pixel patches, 2x2 merge)."""

    tok = tiny_tokenizer(named_image_token=False)
    tok.add_special_tokens({"additional_special_tokens": list(_SPECIAL)})
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIAL}
    text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                max_position_embeddings=1024)
    vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(as_dtype(torch_dtype)).eval()
    model.generation_config = generation_config(tok)

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id, self.video_token_id = ids[self.image_token], ids[self.video_token]
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    image_proc = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    template = LLAVA_CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    return model, ImageOnlyProcessor(image_processor=image_proc, tokenizer=tok, chat_template=template)
