"""Tiny random-weight VLM checkpoints, built offline from configs in code, for tests and benchmarks.

    path = tiny_llava(tmp_dir)                  # LlavaForConditionalGeneration + LlavaProcessor
    path = tiny_instructblip(tmp_dir)           # InstructBlipForConditionalGeneration + InstructBlipProcessor
    path = tiny_mplug_owl2(tmp_dir)             # custom mPLUG-Owl2-shaped model + tokenizer + image processor
    images = random_images(8, size=32, seed=0)

Importing this package registers the mPLUG-Owl2-like classes with the transformers Auto classes.
"""
from .common import random_images, tiny_bert_tokenizer, tiny_tokenizer
from .instructblip import tiny_instructblip
from .llava import LLAVA_CHAT_TEMPLATE, llava_model, tiny_llava, tiny_llava_next
from .mplug_owl2 import MPLUGOwl2LikeConfig, MPLUGOwl2LikeForCausalLM, MPLUGOwl2LikeModel, tiny_mplug_owl2

__all__ = ["tiny_llava", "tiny_llava_next", "llava_model", "tiny_instructblip", "tiny_mplug_owl2", "tiny_tokenizer", "tiny_bert_tokenizer",
           "random_images", "MPLUGOwl2LikeConfig", "MPLUGOwl2LikeForCausalLM", "MPLUGOwl2LikeModel",
           "LLAVA_CHAT_TEMPLATE"]
