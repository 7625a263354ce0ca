"""Which generated tokens are scored: nouns, all content words, or an explicit word list.

Words are found on the decoded caption and mapped back to the decoding step of their first
sub-token through character offsets, so word, token id and step stay aligned whatever is
dropped (the paper's released code drifts out of step when a noun is skipped).
"""
from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass

from ..errors import MMNError

_WORD = re.compile(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*")

STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each either few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself neither no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves image picture photo shows showing shown
there's it's one two three
""".split())


@dataclass(frozen=True)
class Word:
    text: str
    step: int  # index into output_ids of the word's first sub-token
    start: int  # character span in the decoded caption
    end: int


def decode_steps(tokenizer, output_ids: list[int]) -> tuple[str, list[int]]:
    """Decoded caption and, for each character, the step of the token that produced it."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    text, owner = "", []
    for step, tok in enumerate(output_ids):
        if tok in special:
            continue
        new = tokenizer.decode(output_ids[: step + 1], skip_special_tokens=True)
        if new.startswith(text):
            owner.extend([step] * (len(new) - len(text)))
        else:  # decoding is not prefix-stable here (merged bytes, stripped space): re-own the tail
            common = next((i for i, (a, b) in enumerate(zip(text, new)) if a != b), min(len(text), len(new)))
            owner = owner[:common] + [step] * (len(new) - common)
        text = new
    return text, owner


def split_words(tokenizer, output_ids: list[int]) -> tuple[str, list[Word]]:
    text, owner = decode_steps(tokenizer, output_ids)
    words = [Word(m.group(), owner[m.start()], m.start(), m.end()) for m in _WORD.finditer(text)]
    return text, words


class NounTagger:
    """spaCy's English pipeline, loaded on first use and kept by its owner (an engine holds one), so it
    is loaded once per engine and nothing is held at module level. `pipeline`: a ready tagger (any
    callable returning tokens with `.idx` and `.tag_`), e.g. in tests."""

    PIPELINES = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")

    def __init__(self, pipeline=None):
        self._pipeline, self._tried = pipeline, pipeline is not None
        self._lock = threading.Lock()

    def pipeline(self):
        """The loaded pipeline, or None when spaCy or an English pipeline is missing."""
        with self._lock:
            if not self._tried:
                self._tried, self._pipeline = True, _load_spacy(self.PIPELINES)
            return self._pipeline

    @property
    def available(self) -> bool:
        return self.pipeline() is not None

    def noun_starts(self, text: str) -> set[int]:
        """Character offsets in `text` where a noun (Penn tag NN*) starts."""
        return {t.idx for t in self.pipeline()(text) if t.tag_.startswith("NN")}


def _load_spacy(names: tuple[str, ...]):
    try:
        import spacy
    except ImportError:
        return None
    for name in names:
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except (OSError, ImportError):
            continue
    return None


def resolve_mode(concepts: str | list[str], tagger: NounTagger | None = None) -> str | list[str]:
    """Turn the user's choice into 'nouns', 'all' or a word list (with the default rule: nouns when
    `tagger` (default: a new one) can load a pipeline)."""
    if isinstance(concepts, (list, tuple)):
        words = [w.strip().lower() for w in concepts if w.strip()]
        if not words:
            raise MMNError("the concept word list is empty: give words like 'red,circle'")
        return words
    tagger = tagger if tagger is not None else NounTagger()
    if concepts in (None, "auto"):
        if tagger.available:
            return "nouns"
        warnings.warn("mmn: no spaCy English pipeline installed; scoring all content words "
                      "(pip install 'mmn_fast[nlp]' and an English pipeline such as en_core_web_sm for nouns)",
                      stacklevel=2)
        return "all"
    if concepts == "nouns":
        if not tagger.available:
            raise MMNError(
                "concepts='nouns' needs spaCy with an English pipeline: pip install 'mmn_fast[nlp]' and "
                "install a pipeline such as en_core_web_sm; or use concepts='all' or a word list"
            )
        return "nouns"
    if concepts == "all":
        return "all"
    if isinstance(concepts, str):
        return resolve_mode(concepts.split(","), tagger)
    raise MMNError(f"unknown concepts {concepts!r}: use 'nouns', 'all' or a list of words")


def check_word_list(tokenizer, words: list[str]) -> None:
    """An explicit concept word must be one word the tokenizer knows (not just the unknown token)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for w in words:
        if not _WORD.fullmatch(w):
            raise MMNError(f"concept '{w}' is not a single word (letters and digits); give one word per concept")
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and unk in ids):
            raise MMNError(f"unknown concept word '{w}': the model's tokenizer does not know it; "
                           "check the spelling or pick a word from the model's captions")


def select_concepts(text: str, words: list[Word], mode: str | list[str], tagger: NounTagger | None = None) -> list[Word]:
    """The words to score, in caption order, each at most once per caption position. mode 'nouns'
    tags the caption with `tagger` (give the engine's: a new one loads spaCy again)."""
    if mode == "all":
        return [w for w in words if w.text.lower() not in STOP_WORDS and not w.text.isdigit()]
    if mode == "nouns":
        starts = (tagger if tagger is not None else NounTagger()).noun_starts(text)
        return [w for w in words if w.start in starts]
    wanted = set(mode)
    return [w for w in words if w.text.lower() in wanted]
