"""`mmn serve`'s HTTP API: OpenAI chat completions with neuron patches chosen per request by `model`,
vLLM's adapter endpoints for hot-loading patches, and the neurons behind an answer.

FastAPI app built by `create_app(engine, settings)`; generation runs in the batcher's worker thread,
patch loading and /v1/neurons in the thread pool, never on the event loop. Every error is an
OpenAI-style JSON body with a 4xx status (5xx only for a failure of the server itself).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import __version__
from ..errors import MMNError
from ..find.engine import Engine
from ..find.results import neuron_label
from ..find.vocab import neuron_topk
from ..model.patch_file import SUFFIX
from .batcher import Batcher, BatcherClosed, Job
from .protocol import APIError, ChatRequest, Limits, bad, held_back, parse_chat, parse_neurons, stop_at


@dataclass
class ServeSettings:
    served_model_name: str
    api_key: str | None = None
    allow_runtime_patches: bool = False
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (no process-global state)."""

    def __init__(self, batcher_depth, loaded_patches):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mmn_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("mmn_request_latency_seconds", "request latency by endpoint", ["endpoint"],
                                 registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("mmn_batch_size", "requests per generate batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("mmn_generated_tokens", "new tokens generated", registry=r)
        self.tokens_per_s = Gauge("mmn_tokens_per_second", "new tokens per second of the last batch", registry=r)
        Gauge("mmn_queue_depth", "requests waiting for a batch", registry=r).set_function(batcher_depth)
        Gauge("mmn_loaded_patches", "patches loaded (servable by name)", registry=r).set_function(loaded_patches)

    def on_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.tokens.inc(tokens)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None


def _patch_file(path: str) -> Path:
    """vLLM's lora_path is an adapter folder: a folder holding one patch file works too."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(f"*{SUFFIX}"))
        if len(found) != 1:
            raise bad(f"lora_path {path!r} is a folder with {len(found)} *{SUFFIX} files; give the patch file",
                      "lora_path")
        return found[0]
    if not p.is_file():
        raise APIError(404, f"lora_path {path!r} does not exist", param="lora_path", code="not_found")
    return p


class Server:
    """The state behind the routes: engine, batcher, metrics, settings."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.metrics = Metrics(lambda: self.batcher.depth, lambda: len(engine.patches.list()))
        self.batcher = Batcher(engine, settings.max_batch_size, settings.batch_wait_ms, self.metrics.on_batch)
        self.created = int(time.time())

    # ------------------------------------------------------------------ models and patches
    def stack_of(self, model: str) -> tuple:
        if model == self.settings.served_model_name:
            return ()
        if model in self.engine.patches:
            with contextlib.suppress(MMNError):  # unloaded in between: the not-found answer below
                return (self.engine.patches.get(model),)
        raise APIError(404, f"the model {model!r} does not exist: use {self.settings.served_model_name!r} (the base "
                            "model) or a loaded patch's name (GET /v1/models)", "invalid_request_error", "model",
                       "model_not_found")

    def models(self) -> dict:
        base = self.settings.served_model_name
        card = {"object": "model", "created": self.created, "owned_by": "mmn_fast", "root": self.engine.source or base}
        data = [{"id": base, "parent": None, **card}]
        data += [{"id": p["name"], "parent": base, **card, "root": p["name"], "mmn_patch": p}
                 for p in self.engine.patches.list()]
        return {"object": "list", "data": data}

    def load_patch(self, body) -> str:
        name, path = body.get("lora_name") if isinstance(body, dict) else None, (body or {}).get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise bad("give 'lora_name' and 'lora_path' (a .mmnpatch.safetensors file)")
        if name == self.settings.served_model_name:
            raise bad(f"{name!r} is the base model's id; pick another name", "lora_name")
        if name in self.engine.patches:
            raise bad(f"the patch {name!r} has already been loaded; unload it first", "lora_name")
        try:
            self.engine.patches.load(name, _patch_file(path))
        except MMNError as e:
            raise bad(f"cannot load patch {name!r}: {e}", "lora_path") from None
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload_patch(self, body) -> str:
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise bad("give 'lora_name'", "lora_name")
        try:
            self.engine.patches.unload(name)
        except MMNError as e:
            raise APIError(404, str(e), param="lora_name", code="not_found") from None
        return f"Success: LoRA adapter '{name}' removed successfully."

    # ------------------------------------------------------------------ chat
    def submit(self, req: ChatRequest, stack: tuple, on_token=None):
        try:
            return self.batcher.submit(Job(req.image, req.prompt, req.max_tokens, stack, req.sampling, on_token))
        except BatcherClosed:
            raise APIError(503, "the server is shutting down", "server_error") from None

    def finish(self, req: ChatRequest, ids: list[int]) -> tuple[str, str]:
        """(answer text, finish_reason) of a row's ids."""
        text, stopped = stop_at(self.engine.caption_text(ids), req.stop)
        ended = bool(ids) and ids[-1] in self.engine.eos_ids
        return text, "stop" if stopped or ended or len(ids) < req.max_tokens else "length"

    def completion(self, req: ChatRequest, ids: list[int], n_prompt: int) -> dict:
        text, reason = self.finish(req, ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": f"mmn_fast-{__version__}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                          "total_tokens": n_prompt + len(ids)}}

    async def stream(self, req: ChatRequest, stack: tuple):
        """Server-sent events in OpenAI's chunk format; the chunks concatenate to the non-streamed answer."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        future = self.submit(req, stack, lambda tok: loop.call_soon_threadsafe(queue.put_nowait, tok))
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, None))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, reason=None, usage=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "system_fingerprint": f"mmn_fast-{__version__}",
                    "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            if usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        tokens, sent = [], ""
        while True:
            tok = await queue.get()
            if tok is None:
                break
            if len(tokens) >= req.max_tokens or (tokens and tokens[-1] in self.engine.eos_ids):
                continue  # the batch runs on for other rows
            tokens.append(tok)
            text, stopped = stop_at(self.engine.caption_text(tokens), req.stop)
            safe = text if stopped else text.rstrip()
            safe = safe[: len(safe) - held_back(safe, req.stop)] if not stopped else safe
            if safe.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                continue
            if safe.startswith(sent) and len(safe) > len(sent):
                yield chunk({"content": safe[len(sent):]})
                sent = safe
        try:
            ids, n_prompt = future.result()
        except MMNError as e:
            yield f"data: {json.dumps(bad(str(e)).body())}\n\n"
            return
        text, reason = self.finish(req, ids)
        if text.startswith(sent) and len(text) > len(sent):
            yield chunk({"content": text[len(sent):]})
        yield chunk({}, reason)
        if req.include_usage:
            yield chunk({}, usage={"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                                   "total_tokens": n_prompt + len(ids)})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ neurons
    def neurons(self, req: ChatRequest, stack: tuple) -> dict:
        """The `mmn find` record of this request's answer, each neuron with its top tokens (of the
        patched output vector where the request's patch changed it)."""
        x = req.extra
        eng = self.engine
        result = eng.find([req.image], patches=[stack], prompt=req.prompt, concepts=x["concepts"],
                          top_k=x["top_k"], activation=x["activation"], positions=x["positions"],
                          max_new_tokens=req.max_tokens, batch_size=1)[0]
        with eng.swap_lock:
            plan = eng.patches.plan([stack])
            edits = plan.row_edits(0) if plan is not None else {}
            concepts = []
            for c in result.concepts:
                neurons = [_neuron_json(rec) for rec in c.neurons]
                if x["top_tokens"] and neurons:
                    keys = [(n["layer"], n["expert"], n["index"]) if "expert" in n else (n["layer"], n["index"])
                            for n in neurons]
                    for n, toks in zip(neurons, self._top_tokens(keys, edits, x["top_tokens"])):
                        n["top_tokens"] = toks
                concepts.append({"word": c.word, "token_id": c.token_id, "step": c.step, "neurons": neurons})
        n_prompt, n_out = len(result.prompt_ids), len(result.output_ids)
        return {"id": f"neurons-{uuid.uuid4().hex}", "object": "neurons", "created": int(time.time()),
                "model": req.model, "caption": result.caption, "output_ids": result.output_ids, "concepts": concepts,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    def _top_tokens(self, neurons: list[tuple], edits: dict, k: int) -> list[list[dict]]:
        """Top tokens of each neuron, (layer, index) or (layer, expert, index): its output vector, the request's
        patched one where its patch (dense layers only) changed it."""
        ad = self.engine.adapter
        dev = ad.unembed_weight().device
        cols = []
        for key in neurons:
            l, i, expert = key[0], key[-1], (key[1] if len(key) == 3 else -1)
            e = edits.get(l) if expert == -1 else None
            hit = (e.idx == i).nonzero() if e is not None else None
            cols.append(e.new[int(hit[0, 0])].to(dev) if hit is not None and hit.numel()
                        else ad.unit_weight(l, expert)[:, i].to(dev))
        with torch.no_grad():
            values, ids = neuron_topk(self.engine, torch.stack(cols, 1), k)  # [N, k]
        tok = self.engine.tokenizer
        return [[{"token": t, "id": j, "logit": v} for t, j, v in zip(tok.convert_ids_to_tokens(row_ids), row_ids, row_v)]
                for row_ids, row_v in zip(ids.tolist(), values.tolist())]


def _neuron_json(rec: list) -> dict:
    """A find record [layer, index, score] (or [layer, expert, index, score]) as the API writes it."""
    if len(rec) == 4:
        l, e, i, s = rec
        return {"neuron": neuron_label(l, i, e), "layer": l, "expert": e, "index": i, "score": s}
    l, i, s = rec
    return {"neuron": neuron_label(l, i), "layer": l, "index": i, "score": s}


KNOWN = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/neurons",
                   "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


class Guard:
    """ASGI middleware: the API key check (every endpoint but /health) and per-request metrics. Plain ASGI,
    not Starlette's BaseHTTPMiddleware, which costs about a millisecond a request."""

    def __init__(self, app, server: "Server", api_key: str | None):
        self.app, self.server = app, server
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]
        endpoint = path if path in KNOWN else "other"
        if self.expected is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.server.metrics.requests.labels(endpoint, "401").inc()
                response = _error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                           "authentication_error", code="invalid_api_key"))
                return await response(scope, receive, send)

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.server.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    server = Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(server.batcher.close)  # finish what was accepted, then stop

    app = FastAPI(title="mmn_fast", version=__version__, lifespan=lifespan)
    app.state.server = server

    app.add_middleware(Guard, server=server, api_key=settings.api_key)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return _error(e)

    @app.exception_handler(404)
    async def not_found(request: Request, _e):
        return _error(APIError(404, f"no endpoint {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, _e):
        return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await run_in_threadpool(parse_chat, await _json(request), settings.limits)  # decodes the image
        stack = server.stack_of(req.model)
        if req.stream:
            return StreamingResponse(server.stream(req, stack), media_type="text/event-stream")
        try:
            ids, n_prompt = await asyncio.wrap_future(server.submit(req, stack))
        except MMNError as e:
            raise bad(str(e), "model") from None
        return JSONResponse(server.completion(req, ids, n_prompt))

    @app.post("/v1/neurons")
    async def neurons(request: Request):
        req = await run_in_threadpool(parse_neurons, await _json(request), settings.limits)
        stack = server.stack_of(req.model)
        try:
            return JSONResponse(await run_in_threadpool(server.neurons, req, stack))
        except MMNError as e:
            raise bad(str(e)) from None

    def runtime_allowed():
        if not settings.allow_runtime_patches:
            raise APIError(403, "loading patches at runtime is off: start the server with --allow-runtime-patches",
                           code="runtime_patches_disabled")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        runtime_allowed()
        return PlainTextResponse(await run_in_threadpool(server.load_patch, await _json(request)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        runtime_allowed()
        return PlainTextResponse(await run_in_threadpool(server.unload_patch, await _json(request)))

    return app
