"""Caption files: one JSON line per image, as `mmn caption` writes them and `mmn find --captions`
(and `--two-phase`) scores them teacher-forced.

A line is `{"id", "image", "caption", "output_ids" (the engine's ids, EOS included), "source"
("engine" or the server's URL), "model", "prompt", "prefix", "max_new_tokens", "weights" (the
engine's weight fingerprint)}`, or, for an image that could not be captioned, `"error"` in place of
the caption. A file written by hand needs only `id` and `caption` (text) or `output_ids`. Ids are
the corpus' sample keys (the `id` of results.jsonl); each id once.

Lines are appended a batch at a time and fsynced; a kill leaves at most one torn last line, which
the next `mmn caption` drops and redoes (`open_for_append`). Reading (`CaptionIndex`) keeps each id's
byte offset only, so a caption file of millions of lines costs little memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import MMNError
from ..io import atomic_open, cut_torn_tail
from .corpus import Corpus

log = logging.getLogger(__name__)

# What a caption line records of how it was made; a resumed `mmn caption` must match them all.
MODEL_ERROR = "the model could not take it"  # a caption line's error from the model, not the image: retried on resume
SETTING_KEYS = ("source", "model", "prompt", "prefix", "max_new_tokens", "weights")
CAPTION_WINDOW = 4  # find --captions sorts this many batches by caption length, then batches them


class CaptionIndex:
    """Where each id's line starts in a caption file; `entry(id)` reads it back.

    torn: what to do with an unterminated last line that is not JSON (a kill mid-write): "error"
    (reading a file to score) or "ignore" (it is about to be cut, see `open_for_append`).
    settings: the first caption line's SETTING_KEYS (None for a file without lines);
    digest: sha256 of the complete lines, so that a run can tell the file changed under it."""

    def __init__(self, path: str | os.PathLike, torn: str = "error"):
        self.path = Path(path)
        self.offsets: dict[str, int] = {}
        self.settings: dict | None = None
        self.errors = 0  # lines that record an image which could not be captioned
        h = hashlib.sha256()
        if not self.path.is_file():
            raise MMNError(f"captions file '{self.path}' does not exist (or is not a file): give the JSONL file "
                           "`mmn caption` wrote (one line per image: id and caption or output_ids)")
        with open(self.path, "rb") as f:
            offset, line_no = 0, 0
            for raw in f:
                line_no += 1
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    h.update(raw)
                    continue
                try:
                    rec = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    if not raw.endswith(b"\n"):
                        if torn == "ignore":
                            break
                        raise MMNError(f"{self.path}:{line_no}: the last line is cut short (a `mmn caption` "
                                       "stopped mid-write?): rerun `mmn caption` with the same options to finish "
                                       "the file") from None
                    raise MMNError(f"{self.path}:{line_no}: not a JSON line ({e}); each line must be an object "
                                   'like {"id": ..., "caption": ...}') from None
                key = check_line(rec, self.path, line_no)
                if key in self.offsets:
                    raise MMNError(f"{self.path}:{line_no}: id {key!r} is listed twice; each image takes one caption")
                self.offsets[key] = start
                self.errors += "error" in rec and rec.get("caption") is None and rec.get("output_ids") is None
                if self.settings is None:
                    self.settings = {k: rec.get(k) for k in SETTING_KEYS}
                h.update(raw)
        self.digest = h.hexdigest()[:16]
        self._f = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def entry(self, key: str) -> dict | None:
        """The line of `key`, parsed; None when the file has none."""
        at = self.offsets.get(key)
        if at is None:
            return None
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(at)
        try:
            rec = json.loads(self._f.readline())
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or str(rec.get("id")) != key:  # the file was rewritten under the run
            raise MMNError(f"'{self.path}' changed while it was read (the line of id {key!r} is not where it was): "
                           "do not rewrite a caption file while `mmn find --captions` reads it; run find again")
        return rec

    def source_of(self, rec: dict) -> str:
        """Where a line's caption came from: its `source` (engine, a server's URL), else this file."""
        return str(rec.get("source") or self.path.resolve())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def check_line(rec, path: Path, line_no: int) -> str:
    """A caption line's id, after checking its fields; MMNError naming the line otherwise."""
    where = f"{path}:{line_no}"
    if not isinstance(rec, dict):
        raise MMNError(f'{where}: not a JSON object; each line must be like {{"id": ..., "caption": ...}}')
    key = rec.get("id")
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        raise MMNError(f'{where}: no "id" (the image\'s id in the corpus, as results.jsonl names it)')
    cap, ids, err = rec.get("caption"), rec.get("output_ids"), rec.get("error")
    if cap is not None and not isinstance(cap, str):
        raise MMNError(f'{where}: "caption" must be a string')
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                              and t >= 0 for t in ids)):
        raise MMNError(f'{where}: "output_ids" must be a list of token ids (integers >= 0)')
    if cap is None and ids is None and not isinstance(err, str):
        raise MMNError(f'{where}: needs "caption" (text) or "output_ids" (token ids)')
    return key


def caption_ids(rec: dict, engine) -> list[int] | str:
    """The token ids to score for a caption line, or why there are none. `output_ids` when they decode
    to the line's caption with this engine's tokenizer (the ids `mmn caption` generated, EOS included),
    else the caption text tokenized (a server's answer, a caption written by hand)."""
    text, ids = rec.get("caption"), rec.get("output_ids")
    if ids is not None and text is not None:
        try:
            same = engine.caption_text(ids) == text.strip()
        except Exception:  # noqa: BLE001 - ids another tokenizer made, out of this one's range
            same = False
        ids = ids if same else None
    if ids is not None:
        return ids if ids else "empty caption"
    if text is None:
        return f"no caption ({rec['error']})" if rec.get("error") else "no caption"
    if not text.strip():
        return "empty caption"
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def check_ids_in_corpus(index: CaptionIndex, corpus: Corpus) -> None:
    """Refuse a caption file with ids the corpus does not hold (captions of another corpus, or ids
    spelt otherwise), for corpora whose keys are listed without reading images; tar shards are not
    read twice for it (their ids without captions are skipped at scoring, with a reason)."""
    if corpus.size() is None or not len(index):
        return
    keys = {s.key for shard in range(corpus.n_shards) for s in corpus.iter_shard(shard, decode=False)}
    foreign = [k for k in index.offsets if k not in keys]
    if foreign:
        raise MMNError(f"{len(foreign)} of the {len(index)} ids in '{index.path}' are not in the corpus "
                       f"'{corpus.spec}' (first: {foreign[0]!r}; the corpus' ids look like {next(iter(keys), '?')!r}): "
                       "captions are joined to images by id; give this corpus' captions file")


def open_for_append(path: str | os.PathLike, settings: dict, overwrite: bool) -> set[str]:
    """Ready `path` for `mmn caption` to add lines: the ids it already holds (skipped on a resumed
    run). A torn last line is cut (its image is captioned again); lines made with other settings
    (model, prompt, prefix, max_new_tokens, server) are one MMNError unless `overwrite`, which empties
    the file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MMNError(f"--out must be a file: '{path}' is a folder or not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite or not path.exists():
        with open(path, "w", encoding="utf-8"):
            pass
        return set()
    # Settings first (a wrong --out is refused before anything is cut), over complete lines only: a last
    # line without its newline is torn, however it parses, and is cut, so its image is captioned again.
    failed = set()  # line numbers of images the model failed on (out of memory, ...): captioned again
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError as e:
                raise MMNError(f"{path}:{line_no}: not a JSON line ({e}): this is not a caption file of `mmn caption`; "
                               "give another --out, or add --overwrite to start again") from None
            if not isinstance(rec, dict):
                raise MMNError(f"{path}:{line_no}: not a JSON object: this is not a caption file of `mmn caption`")
            diff = [k for k in SETTING_KEYS if rec.get(k) != settings.get(k)]
            if diff:
                shown = ", ".join(f"{k}: {rec.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                raise MMNError(f"{path}:{line_no}: captions made with other settings ({shown}); rerun with the "
                               "same options to resume, give another --out, or add --overwrite to start again")
            if str(rec.get("error", "")).startswith(MODEL_ERROR):
                failed.add(line_no)
    cut_torn_tail(path)
    if failed:
        _drop_lines(path, failed)
    return set(CaptionIndex(path).offsets)


def _drop_lines(path: Path, line_numbers: set[int]) -> None:
    """Rewrite the file (atomically) without the lines `line_numbers` (1-based): the lines of images the model
    failed on, so that a resumed run captions them again (unreadable images' lines stay: they would fail again)."""
    with open(path, "rb") as f:
        keep = [raw for line_no, raw in enumerate(f, 1) if line_no not in line_numbers]
    log.info("%s: %d image(s) the model failed on are captioned again", path, len(line_numbers))
    with atomic_open(path, "wb") as f:
        f.writelines(keep)


def caption_line(key: str, image: str, settings: dict, caption: str | None = None,
                 output_ids: list[int] | None = None, error: str | None = None) -> str:
    """One line of a caption file (see the module docstring), newline included."""
    rec = {"id": key, "image": image}
    if error is not None:
        rec["error"] = error
    else:
        rec["caption"] = caption
        if output_ids is not None:
            rec["output_ids"] = output_ids
    rec.update({k: settings.get(k) for k in SETTING_KEYS if settings.get(k) is not None})
    return json.dumps(rec) + "\n"
