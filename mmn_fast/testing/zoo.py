"""Tiny random-weight checkpoints of many VLM families (and a DeepSeek-V3-style MoE), built offline.

Every family has `<family>_model(seed=0) -> (model, processor)` in memory and `tiny_<family>(path) -> Path`,
which saves model + processor (with a chat template where the family has one) into `path`. `ZOO` maps a
family name to its `tiny_*` function. Text decoders: 2 layers, hidden 64, head_dim 16; vision towers:
2 layers, hidden 32; images 32x32 (or the smallest the image processor accepts).

The processors of families that also take videos (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL(-MoE), SmolVLM,
InternVL, GLM-4V) are built image-only (`image_only`): their video processors need torchvision. They are
saved under the family's processor class, so `AutoProcessor.from_pretrained` reloads them where torchvision
is installed; without it, pass the in-memory processor (`ZOO_MODELS[name]()[1]`) to `mmn_fast.load`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import torch
import transformers
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from ..model.templates import LLAVA_CHAT_TEMPLATE
from .llava import llava_model
from .common import (BOS, EOS, IMAGE, PAD, UNK, as_dtype, generation_config,
                     image_processor, out_dir, quiet, tiny_tokenizer,
                     tokenizer_json)

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=1024)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


# ---------------------------------------------------------------------------------------------- helpers
def image_only(cls, **class_attrs):
    """A subclass of processor class `cls` without its video processor (which needs torchvision),
    named like `cls` so that a saved processor names the family's class; `class_attrs` on the class."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: list(attributes)),
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__, **class_attrs})


def tokenizer_with(*specials: str, named: dict | None = None, **special_kw):
    """The tiny tokenizer (see `tiny_tokenizer`) plus `specials` (added as special tokens) and `named`
    tokens exposed as `tokenizer.<name>` / `<name>_id`; bos/eos/pad/unk overrides in special_kw."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()), **{**dict(bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                                                          unk_token=UNK), **special_kw},
        extra_special_tokens=dict(named) if named else None, padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=2048)
    new = [t for t in dict.fromkeys((*specials, *(named or {}).values())) if t not in tok.get_vocab()]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def chat_template(image: str = IMAGE) -> str:
    """The llava-1.5-style template with `image` where the image goes."""
    return LLAVA_CHAT_TEMPLATE.replace("<image>", image)


def token_ids(config, tok, *configs) -> None:
    """Set bos/eos/pad ids from `tok` on `config` and on each of `configs` (text configs)."""
    for c in (config, *configs):
        for name in ("bos", "eos", "pad"):
            setattr(c, f"{name}_token_id", getattr(tok, f"{name}_token_id"))


def finish(config_or_model, tok, cls=None, seed: int = 0, torch_dtype=torch.float32):
    """An eval-mode random-weight model of `cls` from `config` (seeded) with greedy generation defaults."""
    if cls is not None:
        torch.manual_seed(seed)
        model = cls(config_or_model)
    else:
        model = config_or_model
    model = model.to(as_dtype(torch_dtype)).eval()
    model.generation_config = generation_config(tok)
    return model


def save(path, model, processor) -> Path:
    path = out_dir(path)
    with quiet():
        model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def qwen2_text(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **{**TEXT, **kw})


def qwen_image_processor(patch_size: int = 8):
    """Qwen2-VL-style PIL image processor: a 32x32 image gives (32/patch)^2 / 4 merged tokens."""
    return transformers.Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})


_QWEN_SPECIAL = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_processor(cls, tok, patch_size: int = 8):
    proc_cls = image_only(cls)
    return proc_cls(image_processor=qwen_image_processor(patch_size), tokenizer=tok,
                    chat_template=chat_template(_QWEN_IMAGE))


def _qwen_tokenizer():
    return tokenizer_with(*_QWEN_SPECIAL, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                 "vision_bos_token": "<|vision_start|>",
                                                 "vision_eos_token": "<|vision_end|>"})


def _qwen_ids(tok) -> dict:
    i, v, s, e = ids(tok, *_QWEN_SPECIAL)
    return dict(image_token_id=i, video_token_id=v, vision_start_token_id=s, vision_end_token_id=e)


# ---------------------------------------------------------------------------------------------- families
def llava_onevision_model(seed: int = 0):
    """LLaVA-OneVision: SigLIP + Qwen2, any-res tiles of 32 px ("full" features: 16 tokens a tile)."""
    tok = tokenizer_with("<video>", named={"image_token": IMAGE, "video_token": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**SIGLIP),
        text_config=transformers.Qwen2Config(**qwen2_text(tok)),
        image_token_index=ids(tok, IMAGE)[0], video_token_index=ids(tok, "<video>")[0], image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    token_ids(config, tok)
    model = finish(config, tok, transformers.LlavaOnevisionForConditionalGeneration, seed)
    ip = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
                                                       do_pad=True)
    proc = image_only(transformers.LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=chat_template(IMAGE + "\n"))
    return model, proc


def qwen2_5_vl_model(seed: int = 0):
    """Qwen2.5-VL: windowed ViT (8 px patches, 2x2 merge: 4 tokens for 32x32) + Qwen2 with mrope."""
    tok = _qwen_tokenizer()
    text = qwen2_text(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    token_ids(config, tok)
    model = finish(config, tok, transformers.Qwen2_5_VLForConditionalGeneration, seed)
    return model, _qwen_processor(transformers.Qwen2_5_VLProcessor, tok)


def _qwen3_vl_config(tok, moe: bool):
    text = qwen2_text(tok, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "mrope_interleaved": True, "rope_theta": 10000.0})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    token_ids(config, tok)
    return config


def qwen3_vl_model(seed: int = 0):
    """Qwen3-VL: ViT with deepstack features into the first decoder layer + Qwen3 with interleaved mrope."""
    tok = _qwen_tokenizer()
    model = finish(_qwen3_vl_config(tok, moe=False), tok, transformers.Qwen3VLForConditionalGeneration, seed)
    return model, _qwen_processor(transformers.Qwen3VLProcessor, tok)


def qwen3_vl_moe_model(seed: int = 0):
    """Qwen3-VL-MoE: Qwen3-VL with 4 routed experts (top-2) in every decoder layer."""
    tok = _qwen_tokenizer()
    model = finish(_qwen3_vl_config(tok, moe=True), tok, transformers.Qwen3VLMoeForConditionalGeneration, seed)
    return model, _qwen_processor(transformers.Qwen3VLProcessor, tok)


GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' "
    "else message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gemma3_model(seed: int = 0):
    """Gemma 3: SigLIP (32 px, 16 patches pooled to 4 tokens) + Gemma3 text (sliding + global layers)."""
    boi, eoi, img = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    tok = tokenizer_with("<start_of_turn>", "<end_of_turn>",
                         named={"boi_token": boi, "eoi_token": eoi, "image_token": img})
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=1024, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(text_config=text, vision_config=transformers.SiglipVisionConfig(**SIGLIP),
                                       mm_tokens_per_image=4, boi_token_index=ids(tok, boi)[0],
                                       eoi_token_index=ids(tok, eoi)[0], image_token_index=ids(tok, img)[0],
                                       tie_word_embeddings=True)
    token_ids(config, tok, text)
    model = finish(config, tok, transformers.Gemma3ForConditionalGeneration, seed)
    ip = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                        chat_template=GEMMA3_TEMPLATE)
    return model, proc


IDEFICS_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}"
    " {{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
_IDEFICS_NAMED = {"image_token": IMAGE, "fake_image_token": "<fake_token_around_image>",
                  "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}


def _idefics_parts(tok, vision_cls, config_cls, seed):
    vision = vision_cls(**SIGLIP)
    text = transformers.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **TEXT)
    config = config_cls(vision_config=vision, text_config=text, scale_factor=2, image_token_id=ids(tok, IMAGE)[0],
                        tie_word_embeddings=False)
    token_ids(config, tok, text)
    return config


def smolvlm_model(seed: int = 0):
    """SmolVLM: SigLIP-like (32 px) + pixel shuffle (scale 2: 4 tokens an image) + LLaMA; no image splitting."""
    tok = tokenizer_with("<|im_start|>", named=_IDEFICS_NAMED)
    config = _idefics_parts(tok, transformers.SmolVLMVisionConfig, transformers.SmolVLMConfig, seed)
    model = finish(config, tok, transformers.SmolVLMForConditionalGeneration, seed)
    ip = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=False)
    # num2words (not installed here) only writes video prompts: a stand-in lets the image-only processor build
    module = sys.modules[transformers.SmolVLMProcessor.__module__]
    stand_in = module.num2words is None
    if stand_in:
        module.num2words = str
    try:
        cls = image_only(transformers.SmolVLMProcessor, video_processor=SimpleNamespace(num_frames=None, fps=None))
        proc = cls(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_len=4,
                   chat_template=IDEFICS_TEMPLATE)
    finally:
        if stand_in:
            module.num2words = None
    return model, proc


def idefics3_model(seed: int = 0):
    """Idefics3: SigLIP-like (32 px) + pixel shuffle (scale 2: 4 tokens an image) + LLaMA; no image splitting."""
    tok = tokenizer_with("<|im_start|>", named=_IDEFICS_NAMED)
    config = _idefics_parts(tok, transformers.Idefics3VisionConfig, transformers.Idefics3Config, seed)
    model = finish(config, tok, transformers.Idefics3ForConditionalGeneration, seed)
    ip = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                 do_image_splitting=False)
    proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                          chat_template=IDEFICS_TEMPLATE)
    return model, proc


def paligemma_model(seed: int = 0):
    """PaliGemma: SigLIP (32 px: 16 image tokens) + Gemma; prefix-LM attention, no chat template."""
    tok = tokenizer_with(named={"image_token": IMAGE})
    text = transformers.GemmaConfig(vocab_size=len(tok), head_dim=16, **TEXT)
    config = transformers.PaliGemmaConfig(vision_config=transformers.SiglipVisionConfig(**SIGLIP, projection_dim=64),
                                          text_config=text, image_token_index=ids(tok, IMAGE)[0], projection_dim=64)
    token_ids(config, tok, text)
    model = finish(config, tok, transformers.PaliGemmaForConditionalGeneration, seed)
    ip = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    return model, transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


MLLAMA_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def mllama_model(seed: int = 0):
    """Mllama (Llama 3.2 Vision): tiled ViT (one 32 px tile) read by a cross-attention decoder layer."""
    tok = tokenizer_with("<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                         named={"image_token": "<|image|>"})
    vision = transformers.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_global_layers=1, attention_heads=2, image_size=32, patch_size=8,
                                             max_num_tiles=1, intermediate_layers_indices=[0], vision_output_dim=64,
                                             supported_aspect_ratios=[[1, 1]])
    text = transformers.MllamaTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         cross_attention_layers=[1], max_position_embeddings=1024,
                                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = transformers.MllamaConfig(vision_config=vision, text_config=text,
                                       image_token_index=ids(tok, "<|image|>")[0])
    token_ids(config, tok, text)
    model = finish(config, tok, transformers.MllamaForConditionalGeneration, seed)
    ip = transformers.MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1)
    return model, transformers.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)


def internvl_model(seed: int = 0):
    """InternVL: InternViT (32 px, 8 px patches) + pixel shuffle (ratio 0.5: 4 tokens an image) + Qwen2."""
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = tokenizer_with(named=named)
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8])
    config = transformers.InternVLConfig(vision_config=vision, text_config=transformers.Qwen2Config(**qwen2_text(tok)),
                                         image_token_id=ids(tok, "<IMG_CONTEXT>")[0], image_seq_length=4,
                                         downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    token_ids(config, tok)
    model = finish(config, tok, transformers.InternVLForConditionalGeneration, seed)
    ip = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    proc = image_only(transformers.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                                      chat_template=chat_template("<IMG_CONTEXT>\n"))
    return model, proc


_AYA = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL")


def aya_vision_model(seed: int = 0):
    """Aya Vision: SigLIP (32 px) + pixel shuffle (factor 2: 4 patch tokens) + Cohere2 text."""
    tok = tokenizer_with(*_AYA, named={"image_token": IMAGE})
    text = transformers.Cohere2Config(vocab_size=len(tok), head_dim=16, sliding_window=64,
                                      layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **TEXT)
    config = transformers.AyaVisionConfig(vision_config=transformers.SiglipVisionConfig(**SIGLIP), text_config=text,
                                          downsample_factor=2, image_token_index=ids(tok, "<|IMG_PATCH|>")[0],
                                          vision_feature_layer=-1, vision_feature_select_strategy="full",
                                          tie_word_embeddings=False)
    token_ids(config, tok, text)
    model = finish(config, tok, transformers.AyaVisionForConditionalGeneration, seed)
    ip = transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
    proc = transformers.AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=8, img_size=32,
                                           downsample_factor=2, chat_template=chat_template(IMAGE))
    return model, proc


def pixtral_processor_class():
    """`PixtralProcessor`. Its module imports one function from the torchvision image processor; without
    torchvision, that import is served from the PIL image processor's module (the same function). The
    modules are imported by name here, as that stub must be in place before the processor module loads."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    processing = "transformers.models.pixtral.processing_pixtral"
    if importlib.util.find_spec("torchvision") is None and name not in sys.modules and processing not in sys.modules:
        pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        stub = ModuleType(name)
        stub.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[name] = stub
        try:
            return importlib.import_module(processing).PixtralProcessor
        finally:
            del sys.modules[name]
    return importlib.import_module(processing).PixtralProcessor


def mistral3_model(seed: int = 0):
    """Mistral3 (Pixtral vision): Pixtral ViT (32 px, 8 px patches, 2x2 merge: 2x2 [IMG] + breaks) + Mistral."""
    tok = tokenizer_with("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.MistralConfig(vocab_size=len(tok), head_dim=16, tie_word_embeddings=False, **TEXT)
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=ids(tok, "[IMG]")[0],
                                         spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    token_ids(config, tok, text)
    model = finish(config, tok, transformers.Mistral3ForConditionalGeneration, seed)
    ip = transformers.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    proc = pixtral_processor_class()(image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=2,
                                         chat_template=chat_template("[IMG]"))
    return model, proc


def blip2_model(seed: int = 0, num_query_tokens: int = 8):
    """BLIP-2 (OPT decoder): ViT (32 px) + Q-Former (8 queries) + OPT (fc1/fc2 MLPs, LayerNorm)."""
    tok = tiny_tokenizer(named_image_token=False)  # Blip2Processor adds its own AddedToken("<image>")
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, encoder_hidden_size=32,
                                              cross_attention_frequency=1)
    text = transformers.OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=1024,
                                  tie_word_embeddings=False)
    config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                      text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                                      image_token_index=ids(tok, IMAGE)[0])
    token_ids(config, tok, config.text_config)
    model = finish(config, tok, transformers.Blip2ForConditionalGeneration, seed)
    proc = transformers.Blip2Processor(image_processor=image_processor("blip", 32), tokenizer=tok,
                                       num_query_tokens=num_query_tokens)
    return model, proc


_GLM = ("<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>")


def _glm4v(config_cls, model_cls, seed: int, **text_extra):
    """GLM-4V's vision side (8 px patches, 2x2 merge: 4 tokens for 32x32) over a GLM-4 text decoder with mrope
    (`text_extra`: its MoE settings, for GLM-4V-MoE)."""
    tok = tokenizer_with(*_GLM, named={"image_token": "<|image|>", "video_token": "<|video|>"})
    b, e, i, v, vb, ve = ids(tok, *_GLM)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5}, **text_extra)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=32)
    config = config_cls(text_config=text, vision_config=vision, image_token_id=i, video_token_id=v,
                        image_start_token_id=b, image_end_token_id=e, video_start_token_id=vb, video_end_token_id=ve,
                        tie_word_embeddings=False)
    token_ids(config, tok, config.text_config)
    model = finish(config, tok, model_cls, seed)
    ip = transformers.Glm4vImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                             size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    template = chat_template("<|begin_of_image|><|image|><|end_of_image|>")
    proc = image_only(transformers.Glm4vProcessor)(image_processor=ip, tokenizer=tok, chat_template=template)
    return model, proc


def glm4v_model(seed: int = 0):
    """GLM-4V: ViT (8 px patches, 2x2 merge: 4 tokens for 32x32) + GLM-4 text with mrope."""
    return _glm4v(transformers.Glm4vConfig, transformers.Glm4vForConditionalGeneration, seed)


def glm4v_moe_model(seed: int = 0):
    """GLM-4V-MoE: GLM-4V's vision side over a GLM-4-MoE text decoder with mrope (layer 0 dense, layer 1: 4
    routed experts, top-2, and a shared expert)."""
    return _glm4v(transformers.Glm4vMoeConfig, transformers.Glm4vMoeForConditionalGeneration, seed,
                  moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=1, topk_group=1)


def _deepseek_v3_text(tok):
    """DeepSeek-V3-style MoE decoder config: MLA attention, layer 0 dense, layer 1 4 routed experts (top-2)
    + a shared expert."""
    return transformers.DeepseekV3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def deepseek_v3_model(seed: int = 0):
    """DeepSeek-V3-style text-only MoE (`_deepseek_v3_text`). The "processor" is the tokenizer."""
    tok = tiny_tokenizer(named_image_token=False)
    model = finish(_deepseek_v3_text(tok), tok, transformers.DeepseekV3ForCausalLM, seed)
    tok.chat_template = chat_template("")
    return model, tok


def llava_deepseek_moe_model(seed: int = 0):
    """A DeepSeek-style MoE VLM (the shape of DeepSeek-VL2 or Kimi-VL, which transformers does not ship):
    LLaVA's CLIP tower and projector over the `_deepseek_v3_text` decoder (dense layer 0, MoE layer 1)."""
    base, processor = llava_model(seed=seed)
    tok = processor.tokenizer
    cfg = base.config
    config = transformers.LlavaConfig(
        vision_config=cfg.vision_config, text_config=_deepseek_v3_text(tok), image_token_id=cfg.image_token_id,
        image_seq_length=cfg.image_seq_length, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False)
    for name in ("bos", "eos", "pad"):
        setattr(config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    return finish(config, tok, transformers.LlavaForConditionalGeneration, seed), processor


def florence2_model(seed: int = 0):
    """Florence-2: DaViT (2 stages, 32 px: 16 tokens + 1 pooled) + BART encoder-decoder (2+2 layers)."""
    tok = tokenizer_with(named={"image_token": IMAGE})
    vision = transformers.Florence2VisionConfig(
        depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
        embed_dim=[32, 64], num_heads=[2, 4], num_groups=[2, 4], window_size=4, projection_dim=64,
        max_position_embeddings=16, max_temporal_embeddings=4)
    text = transformers.BartConfig(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                   decoder_ffn_dim=128, max_position_embeddings=1024,
                                   decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    config = transformers.Florence2Config(vision_config=vision, text_config=text, image_token_id=ids(tok, IMAGE)[0])
    token_ids(config, tok, text)
    config.decoder_start_token_id = tok.eos_token_id
    model = finish(config, tok, transformers.Florence2ForConditionalGeneration, seed)
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    ip = image_processor("clip", 32)
    ip.image_seq_length = 17
    return model, transformers.Florence2Processor(image_processor=ip, tokenizer=tok)


# ---------------------------------------------------------------------------------------------- registry
ZOO_MODELS: dict[str, Callable[..., tuple]] = {
    "llava_onevision": llava_onevision_model, "qwen2_5_vl": qwen2_5_vl_model, "qwen3_vl": qwen3_vl_model,
    "gemma3": gemma3_model, "smolvlm": smolvlm_model, "idefics3": idefics3_model, "paligemma": paligemma_model,
    "mllama": mllama_model, "internvl": internvl_model, "aya_vision": aya_vision_model, "mistral3": mistral3_model,
    "blip2": blip2_model, "glm4v": glm4v_model, "qwen3_vl_moe": qwen3_vl_moe_model, "glm4v_moe": glm4v_moe_model,
    "deepseek_v3": deepseek_v3_model,
    "llava_deepseek_moe": llava_deepseek_moe_model,
    "florence2": florence2_model,
}


def _saver(name: str) -> Callable[..., Path]:
    build = ZOO_MODELS[name]

    def tiny(path, seed: int = 0) -> Path:
        return save(path, *build(seed=seed))

    tiny.__name__ = tiny.__qualname__ = f"tiny_{name}"
    tiny.__doc__ = f"Save `{build.__name__}()` (model + processor) to `path`; returns it. {build.__doc__}"
    return tiny


tiny_llava_onevision = _saver("llava_onevision")
tiny_qwen2_5_vl = _saver("qwen2_5_vl")
tiny_qwen3_vl = _saver("qwen3_vl")
tiny_gemma3 = _saver("gemma3")
tiny_smolvlm = _saver("smolvlm")
tiny_idefics3 = _saver("idefics3")
tiny_paligemma = _saver("paligemma")
tiny_mllama = _saver("mllama")
tiny_internvl = _saver("internvl")
tiny_aya_vision = _saver("aya_vision")
tiny_mistral3 = _saver("mistral3")
tiny_blip2 = _saver("blip2")
tiny_glm4v = _saver("glm4v")
tiny_qwen3_vl_moe = _saver("qwen3_vl_moe")
tiny_glm4v_moe = _saver("glm4v_moe")
tiny_deepseek_v3 = _saver("deepseek_v3")
tiny_florence2 = _saver("florence2")
tiny_llava_deepseek_moe = _saver("llava_deepseek_moe")

# family name -> function(path) that saves a tiny checkpoint (model + processor) there and returns the path
ZOO: dict[str, Callable[..., Path]] = {name: globals()[f"tiny_{name}"] for name in ZOO_MODELS}
