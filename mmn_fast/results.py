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
    """Per concept word over a corpus: the images that name it, and for each neuron the number of
    those images where it ranks in the concept's top-k, with its mean score over those rankings."""

    def __init__(self):
        self.images: dict[str, set[str]] = defaultdict(set)
        self.counts: dict[str, Counter] = defaultdict(Counter)  # images with the neuron in the top-k
        self.score_sums: dict[str, Counter] = defaultdict(Counter)
        self.score_n: dict[str, Counter] = defaultdict(Counter)  # rankings summed (a word can recur)

    def add(self, result: ImageResult) -> None:
        seen: dict[str, set] = defaultdict(set)  # word -> neurons already counted for this image
        for c in result.concepts:
            word = c.word.lower()
            self.images[word].add(result.id)
            for layer, index, score in c.neurons:
                key = (layer, index)
                if key not in seen[word]:
                    seen[word].add(key)
                    self.counts[word][key] += 1
                self.score_sums[word][key] += score
                self.score_n[word][key] += 1

    def summary(self, top_n: int = 50) -> dict:
        out = {}
        for word in sorted(self.images, key=lambda w: (-len(self.images[w]), w)):
            counts, sums, n = self.counts[word], self.score_sums[word], self.score_n[word]
            ranked = sorted(counts, key=lambda k: (-counts[k], -sums[k] / n[k]))[:top_n]
            out[word] = {
                "images": len(self.images[word]),
                "neurons": [{"layer": l, "index": i, "count": counts[(l, i)],
                             "mean_score": sums[(l, i)] / n[(l, i)]} for l, i in ranked],
            }
        return out
