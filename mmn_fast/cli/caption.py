"""`mmn caption`: caption a corpus into a JSONL file, with the model itself or an OpenAI-compatible
server; and the caption options `mmn find --two-phase` shares. Bad input raises MMNError (one line, exit 2)."""
from __future__ import annotations

import argparse
import os

from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT
from ..model.inputs import MAX_IMAGE_BYTES
from ..run.captioning import CaptionRun, EngineCaptioner, ServerCaptioner, caption_corpus
from ..run.chat_client import ChatClient
from .common import add_model_options, load_engine


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """--server, --served-model, --api-key, --retries: captions from an OpenAI-compatible server."""
    parser.add_argument("--server", default=None,
                        help="caption with an OpenAI-compatible server at this URL (e.g. http://127.0.0.1:8000: "
                             "vLLM, SGLang, mmn serve) instead of the loaded model")
    parser.add_argument("--served-model", default=None,
                        help="the server's model name (default: the first one GET /v1/models lists)")
    parser.add_argument("--api-key", default=None, help="the server's API key (default: $MMN_SERVER_API_KEY, if set)")
    parser.add_argument("--retries", type=int, default=5,
                        help="tries again after a 429/5xx answer or a dropped connection, with exponential backoff")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one request may take before it counts as dropped (and is tried again)")


def server_captioner(args: argparse.Namespace) -> ServerCaptioner:
    if not args.timeout > 0:
        raise MMNError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    client = ChatClient(args.server, args.served_model, args.api_key or os.environ.get("MMN_SERVER_API_KEY"),
                        retries=args.retries, timeout=args.timeout)
    return ServerCaptioner(client, args.prompt, args.prefix, args.max_new_tokens, concurrency=args.batch_size)


def check_caption_options(args: argparse.Namespace) -> None:
    """What needs neither the model nor the server."""
    if args.max_new_tokens < 1:
        raise MMNError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise MMNError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.server is not None and args.prefix is not None:
        raise MMNError("--prefix needs the model itself (a server answers the prompt as a chat turn): leave it out "
                       "with --server")


def caption_phase(args: argparse.Namespace, out, engine=None) -> tuple[dict, str]:
    """Caption args.images into `out` with the engine, or args.server's when engine is None; returns
    (caption_corpus's counts, where the captions came from). The captioner is closed on the way out."""
    captioner = server_captioner(args) if engine is None else EngineCaptioner(engine, args.prompt, args.prefix,
                                                                               args.max_new_tokens)
    try:
        return caption_corpus(captioner, args.images, out, caption_run(args)), captioner.source
    finally:
        captioner.close()


def caption_run(args: argparse.Namespace) -> CaptionRun:
    return CaptionRun(batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
                      max_image_bytes=args.max_image_bytes, overwrite=args.overwrite, progress=not args.quiet)


def cmd_caption(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.server is None):
        raise MMNError("give --model PATH (caption with the model) or --server URL (with an OpenAI-compatible "
                       "server), one of them")
    check_caption_options(args)
    counts, source = caption_phase(args, args.out, None if args.server is not None else load_engine(args))
    errors = f", {counts['errors']} images could not be captioned (their lines hold the reason)" \
        if counts["errors"] else ""
    print(f"{counts['written']} captions written to {counts['file']} by {source} "
          f"({counts['before']} were there already{errors})")
    return 0


def register(sub) -> None:
    """Add `caption` to the `mmn` sub-command parsers."""
    c = sub.add_parser("caption", help="caption a corpus into a JSONL file (model or OpenAI-compatible server), "
                                       "for mmn find --captions")
    add_model_options(c, required=False)
    add_server_options(c)
    c.add_argument("--images", required=True,
                   help="a folder of images, a JSONL/CSV manifest, WebDataset tar shards or Parquet files")
    c.add_argument("--out", required=True, help="the captions file (JSONL); an existing one is resumed")
    c.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning prompt")
    c.add_argument("--prefix", default=None, help='text the answer starts with, e.g. "An image of" (model only)')
    c.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit, in tokens")
    c.add_argument("--batch-size", type=int, default=8, help="images per forward pass (or requests in flight)")
    c.add_argument("--num-workers", type=int, default=2, help="image-decoding worker processes (0: in-process)")
    c.add_argument("--shard-size", type=int, default=1000, help="images per shard for folders/manifests/parquet")
    c.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help="skip an image larger than this many bytes")
    c.add_argument("--overwrite", action="store_true",
                   help="empty an existing captions file (else it is resumed, and must have the same settings)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_caption)
