"""Images in, model inputs out: image lists (folder or JSONL manifest), prompts, processors."""
from __future__ import annotations

import copy
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import MMNError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Bytes read for one image (a file, a tar member, a parquet cell): `mmn find --max-image-bytes`.
MAX_IMAGE_BYTES = 64 << 20
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


@dataclass
class ImageItem:
    id: str
    image: str  # path as given
    caption: str | None = None


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ('a FIFO (named pipe)', 'a directory', ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _NOT_REGULAR if test(mode)), "a special file")


def not_regular(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file ('not found', 'is a FIFO (named pipe), not a regular file',
    ...), else None. Checked before opening: opening a FIFO blocks until a writer comes, and a
    device such as /dev/zero never ends."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "not found"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    kind = file_kind(st.st_mode)
    return None if kind is None else f"is {kind}, not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file, else MMNError saying what it is.
    Opened without blocking and checked again on the open file, so that a FIFO put in its place
    after the first check cannot hang the read. OSError as open() raises it (FileNotFoundError ...)."""
    why = not_regular(path)
    if why is not None and why != "not found":
        raise MMNError(f"'{os.fspath(path)}' {why}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    f = os.fdopen(fd, "rb")
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        f.close()
        raise MMNError(f"'{os.fspath(path)}' is {kind}, not a regular file")
    return f


def too_big(size: int, max_bytes: int) -> str:
    return f"{size:,} bytes, over the limit of {max_bytes:,} bytes per image (--max-image-bytes)"


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[bytes | None, str | None]:
    """(the bytes of an image file, None), or (None, why not: missing, not a regular file, over
    `max_bytes`, unreadable). Never reads more than max_bytes + 1 bytes."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(max_bytes + 1) if size <= max_bytes else b""
    except (FileNotFoundError, NotADirectoryError):
        return None, f"missing file: {path}"
    except MMNError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot read {path} ({type(e).__name__}: {e.strerror or e})"
    if size > max_bytes or len(data) > max_bytes:
        return None, f"file too large: {path} is {too_big(max(size, len(data)), max_bytes)}"
    return data, None


def decode_rgb(data: bytes) -> Image.Image:
    """A fully loaded RGB image from encoded bytes. Pillow's decompression-bomb warning (more pixels
    than Image.MAX_IMAGE_PIXELS) is an error here, like its DecompressionBombError at twice that:
    an image that decodes to gigabytes is refused before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"too many pixels to decode: {e}") from None
    rgb.load()
    return rgb


def decode_image_bytes(data: bytes, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[Image.Image | None, str | None]:
    """(RGB PIL image, None) or (None, why it cannot be decoded): over max_bytes, unrecognised,
    corrupt, truncated, too many pixels. Never raises."""
    if len(data) > max_bytes:
        return None, f"image too large: {too_big(len(data), max_bytes)}"
    try:
        return decode_rgb(data), None
    except UnidentifiedImageError:
        return None, "cannot decode image (unrecognised or corrupt image data)"
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, unsupported, decompression bomb ...
        return None, f"cannot decode image ({type(e).__name__}: {e})"


def load_image(item: ImageItem | str, max_bytes: int = MAX_IMAGE_BYTES):
    """PIL RGB image; a missing, non-regular (FIFO, device), oversized or corrupt file is one clear
    error naming it."""
    path = item.image if isinstance(item, ImageItem) else item
    why = not_regular(path)
    if why is not None:
        raise MMNError(f"image '{path}' {why}")
    data, why = read_image_file(path, max_bytes)
    if data is None:
        raise MMNError(f"cannot read image '{path}' ({why})")
    image, why = decode_image_bytes(data, max_bytes)
    if image is None:
        raise MMNError(f"cannot read image '{path}': {why}; check it is a valid image file")
    return image


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

    def can_place_images(self) -> bool:
        """Whether prompts can carry an image: a processor expands its image tokens, or the template
        writes `n_image_tokens` of them (or the model takes no image token in its text)."""
        return self.processor is not None or not self.image_token or bool(self.n_image_tokens)

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
            # One list of images per sample: processors that count image tokens per prompt (Gemma 3,
            # Mllama, SmolVLM) read a flat list as all images belonging to one sample; the others
            # accept both. `labels` (PaliGemma's processor adds them) must not reach generate.
            enc = dict(self.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True))
            enc.pop("labels", None)
            return enc
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

    def encode(self, images: list, prompt: str | list[str], prefix: str | None, device: torch.device,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Inputs for `images` (PIL) under one prompt (+ prefix), or one prompt per image (a list):
        floating tensors in `dtype`, all on `device`."""
        prompts = prompt if isinstance(prompt, list) else [prompt] * len(images)
        if len(prompts) != len(images):
            raise MMNError(f"{len(prompts)} prompts for {len(images)} images: give one prompt, or one per image")
        enc = self(images, [self.text(p, prefix) for p in prompts])
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}


# Model inputs other than input_ids / attention_mask that hold one entry per position.
PER_POSITION_INPUTS = ("mm_token_type_ids", "token_type_ids", "cross_attention_mask")


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
    for key in PER_POSITION_INPUTS:  # other per-position inputs grow with the caption too
        value = inputs.get(key)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (b, t):
            continue
        if key == "mm_token_type_ids":  # per-token modality (Qwen2-VL style): captions are text, 0
            grown = value.new_zeros(b, s)
        elif key == "token_type_ids":  # PaliGemma: prefix 0 (image and prompt), suffix 1 (what is generated)
            grown = value.new_ones(b, s)
        else:  # Mllama's cross_attention_mask [B, T, images, tiles]: as generate does, repeat the last position
            grown = value[:, -1:].expand(b, s, *value.shape[2:])
        full[key] = torch.cat([value, grown], 1)
    if position_ids:
        pos = full["attention_mask"].long().cumsum(-1) - 1
        full["position_ids"] = pos.masked_fill(full["attention_mask"] == 0, 0)
    lengths = torch.tensor([max(len(c), 1) for c in captions], device=ids.device)
    steps = torch.arange(s, device=ids.device)[None, :].expand(b, -1)
    index = t - 1 + torch.minimum(steps, (lengths - 1)[:, None])
    return full, index
