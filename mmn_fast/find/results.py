"""Result records: the `results.jsonl` schema."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import MMNError

_NEURON = re.compile(r"[Ll]?(\d+)[.:](\d+)")
_EXPERT_NEURON = re.compile(r"[Ll]?(\d+)[.:][Ee](\d+)[.:](\d+)")


def neuron_label(layer: int, index: int, expert: int | None = None) -> str:
    """The one way neurons are written for people: `L12.345` (layer 12, neuron 345); an expert neuron of a
    mixture-of-experts layer `L12.E3.345` (expert 3; a dense layer's neurons, expert -1, stay `L12.345`)."""
    return f"L{layer}.{index}" if expert is None or expert < 0 else f"L{layer}.E{expert}.{index}"


def parse_neuron(text: str) -> tuple[int, int]:
    """`L12.345` -> (12, 345); `12.345` and `12:345` are read too."""
    m = _NEURON.fullmatch(str(text).strip())
    if not m:
        raise MMNError(f"a neuron is written L<layer>.<index> (e.g. L12.345), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_unit_neuron(text: str) -> tuple[int, int, int]:
    """`L12.345` -> (12, -1, 345) (a dense layer's neuron); `L12.E3.345` -> (12, 3, 345) (expert 3's)."""
    m = _EXPERT_NEURON.fullmatch(str(text).strip())
    if m:
        return int(m.group(1)), int(m.group(2)), int(m.group(3))
    m = _NEURON.fullmatch(str(text).strip())
    if not m:
        raise MMNError(f"a neuron is written L<layer>.<index> (e.g. L12.345), or L<layer>.E<expert>.<index> for an "
                       f"expert's (e.g. L12.E3.345), got {text!r}")
    return int(m.group(1)), -1, int(m.group(2))


@dataclass
class ConceptResult:
    word: str
    token_id: int
    step: int  # index into output_ids
    neurons: list[list] = field(default_factory=list)  # [[layer, index, score], ...] by descending score
    # With find(keep_scores=True): every neuron's score [L, F] (not a dataclass field: never serialised).
    scores = None


@dataclass
class ImageResult:
    id: str
    image: str
    prompt_ids: list[int]  # the full input ids given to the model
    output_ids: list[int]  # generated (or teacher-forced caption) ids
    caption: str
    concepts: list[ConceptResult]

    def to_dict(self) -> dict:
        return asdict(self)
