"""The caption phase: every image of a corpus captioned once, by the engine (greedy, KV cache) or by
an OpenAI-compatible server, into a caption file (see mmn_fast.run.captions), resumably.

Batches are formed as `mmn find` forms them (per shard, in order, `batch_size` usable images), so
the engine's captions are those a one-phase find of the same corpus and batch size generates.
"""
from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import MMNError
from ..find.engine import DEFAULT_PROMPT, Engine
from ..io import append_lines
from ..model.inputs import MAX_IMAGE_BYTES
from .captions import MODEL_ERROR, caption_line, open_for_append
from .chat_client import ChatClient
from .corpus import Sample, ShardEnd, iter_samples, open_corpus

log = logging.getLogger(__name__)


class EngineCaptioner:
    """Greedy captions from the loaded model, as `engine.find` generates them (ids kept, EOS included)."""

    def __init__(self, engine: Engine, prompt: str = DEFAULT_PROMPT, prefix: str | None = None,
                 max_new_tokens: int = 32):
        self.engine, self.prompt, self.prefix, self.max_new_tokens = engine, prompt, prefix, max_new_tokens
        model = engine.source or type(engine.model).__name__
        self.source = "engine"
        self.settings = {"source": "engine", "model": os.path.abspath(model) if os.path.exists(model) else model,
                         "prompt": prompt, "prefix": prefix, "max_new_tokens": max_new_tokens,
                         "weights": engine.fingerprint}

    def caption(self, images: list) -> list[dict]:
        """One {"caption", "output_ids"} or {"error"} per image; a batch that fails is retried image
        by image, so that one bad image does not cost the others their captions."""
        try:
            done = self.engine.generate(images, [self.prompt] * len(images), self.max_new_tokens, prefix=self.prefix)
        except MMNError:
            raise
        except Exception as e:  # noqa: BLE001 - one odd image must not stop the corpus
            if len(images) == 1:
                return [{"error": f"{MODEL_ERROR}: {type(e).__name__}: {e}"}]
            out = [r for im in images for r in self.caption([im])]
            if all("error" in r for r in out):
                raise MMNError(f"captioning failed on every image of a batch ({out[0]['error']}): fix the cause and "
                               "rerun the same command to resume") from None
            return out
        return [{"caption": self.engine.caption_text(ids), "output_ids": ids} for ids in done.ids]

    def close(self) -> None:
        """Nothing to release (the engine is the caller's)."""


class ServerCaptioner:
    """Greedy captions from an OpenAI-compatible server; a batch's requests are sent concurrently (a
    server batches them), and any error the client does not retry stops the phase."""

    def __init__(self, client: ChatClient, prompt: str = DEFAULT_PROMPT, prefix: str | None = None,
                 max_new_tokens: int = 32, concurrency: int = 8):
        if prefix is not None:
            raise MMNError("--prefix needs the model itself (a server answers the prompt as a chat turn): leave it "
                           "out with --server, or caption with --model")
        self.client, self.prompt, self.max_new_tokens = client, prompt, max_new_tokens
        self.source = client.url
        self.pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="mmn-caption")
        self.settings = {"source": client.url, "model": client.model, "prompt": prompt, "prefix": None,
                         "max_new_tokens": max_new_tokens}

    def caption(self, images: list) -> list[dict]:
        texts = list(self.pool.map(lambda im: self.client.caption(im, self.prompt, self.max_new_tokens), images))
        return [{"caption": t} for t in texts]

    def close(self) -> None:
        self.client.close()  # retries waiting in the pool's threads end now, so the process can exit
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class CaptionRun:
    """How the caption phase reads the corpus and writes its file (see `caption_corpus`)."""
    batch_size: int = 8
    num_workers: int = 0
    shard_size: int = 1000
    max_image_bytes: int = MAX_IMAGE_BYTES
    overwrite: bool = False
    progress: bool = True


def caption_corpus(captioner, images: str | os.PathLike, out_file: str | os.PathLike, run: CaptionRun) -> dict:
    """Caption every image of the corpus `images` not yet in `out_file` (JSONL, appended a batch at a
    time and fsynced); returns {"written", "before", "errors", "file"}. Images that cannot be read get
    an error line (they are not retried); a killed run resumes when called again with the same
    captioner settings."""
    if run.batch_size < 1:
        raise MMNError(f"--batch-size must be at least 1, got {run.batch_size}")
    corpus = open_corpus(images, shard_size=run.shard_size, max_image_bytes=run.max_image_bytes)
    out_file = Path(out_file)
    done = open_for_append(out_file, captioner.settings, run.overwrite)
    if done:
        log.info("resuming: %d images already captioned in %s", len(done), out_file)
    counts = {"written": 0, "before": len(done), "errors": 0, "file": str(out_file)}
    bar = tqdm(total=corpus.size(), desc="caption", unit="img", disable=not run.progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    pending: dict[int, list[Sample]] = {}
    taken: set[str] = set()  # ids this run has queued or written: a second one is refused, not written twice

    def flush(batch: list[Sample]) -> None:
        if not batch:
            return
        good = [s for s in batch if s.error is None]
        made = iter(captioner.caption([s.image for s in good]) if good else [])
        lines = []
        for s in batch:
            r = {"error": s.error} if s.error is not None else next(made)
            counts["errors"] += "error" in r
            lines.append(caption_line(s.key, s.source, captioner.settings, r.get("caption"), r.get("output_ids"),
                                      r.get("error")))
        append_lines(out_file, lines)
        counts["written"] += len(lines)
        bar.update(len(batch))

    try:
        shards = list(range(corpus.n_shards))
        if done and corpus.size() is not None:  # keys listed without decoding: whole shards already done are skipped
            todo = []
            for shard in shards:
                keys = [s.key for s in corpus.iter_shard(shard, decode=False)]
                if all(k in done for k in keys):
                    bar.update(len(keys))
                else:
                    todo.append(shard)
            shards = todo
        for item in iter_samples(corpus, shards, None, run.num_workers, shard_ends=True):
            if isinstance(item, ShardEnd):
                flush(pending.pop(item.shard, []))
            elif item.key in done:  # captioned by an earlier run
                bar.update(1)
            elif item.key in taken:
                raise MMNError(f"the corpus '{images}' holds the id {item.key!r} twice: a caption file takes one "
                               "caption per id; give the images distinct ids")
            else:
                taken.add(item.key)
                batch = pending.setdefault(item.shard, [])
                batch.append(item)
                if sum(s.error is None for s in batch) >= run.batch_size:
                    flush(pending.pop(item.shard))
    finally:
        bar.close()
    return counts
