"""`mmn serve`: the OpenAI-compatible server (mmn_fast/serve/app.py) under uvicorn."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

import uvicorn

from ..errors import MMNError
from ..model.inputs import MAX_IMAGE_BYTES
from ..serve.app import ServeSettings, create_app
from ..serve.protocol import Limits
from .common import add_model_options, load_engine


def _named_patches(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise MMNError(f"--patch takes NAME=FILE (e.g. red2blue=red2blue.mmnpatch.safetensors), got {v!r}")
        out.append((name, path))
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    patches = _named_patches(args.patch)
    if args.allowed_media_path is not None and not Path(args.allowed_media_path).is_dir():
        raise MMNError(f"--allowed-media-path '{args.allowed_media_path}' is not a folder")
    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-images", args.max_images, 1), ("--max-image-pixels", args.max_image_pixels, 1),
                             ("--port", args.port, 0)):
        if value < low:
            raise MMNError(f"{flag} must be at least {low}, got {value}")
    if args.batch_wait_ms < 0:
        raise MMNError(f"--batch-wait-ms must be at least 0, got {args.batch_wait_ms}")
    engine = load_engine(args)
    name = args.served_model_name or args.model
    for patch_name, path in patches:
        if patch_name == name:
            raise MMNError(f"--patch name {patch_name!r} is the base model's id; pick another")
        engine.patches.load(patch_name, path)
    limits = Limits(max_tokens=args.max_tokens, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                    max_image_bytes=MAX_IMAGE_BYTES,
                    allowed_media_path=Path(args.allowed_media_path) if args.allowed_media_path else None)
    settings = ServeSettings(name, args.api_key, args.allow_runtime_patches, args.max_batch_size, args.batch_wait_ms,
                             limits)
    app = create_app(engine, settings)
    print(f"mmn serve: {name!r} with {len(patches)} patch(es) on http://{args.host}:{args.port}/v1", flush=True)
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish, then the app's
    # lifespan drains the batcher. On its way out uvicorn re-raises the signal it caught to the handler
    # that was there before it; for SIGTERM that is this no-op, so a requested shutdown exits 0.
    previous = signal.signal(signal.SIGTERM, _shutdown_done)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _shutdown_done(signum, frame) -> None:
    """SIGTERM outside uvicorn's own handling (re-raised after its graceful shutdown): nothing left to do."""


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API, patches per request")
    add_model_options(s)
    s.add_argument("--served-model-name", default=None, help="the base model's id in requests (default: --model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one)")
    s.add_argument("--patch", action="append", default=[], metavar="NAME=FILE",
                   help="a patch to serve under NAME (repeat for several)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    s.add_argument("--max-batch-size", type=int, default=8, help="most requests per generate batch")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for companions")
    s.add_argument("--allow-runtime-patches", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    s.add_argument("--allowed-media-path", default=None, help="folder whose image files requests may name")
    s.add_argument("--max-tokens", type=int, default=256, help="most new tokens a request may ask for")
    s.add_argument("--max-images", type=int, default=1, help="most images per request (the engine captions one)")
    s.add_argument("--max-image-pixels", type=int, default=16_000_000, help="largest image, in pixels")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    s.set_defaults(func=cmd_serve)
