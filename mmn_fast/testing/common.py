"""Shared pieces of the tiny checkpoints: offline tokenizers, an image processor, random images."""
from __future__ import annotations

import contextlib
import functools
import re
import string
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)  # ids 0..4, LLaMA-like (<unk>=0, <s>=1, </s>=2)
VOCAB_SIZE = 420

_NOUNS = ("dog cat bird horse car bus ball cup chair table tree house man woman sky water field road "
          "sheep cow boat train box bed door flower grass street park bear cloud room")
_RARE = ("elephant zebra giraffe kangaroo umbrella skateboard motorcycle refrigerator penguin "
         "butterfly helicopter lighthouse pineapple crocodile bicycle mountain")
_ADJECTIVES = "red blue green yellow black white brown orange pink purple grey small big large old young"
_CORPUS_TEMPLATES = (
    "a {adj} {noun} is sitting on the {noun2} .",
    "the {noun} and the {noun2} are in the {adj} field .",
    "there is a {adj} {noun} next to a {noun2} .",
    "USER: <image>\nDescribe the image. ASSISTANT: a {adj} {noun} with a {noun2} .",
    "an image of a {noun} standing near the {adj} {noun2} .",
    "this is a photo of two {adj} {noun}s and one {noun2} .",
    "What is in the picture? A {noun} beside the {noun2}, on the left of the {adj} wall!",
)


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """A few hundred deterministic English-ish sentences about animals, colours and objects."""
    nouns, rare, adjs = _NOUNS.split(), _RARE.split(), _ADJECTIVES.split()
    rng = np.random.default_rng(1234)
    lines = []
    for i in range(400):
        # common words often, rare ones (elephant, zebra, ...) seldom: those end up as several sub-tokens
        n1, n2 = (rare[int(rng.integers(len(rare)))] if rng.random() < 0.03 else nouns[int(rng.integers(len(nouns)))]
                  for _ in range(2))
        t = _CORPUS_TEMPLATES[i % len(_CORPUS_TEMPLATES)]
        lines.append(t.format(adj=adjs[int(rng.integers(len(adjs)))], noun=n1, noun2=n2))
    # Single letters as words: BPE learns a "▁x" token for every initial letter, so a rare word starts
    # with a piece holding its first letter (as in LLaMA), never with a bare "▁" that decodes to nothing.
    lines += [" ".join(string.ascii_letters)] * 20
    return tuple(lines)


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # split at spaces, punctuation, digits and newlines
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Punctuation(behavior="isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split("\n", behavior="isolated")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok.to_str()


def tiny_tokenizer(*, named_image_token: bool = True):
    """LLaMA-like BPE `PreTrainedTokenizerFast` (~420 tokens), built offline and deterministically.

    <unk>=0, <s>=1 (prepended), </s>=2, <pad>=3, <image>=4; Metaspace pre-tokenizer, so common words
    are single "▁word" tokens, rare ones (e.g. "zebra") several sub-tokens, and decoding gives plain text.
    named_image_token: expose `<image>` as `tokenizer.image_token` / `image_token_id` (a string).
    """

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, extra_special_tokens={"image_token": IMAGE} if named_image_token else None,
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=2048)


@functools.lru_cache(maxsize=1)
def _bert_tokenizer_json() -> str:

    # A fixed vocabulary (no training, so no tie-breaking): specials, characters, "##" continuations,
    # then every corpus word, sorted. Other words split into a first character and "##" pieces.
    words = sorted({w for line in _corpus() for w in re.findall(r"[a-z]+", line.lower()) if len(w) > 1})
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + pieces + words))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens(specials)
    return tok.to_str()


def tiny_bert_tokenizer():
    """Lower-casing BERT-style WordPiece `PreTrainedTokenizerFast` (~230 tokens), e.g. for the Q-Former."""

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bert_tokenizer_json()), cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]", padding_side="right",
        model_input_names=["input_ids", "attention_mask"], model_max_length=512)


def random_images(n: int, size: int = 32, seed: int = 0) -> list:
    """`n` deterministic RGB PIL images: low-amplitude noise over a background with a coloured rectangle."""

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        arr = rng.integers(0, 48, size=(size, size, 3)) + rng.integers(0, 200, size=3)  # noisy background
        y0, x0 = rng.integers(0, size // 2, size=2)
        h, w = rng.integers(size // 4, size // 2 + 1, size=2)
        arr[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3)  # a flat coloured rectangle
        images.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))  # [H, W, 3] uint8: RGB
    return images


def image_processor(kind: str, size: int):
    """A PIL-backend CLIP or BLIP image processor at `size` px (transformers 5's default backend needs torchvision)."""

    if kind == "clip":
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                   do_resize=True, do_center_crop=True)
    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    return cls(size={"height": size, "width": size}, do_resize=True)


def llama_config(tokenizer, *, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
                 max_positions: int = 1024, **kw):
    """A small `LlamaConfig` (SwiGLU MLP, untied lm_head) sized for `tokenizer`."""

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, **kw)


def generation_config(tokenizer):
    """Greedy decoding with the tokenizer's bos/eos/pad ids."""

    return GenerationConfig(do_sample=False, num_beams=1, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def heads_for(hidden_size: int) -> int:
    """Attention heads with head_dim 16..64 that divide `hidden_size`."""
    for head_dim in (16, 32, 64, 8, 4, 2, 1):
        if hidden_size % head_dim == 0 and hidden_size // head_dim <= 16:
            return hidden_size // head_dim
    return 1


def out_dir(path) -> Path:
    """`path` as a Path, created if missing."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def as_dtype(dtype) -> torch.dtype:
    """torch.float32 or "float32" -> torch.float32."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@contextlib.contextmanager
def quiet():
    """Hide transformers' progress bars (e.g. "Writing model shards") for the duration."""

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
