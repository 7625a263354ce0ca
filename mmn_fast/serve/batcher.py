"""Request batching: a queue and one worker thread that runs `Engine.generate` on batches of requests.

Requests wait at most `batch_wait_ms` for companions, up to `max_batch_size` per batch; only requests
with equal sampling settings share a batch (greedy ones always can), and rows with different patches
(or none) share one forward through the per-request patch path. Generation never runs on the event
loop: callers get a `concurrent.futures.Future` (and, for streaming, a per-token callback called from
the worker thread).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MMNError
from ..find.engine import Engine
from ..find.generation import Generated, Sampling


class BatcherClosed(RuntimeError):
    """The server is shutting down: no new requests are taken."""


@dataclass
class Job:
    """One request: its image, prompt, token limit, patch stack and sampling; `future` gets
    (token ids, prompt tokens)."""

    image: object
    prompt: str
    max_tokens: int
    stack: tuple  # resolved patches, () for the base model
    sampling: Sampling
    on_token: Callable[[int], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> Sampling:
        """What must be equal to share a batch: greedy requests all match."""
        return Sampling() if self.sampling.greedy else self.sampling


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int = 8, batch_wait_ms: float = 5.0,
                 on_batch: Callable[[int, int, float], None] | None = None):
        """on_batch(batch size, new tokens, seconds): called after each batch (metrics)."""
        if max_batch_size < 1 or batch_wait_ms < 0:
            raise MMNError("--max-batch-size must be >= 1 and --batch-wait-ms >= 0")
        self.engine, self.max_batch_size, self.wait = engine, max_batch_size, batch_wait_ms / 1000
        self.on_batch = on_batch
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="mmn-batcher", daemon=True)
        self._worker.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return len(self._jobs)

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; finish the queued and running ones; stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None  # closed and drained
            first = self._jobs.popleft()
            batch, deadline = [first], time.monotonic() + self.wait
            while len(batch) < self.max_batch_size:
                same = next((j for j in self._jobs if j.key == first.key), None)
                if same is not None:
                    self._jobs.remove(same)
                    batch.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)
            del batch  # while waiting for the next one, hold no request (nor the patches it named)

    def _run(self, batch: list[Job]) -> None:
        start = time.monotonic()
        try:
            done = self._generate(batch)
        except MMNError as e:
            if len(batch) == 1:
                self._fail(batch, e)
                return
            for job in batch:  # one request's patch no longer fits (say): the others still get answers
                self._run([job])
            return
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            self._fail(batch, e)
            return
        for j, (ids, n_prompt) in enumerate(zip(done.ids, done.prompt_tokens)):
            batch[j].future.set_result((ids, n_prompt))
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(len(i) for i in done.ids), time.monotonic() - start)

    def _generate(self, batch: list[Job]) -> Generated:
        callbacks = [j.on_token for j in batch]

        def on_token(row: int, token: int) -> None:
            if callbacks[row] is not None:
                callbacks[row](token)

        return self.engine.generate([j.image for j in batch], [j.prompt for j in batch],
                                    [j.max_tokens for j in batch], [j.stack for j in batch], batch[0].sampling,
                                    on_token if any(callbacks) else None)

    @staticmethod
    def _fail(batch: list[Job], exc: BaseException) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)
