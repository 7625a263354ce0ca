"""A small client of OpenAI-compatible chat servers (vLLM, SGLang, `mmn serve`, ...) for captioning:
standard library only (urllib). An image goes as a PNG data URL in an `image_url` content part,
greedy (temperature 0). 429 and 5xx answers and dropped connections are retried with exponential
backoff (a `Retry-After` header is honoured); any other error is one MMNError naming the URL and
the status."""
from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import urllib.error
import urllib.request

from ..errors import MMNError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_DELAY = 30.0  # seconds between two tries, at most


def png_data_url(image) -> str:
    """A PIL image as a lossless PNG data URL: the server sees the pixels the engine would."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class ChatClient:
    """url: the server's root (`http://host:8000`; a trailing `/v1` is accepted). model: the served
    model's name (None: the first one `GET /v1/models` lists). retries: further tries of a request
    after a 429/5xx answer or a dropped connection; backoff: the first wait, in seconds, doubled
    each time."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, retries: int = 5,
                 timeout: float = 600.0, backoff: float = 1.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise MMNError(f"--server must be an http:// or https:// URL (the server's root, e.g. "
                           f"http://127.0.0.1:8000), got {url!r}")
        if retries < 0:
            raise MMNError(f"--retries must be 0 or more, got {retries}")
        root = url.rstrip("/")
        self.root = root[:-3] if root.endswith("/v1") else root
        self.url, self.api_key, self.retries, self.timeout, self.backoff = url, api_key, retries, timeout, backoff
        self.stopped = threading.Event()  # close(): no further try, and waits between tries end at once
        self.model = model or self._first_model()
        if model is not None:
            served = self.models(first=True)
            if served and model not in served:
                raise MMNError(f"the server at {self.url} serves no model {model!r}; it serves: {', '.join(served)} "
                               "(pick one with --served-model)")

    # ------------------------------------------------------------------ requests
    def _request(self, method: str, path: str, body: dict | None = None, first: bool = False) -> dict:
        """The JSON answer; `first`: the first contact, where a refused connection is not retried."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"{method} {self.root}{path}"
        for attempt in range(self.retries + 1):
            if self.stopped.is_set():
                raise MMNError(f"captioning with {self.url} was stopped")
            req = urllib.request.Request(self.root + path, data=data, headers=headers, method=method)
            last = attempt == self.retries
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                e.close()
                if e.code in RETRY_STATUS and not last:
                    self._wait(attempt, e.headers.get("Retry-After") if e.headers else None)
                    continue
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise MMNError(f"the server at {self.url} answered {e.code} to {where}{tries}: {message}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if first:
                    raise MMNError(f"no server answers at {self.url} ({reason}): start one (`mmn serve`, "
                                   "`vllm serve`) or check --server") from None
                if not last:
                    self._wait(attempt, None)
                    continue
                raise MMNError(f"the server at {self.url} did not answer {where} after {attempt + 1} tries "
                               f"({reason})") from None
            try:
                return json.loads(text)
            except ValueError:
                raise MMNError(f"the server at {self.url} answered {where} with something other than JSON "
                               f"({text[:80]!r}): is it an OpenAI-compatible server?") from None
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * 2 ** attempt
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                pass
        self.stopped.wait(min(max(delay, 0.0), MAX_DELAY))

    def close(self) -> None:
        """Stop: requests waiting to try again give up now (one already sent ends with its answer or timeout)."""
        self.stopped.set()

    # ------------------------------------------------------------------ API
    def models(self, first: bool = False) -> list[str]:
        answer = self._request("GET", "/v1/models", first=first)
        data = answer.get("data") if isinstance(answer, dict) else None
        return [m["id"] for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _first_model(self) -> str:
        served = self.models(first=True)
        if not served:
            raise MMNError(f"the server at {self.url} lists no model at GET /v1/models: name one with --served-model")
        return served[0]

    def caption(self, image, prompt: str, max_tokens: int) -> str:
        """The server's greedy answer to `prompt` about `image` (a PIL image)."""
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                                         {"type": "text", "text": prompt}]}]}
        answer = self._request("POST", "/v1/chat/completions", body)
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise MMNError(f"the server at {self.url} answered POST /v1/chat/completions without a message "
                           f"content ({json.dumps(answer)[:120]})")
        return text.strip()


def _error_message(e: urllib.error.HTTPError) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start, else the reason."""
    try:
        raw = e.read()
    except OSError:
        raw = b""
    try:
        body = json.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        msg = err.get("message") if isinstance(err, dict) else (err or body.get("detail") or body.get("message"))
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    text = raw.decode("utf-8", errors="replace").strip()
    return text[:200] if text else str(e.reason)
