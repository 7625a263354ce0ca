"""What every `mmn` command that loads a model shares: its model options, and the engine they describe."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

from ..find.concepts import check_word_list
from ..find.engine import Engine, load

CHECKPOINT_HELP = "local Hugging Face checkpoint directory"


def add_model_options(parser: argparse.ArgumentParser, required: bool = True, model_help: str = CHECKPOINT_HELP,
                      ) -> None:
    """--model, --device, --dtype, --backend, --device-map, --kv-cache: read back by `load_engine`."""
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: checkpoint's)")
    parser.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                        help="kernels (default: $MMN_BACKEND, else auto: Triton on CUDA)")
    parser.add_argument("--device-map", default=None,
                        help='"auto": spread one model over several GPUs (accelerate)')
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "static", "dynamic"],
                        help="KV cache for decoding captions (default auto: static where the model supports it)")


def load_engine(args: argparse.Namespace, model: str | None = None) -> Engine:
    """The engine of `args`' model options; `model` overrides --model (e.g. the run's own checkpoint)."""
    return load(model or args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                device_map=args.device_map, kv_cache=getattr(args, "kv_cache", "auto"))



def check_words_before_loading(args: argparse.Namespace, words: list[str]) -> None:
    """Refuse words the checkpoint's tokenizer cannot spell before the model loads (minutes on a 7B
    model). A checkpoint without a readable tokenizer is left to `load_engine` to report."""
    path = Path(args.model)
    if not words or not (path / "config.json").is_file():
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return
    check_word_list(tokenizer, words)


def deprecated(old: str, new: str) -> None:
    """One line on stderr: an old spelling still works, and which one replaces it."""
    print(f"mmn: note: {old} is deprecated and will go; use {new}", file=sys.stderr)
