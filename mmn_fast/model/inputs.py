"""Images in, model inputs out: image lists (folder or JSONL manifest), prompts, processors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MMNError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageItem:
    id: str
    image: str  # path as given
    caption: str | None = None


def load_image(item: ImageItem | str):
    """PIL RGB image; a missing or corrupt file is one clear error naming it."""
    from PIL import Image, UnidentifiedImageError

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


class Prompter:
    """Turns (prompt, prefix) + images into model inputs, left-padded for batched generation.

    With a Hugging Face processor, it writes the text (chat template if any) and lets the
    processor expand image tokens. Without one (custom models), it composes the tokenizer and
    image processor and repeats the image token `n_image_tokens` times itself.
    """

    def __init__(self, tokenizer, processor=None, image_processor=None, template: str = "{image}\n{prompt}",
                 image_token: str | None = None, n_image_tokens: int | None = None):
        self.tokenizer, self.processor, self.image_processor = tokenizer, processor, image_processor
        self.template, self.image_token, self.n_image_tokens = template, image_token, n_image_tokens
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

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
