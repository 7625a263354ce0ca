"""Result records (the `results.jsonl` schema) and per-concept aggregation (`concepts.json`)."""
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


class ConceptAggregator:
    """In memory, per concept word: the images that name it and the neurons that most often rank in
    its top-k, with their mean score there. The same statistics as a corpus run's sparse aggregates
    (`mmn_fast.run.aggregate.NeuronStats`): each (image, word) pair counts once, at the word's first
    occurrence in the caption."""

    def __init__(self):
        from ..run.aggregate import NeuronStats

        self.stats = NeuronStats("sparse", 0, 0)  # sparse statistics need no model sizes

    def add(self, result: ImageResult) -> None:
        seen = set()
        for c in result.concepts:
            word = c.word.lower()
            if word not in seen:
                seen.add(word)
                self.stats.add(word, None, c.neurons)

    def summary(self, top_n: int = 50) -> dict:
        return self.stats.summary(top_n)
