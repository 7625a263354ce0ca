"""Images in, model inputs out: image lists (folder or JSONL manifest), prompts, processors."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MMNError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageItem:
    id: str
    image: str  # path as given
    caption: str | None = None


def load_image(item: ImageItem | str):
    """PIL RGB image; a missing or corrupt file is one clear error naming it."""
    path = item.image if isinstance(item, ImageItem) else item
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MMNError(f"image '{path}' not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MMNError(f"cannot read image '{path}' ({type(e).__name__}: {e}); check it is a valid image file") from None


def as_image(x):
    """A PIL image as is; a path or `ImageItem` loaded with `load_image`."""
    if hasattr(x, "convert") and not isinstance(x, (str, Path, ImageItem)):
        return x
    return load_image(x)


def left_padding(tokenizer, processor=None):
    """(tokenizer, processor) that pad on the left with a pad token (EOS when the tokenizer has none),
    as batched generation needs. The caller's own objects when they already do; else copies (the
    processor then calls the copied tokenizer), so the caller's tokenizer is never changed."""
    if tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None:
        return tokenizer, processor
    own = copy.deepcopy(tokenizer)
    own.padding_side = "left"
    if own.pad_token_id is None:
        own.pad_token = own.eos_token
    if processor is not None and getattr(processor, "tokenizer", None) is tokenizer:
        processor = copy.copy(processor)
        processor.tokenizer = own
    return own, processor


class Prompter:
    """Turns (prompt, prefix) + images into model inputs, left-padded for batched generation.

    With a Hugging Face processor, it writes the text (chat template if any) and lets the
    processor expand image tokens. Without one (custom models), it composes the tokenizer and
    image processor and repeats the image token `n_image_tokens` times itself. It pads through its
    own left-padding copy of the tokenizer when the caller's pads otherwise (`left_padding`).
    """

    def __init__(self, tokenizer, processor=None, image_processor=None, template: str = "{image}\n{prompt}",
                 image_token: str | None = None, n_image_tokens: int | None = None):
        self.tokenizer, self.processor = left_padding(tokenizer, processor)
        self.image_processor = image_processor
        self.template, self.image_token, self.n_image_tokens = template, image_token, n_image_tokens

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def text(self, prompt: str, prefix: str | None = None) -> str:
        """The full text the model continues: chat template if the processor has one, else the template."""
        chat = getattr(self.processor, "chat_template", None)
        if chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            image = ""
            if self.processor is not None and getattr(self.processor, "image_token", None):
                image = self.processor.image_token
            elif self.processor is None and self.image_token and self.n_image_tokens:
                image = self.image_token * self.n_image_tokens
            text = self.template.format(image=image, prompt=prompt)
        return text + (" " + prefix.strip() if prefix else "")

    def __call__(self, images: list, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.processor is not None:
            return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))
        if self.image_processor is None:
            raise MMNError("no image processor: the model would caption text alone; load the checkpoint's "
                           "processor, or pass image_processor=... to mmn_fast.load()")
        enc = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        if self.image_token:  # the model reads its image at these tokens: a prompt without them shows none
            image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            if not bool((enc["input_ids"] == image_id).any(-1).all()):
                raise MMNError(f"the prompt holds no {self.image_token} tokens for the image: pass n_image_tokens=... "
                               "to mmn_fast.load() (how many positions the image takes), or a prompt_template or "
                               "processor that writes them")
        enc["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return enc

    def encode(self, images: list, prompt: str, prefix: str | None, device: torch.device,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inputs for `images` (PIL) under one prompt (+ prefix): floating tensors in `dtype`, all on `device`."""
        text = self.text(prompt, prefix)
        enc = self(images, [text] * len(images))
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}


def teacher_forced(inputs: dict, captions: list[list[int]], pad_token_id: int,
                   position_ids: bool) -> tuple[dict, torch.Tensor]:
    """Append each caption after its (left-padded) prompt in `inputs`, right-pad with `pad_token_id`.

    position_ids: add 1-D position ids from the mask (for models that take them and do not derive
    their own, as a multimodal rope does). Returns (the inputs, index [B, S] of the positions that
    predict each caption token, clamped past a caption's end).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    s = max(1, max(len(c) for c in captions))
    cap = torch.full((b, s), pad_token_id, dtype=ids.dtype, device=ids.device)
    cap_mask = torch.zeros((b, s), dtype=mask.dtype, device=mask.device)
    for i, c in enumerate(captions):
        cap[i, : len(c)] = torch.tensor(c, dtype=ids.dtype)
        cap_mask[i, : len(c)] = 1
    full = dict(inputs, input_ids=torch.cat([ids, cap], 1), attention_mask=torch.cat([mask, cap_mask], 1))
    tt = full.get("mm_token_type_ids")  # per-token modality (Qwen2-VL style): captions are text, 0
    if isinstance(tt, torch.Tensor) and tuple(tt.shape) == (b, t):
        full["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(b, s)], 1)
    if position_ids:
        pos = full["attention_mask"].long().cumsum(-1) - 1
        full["position_ids"] = pos.masked_fill(full["attention_mask"] == 0, 0)
    lengths = torch.tensor([max(len(c), 1) for c in captions], device=ids.device)
    steps = torch.arange(s, device=ids.device)[None, :].expand(b, -1)
    index = t - 1 + torch.minimum(steps, (lengths - 1)[:, None])
    return full, index
