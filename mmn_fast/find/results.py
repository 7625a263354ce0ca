"""Result records: the `results.jsonl` schema."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
