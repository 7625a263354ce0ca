"""The OpenAI request schema as the server reads it: chat messages -> (image, prompt, settings).

Every problem is an `APIError`: an HTTP status and an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` naming what was wrong and what to do.

How chat messages map to the engine's prompt (docs/serving.md): the request holds exactly one image
(an `image_url` part of a user message; `--max-images` allows more only to refuse them with a clear
message, as the engine captions one image per row); the prompt is the text of the messages in order,
system messages first, joined by blank lines; assistant turns are kept as text. One user message
[image, text T] gives the prompt T exactly, so the answer is `engine.caption([image], prompt=T)`.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..find.generation import Sampling
from ..model.inputs import MAX_IMAGE_BYTES


class APIError(Exception):
    """An error answer: HTTP `status` and an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's options)."""

    max_tokens: int = 256  # most new tokens per request
    max_images: int = 1
    max_image_pixels: int = 16_000_000
    max_image_bytes: int = MAX_IMAGE_BYTES
    allowed_media_path: Path | None = None  # local files (file:// or a path) only under this folder


@dataclass
class ChatRequest:
    model: str
    image: Image.Image
    prompt: str
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)  # the neurons endpoint's own fields


def _number(body: dict, key: str, kind, default, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad(f"'{key}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{key}' must be between {low} and {high}, got {value}", key)
    return kind(value)


def _image_from_bytes(data: bytes, limits: Limits, what: str) -> Image.Image:
    if len(data) > limits.max_image_bytes:
        raise bad(f"{what} is {len(data)} bytes, over the limit of {limits.max_image_bytes}", "messages")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise bad(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels} "
                      "(--max-image-pixels)", "messages", "image_too_large")
        img.load()
        return img.convert("RGB")
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bad(f"{what} is not a readable image ({str(e).splitlines()[0][:200]})", "messages") from None


def load_image_url(url: str, limits: Limits) -> Image.Image:
    """A `data:image/...;base64,` URL, or a local file under --allowed-media-path; never a network fetch."""
    if not isinstance(url, str) or not url:
        raise bad("image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise bad("a data URL image must be base64: data:image/png;base64,...", "messages")
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise bad(f"the data URL image is over the limit of {limits.max_image_bytes} bytes", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad("the data URL's base64 payload is malformed", "messages") from None
        return _image_from_bytes(data, limits, "the data URL image")
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise bad("this server does not fetch images over the network: send a data: URL, or a file under "
                  "--allowed-media-path", "messages")
    if parsed.scheme not in ("", "file"):
        raise bad(f"unsupported image URL scheme {parsed.scheme!r}: use data: or file:", "messages")
    if limits.allowed_media_path is None:
        raise bad("local image files are not allowed: start the server with --allowed-media-path DIR, or send "
                  "a data: URL", "messages")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    root = limits.allowed_media_path.resolve()
    real = path.resolve()
    if root != real and root not in real.parents:
        raise APIError(403, f"image path {str(path)!r} is outside the allowed media folder", param="messages",
                       code="forbidden_path")
    if not real.is_file():
        raise bad(f"image file {str(path)!r} does not exist or is not a regular file", "messages")
    with open(real, "rb") as f:
        data = f.read(limits.max_image_bytes + 1)
    return _image_from_bytes(data, limits, f"image file {path.name!r}")


def _text_of(content, role: str) -> tuple[list[str], list[str]]:
    """(texts, image URLs) of one message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad(f"a {role} message's content must be a string or a list of parts", "messages")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if role != "user":
                raise bad("images belong in user messages", "messages")
            urls.append(url)
        else:
            raise bad(f"unsupported content part {str(part)[:80]}: use 'text' and 'image_url' parts", "messages")
    return texts, urls


def parse_chat(body, limits: Limits) -> ChatRequest:
    """A /v1/chat/completions (or /v1/neurons) body -> ChatRequest, or APIError."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the base model's id or a loaded patch's name (GET /v1/models)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    system, turns, urls = [], [], []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"unsupported message role {role!r}: use system, user or assistant", "messages")
        texts, found = _text_of(m.get("content"), role)
        (system if role in ("system", "developer") else turns).append("\n".join(texts))
        urls += found
    if len(urls) > limits.max_images:
        raise bad(f"{len(urls)} images in one request; this server takes at most {limits.max_images} "
                  "(one image per request: send several requests)", "messages", "too_many_images")
    if not urls:
        raise bad("the request holds no image: add a user content part {'type': 'image_url', 'image_url': "
                  "{'url': 'data:image/png;base64,...'}}", "messages")
    if body.get("n", 1) != 1:
        raise bad("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, min(16, limits.max_tokens), 1,
                         limits.max_tokens)
    top_p = _number(body, "top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("'top_p' must be above 0", "top_p")
    sampling = Sampling(_number(body, "temperature", float, 0.0, 0.0, 2.0), top_p,
                        _number(body, "seed", int, None, 0, 2 ** 63 - 1))
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    prompt = "\n\n".join([t for t in system if t] + ["\n".join(t for t in turns if t)])
    image = load_image_url(urls[0], limits)
    return ChatRequest(model, image, prompt, max_tokens, sampling, stop, stream,
                       bool(isinstance(opts, dict) and opts.get("include_usage")))


def parse_neurons(body, limits: Limits) -> ChatRequest:
    """A /v1/neurons body: the chat fields plus top_k, concepts, activation, positions, top_tokens."""
    req = parse_chat(body, limits)
    if req.stream:
        raise bad("/v1/neurons does not stream", "stream")
    concepts = body.get("concepts", "all")
    if not (concepts in ("all", "nouns") or (isinstance(concepts, list) and concepts
                                            and all(isinstance(c, str) and c for c in concepts))):
        raise bad("'concepts' must be 'all', 'nouns' or a list of words", "concepts")
    activation = body.get("activation", "down_proj_input")
    if activation not in ("down_proj_input", "act_fn"):
        raise bad("'activation' must be 'down_proj_input' or 'act_fn'", "activation")
    positions = body.get("positions", "last")
    if positions not in ("last", "image"):
        raise bad("'positions' must be 'last' or 'image'", "positions")
    req.extra = {"top_k": _number(body, "top_k", int, 10, 1, 1000), "concepts": concepts, "activation": activation,
                 "positions": positions, "top_tokens": _number(body, "top_tokens", int, 5, 0, 50)}
    return req


def stop_at(text: str, stops: list[str]) -> tuple[str, bool]:
    """text cut before the first stop string (and whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of streamed text might still start a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
