"""Result records (the `results.jsonl` schema) and per-concept aggregation (`concepts.json`)."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field


@dataclass
class ConceptResult:
    word: str
    token_id: int
    step: int  # index into output_ids
    neurons: list[list] = field(default_factory=list)  # [[layer, index, score], ...] by descending score


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
    """Per concept word over a corpus: image count, and how often each neuron ranks in the top-k."""

    def __init__(self):
        self.images: dict[str, set[str]] = defaultdict(set)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.score_sums: dict[str, Counter] = defaultdict(Counter)

    def add(self, result: ImageResult) -> None:
        for c in result.concepts:
            word = c.word.lower()
            self.images[word].add(result.id)
            for layer, index, score in c.neurons:
                self.counts[word][(layer, index)] += 1
                self.score_sums[word][(layer, index)] += score

    def summary(self, top_n: int = 50) -> dict:
        out = {}
        for word in sorted(self.images, key=lambda w: (-len(self.images[w]), w)):
            counts, sums = self.counts[word], self.score_sums[word]
            ranked = sorted(counts, key=lambda n: (-counts[n], -sums[n] / counts[n]))[:top_n]
            out[word] = {
                "images": len(self.images[word]),
                "neurons": [{"layer": l, "index": i, "count": counts[(l, i)],
                             "mean_score": sums[(l, i)] / counts[(l, i)]} for l, i in ranked],
            }
        return out
