"""Tiny random-weight VLM checkpoints, built offline from configs in code, for tests and benchmarks.

    path = tiny_llava(tmp_dir)                  # LlavaForConditionalGeneration + LlavaProcessor
    path = tiny_instructblip(tmp_dir)           # InstructBlipForConditionalGeneration + InstructBlipProcessor
    path = tiny_mplug_owl2(tmp_dir)             # custom mPLUG-Owl2-shaped model + tokenizer + image processor
    images = random_images(8, size=32, seed=0)
    path = ZOO["qwen2_5_vl"](tmp_dir)           # one of many VLM families (zoo.py): ZOO maps name -> tiny_*

Importing this package registers the mPLUG-Owl2-like classes with the transformers Auto classes.
"""
from .common import random_images, tiny_bert_tokenizer, tiny_tokenizer
from .instructblip import tiny_instructblip
from .llava import LLAVA_CHAT_TEMPLATE, llava_model, tiny_llava, tiny_llava_next
from .zoo import (ZOO, ZOO_MODELS, tiny_aya_vision, tiny_blip2, tiny_deepseek_v3, tiny_florence2, tiny_gemma3,
                  tiny_glm4v, tiny_idefics3, tiny_internvl, tiny_llava_onevision, tiny_mistral3, tiny_mllama,
                  tiny_paligemma, tiny_qwen2_5_vl, tiny_qwen3_vl, tiny_qwen3_vl_moe, tiny_smolvlm)
from .mplug_owl2 import MPLUGOwl2LikeConfig, MPLUGOwl2LikeForCausalLM, MPLUGOwl2LikeModel, tiny_mplug_owl2

__all__ = ["tiny_llava", "tiny_llava_next", "llava_model", "tiny_instructblip", "tiny_mplug_owl2", "tiny_tokenizer", "tiny_bert_tokenizer",
           "random_images", "MPLUGOwl2LikeConfig", "MPLUGOwl2LikeForCausalLM", "MPLUGOwl2LikeModel",
           "LLAVA_CHAT_TEMPLATE", "ZOO", "ZOO_MODELS", "tiny_llava_onevision", "tiny_qwen2_5_vl", "tiny_qwen3_vl",
           "tiny_gemma3", "tiny_smolvlm", "tiny_idefics3", "tiny_paligemma", "tiny_mllama", "tiny_internvl",
           "tiny_aya_vision", "tiny_mistral3", "tiny_blip2", "tiny_glm4v", "tiny_qwen3_vl_moe", "tiny_deepseek_v3",
           "tiny_florence2"]
