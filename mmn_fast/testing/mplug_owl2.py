"""A custom mPLUG-Owl2-shaped model (not a transformers architecture) and its tiny checkpoint factory.

Module tree, as in mPLUG-Owl2:

    model.vision_model        CLIPVisionModel (ViT; all 1 + P patch features are used)
    model.visual_abstractor   64 learned queries cross-attend to the patch features, are projected to the
                              text width, and a learned end token is appended: 65 visual tokens
    model.embed_tokens / model.layers.N.mlp.{gate_proj,up_proj,down_proj,act_fn} / model.norm   (LLaMA)
    lm_head

The prompt holds 65 copies of the image token where the image goes; on prefill their input embeddings
are replaced by the abstractor's outputs. Importing this module registers the classes with
`AutoConfig` / `AutoModelForCausalLM` (model_type "mplug_owl2_like"), so saved checkpoints load
without trust_remote_code once `mmn_fast.testing` is imported.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GenerationMixin,
                          LlamaConfig)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel
from transformers.utils import can_return_tuple

from .common import IMAGE, as_dtype, generation_config, heads_for, image_processor, out_dir, quiet, tiny_tokenizer

# The KV cache's argument and output field: `cache` since transformers 5.24, `past_key_values` before.
_CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

try:  # transformers 5: init functions that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # pragma: no cover
    _init = nn.init


class MPLUGOwl2LikeConfig(LlamaConfig):
    """LLaMA text fields (flat, as mPLUG-Owl2's config subclasses LlamaConfig) + vision/abstractor sizes."""

    model_type = "mplug_owl2_like"

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 32
    vision_num_layers: int = 2
    vision_num_heads: int = 2
    abstractor_hidden_size: int = 32
    abstractor_num_heads: int = 2
    num_query_tokens: int = 64
    num_image_tokens: int = 65  # always num_query_tokens + 1 (the appended end token)
    image_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.num_image_tokens = self.num_query_tokens + 1
        super().__post_init__(**kwargs)

    def clip_vision_config(self) -> CLIPVisionConfig:
        """The `CLIPVisionConfig` of `model.vision_model`."""
        d = self.vision_hidden_size
        return CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, hidden_size=d,
                                intermediate_size=2 * d, num_hidden_layers=self.vision_num_layers,
                                num_attention_heads=self.vision_num_heads, projection_dim=d)


class MPLUGOwl2LikeVisualAbstractor(nn.Module):
    """[B, 1 + P, vision_hidden] patch features -> [B, num_query_tokens + 1, hidden_size] visual tokens."""

    def __init__(self, config: MPLUGOwl2LikeConfig):
        super().__init__()
        d, dv = config.abstractor_hidden_size, config.vision_hidden_size
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(dv), nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, config.abstractor_num_heads, kdim=dv, vdim=dv, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.visual_fc = nn.Linear(d, config.hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        b = patch_features.shape[0]
        kv = self.norm_kv(patch_features)
        q = self.query_embeds.expand(b, -1, -1)
        x = q + self.cross_attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return torch.cat([self.visual_fc(x), self.vit_eos.expand(b, -1, -1)], dim=1)


class MPLUGOwl2LikePreTrainedModel(LlamaPreTrainedModel):
    config: MPLUGOwl2LikeConfig
    config_class = MPLUGOwl2LikeConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MPLUGOwl2LikeVisualAbstractor):
            _init.normal_(module.query_embeds, mean=0.0, std=self.config.initializer_range)
            _init.normal_(module.vit_eos, mean=0.0, std=self.config.initializer_range)


class MPLUGOwl2LikeModel(MPLUGOwl2LikePreTrainedModel, LlamaModel):
    """LlamaModel (embed_tokens, layers, norm; its forward) plus `vision_model` and `visual_abstractor`."""

    def __init__(self, config: MPLUGOwl2LikeConfig):
        super().__init__(config)  # LlamaModel.__init__
        self.vision_model = CLIPVisionModel._from_config(config.clip_vision_config())
        self.visual_abstractor = MPLUGOwl2LikeVisualAbstractor(config)
        self.post_init()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden_size]."""
        dtype = self.vision_model.dtype
        patches = self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return self.visual_abstractor(patches)


class MPLUGOwl2LikeForCausalLM(MPLUGOwl2LikePreTrainedModel, GenerationMixin):
    def __init__(self, config: MPLUGOwl2LikeConfig):
        super().__init__(config)
        self.model = MPLUGOwl2LikeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; each row's first `num_image_tokens` image tokens get the image's visual tokens."""
        embeds = self.model.embed_tokens(input_ids)
        n = self.config.num_image_tokens
        mask = input_ids == self.config.image_token_id
        mask &= mask.long().cumsum(-1) <= n  # an <image> the model generated later stays a plain token
        if pixel_values is None:
            return embeds
        counts = mask.sum(-1)[mask.any(-1)]  # per row that holds an image
        if counts.numel() != pixel_values.shape[0] or (counts != n).any():
            raise ValueError(f"each of the {pixel_values.shape[0]} images needs its own row of input_ids with {n} "
                             f"{IMAGE} tokens; got rows with {counts.tolist()}")
        feats = self.model.encode_images(pixel_values).to(embeds.dtype)  # [N, n, D]
        return embeds.masked_scatter(mask.unsqueeze(-1), feats)

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache=None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if "past_key_values" in kwargs:  # the transformers<5.24 name
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            prefill = cache is None or cache.get_seq_length() == 0  # later steps: the cache holds the image
            inputs_embeds = self.embed(input_ids, pixel_values if prefill else None)
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # left padding: positions count real tokens only (generate() passes the same)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **{_CACHE: cache}, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **{_CACHE: getattr(out, _CACHE)})


AutoConfig.register(MPLUGOwl2LikeConfig.model_type, MPLUGOwl2LikeConfig, exist_ok=True)
AutoModelForCausalLM.register(MPLUGOwl2LikeConfig, MPLUGOwl2LikeForCausalLM, exist_ok=True)


def tiny_mplug_owl2(path, *, seed: int = 0, num_layers: int = 2, hidden_size: int = 64,
                    intermediate_size: int = 96, image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32,
                    num_query_tokens: int = 64, torch_dtype: torch.dtype = torch.float32) -> Path:
    """Save a random-weight `MPLUGOwl2LikeForCausalLM`, the tiny tokenizer and a CLIP image processor.

    No processor class: callers write `<image>` x config.num_image_tokens (65) + text themselves.
    """
    path = out_dir(path)
    tok = tiny_tokenizer()
    heads = heads_for(hidden_size)
    config = MPLUGOwl2LikeConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, image_size=image_size, patch_size=patch_size,
        vision_hidden_size=vision_hidden, vision_num_heads=heads_for(vision_hidden),
        abstractor_hidden_size=vision_hidden, abstractor_num_heads=heads_for(vision_hidden),
        num_query_tokens=num_query_tokens, image_token_id=tok.convert_tokens_to_ids(IMAGE))
    torch.manual_seed(seed)
    model = MPLUGOwl2LikeForCausalLM(config).to(as_dtype(torch_dtype)).eval()
    model.generation_config = generation_config(tok)
    with quiet():
        model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor("clip", image_size).save_pretrained(path)
    return path
