"""Contribution scores from captured activations, with cached per-token projections."""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..kernels import contribution_scores, token_projection, topk_neurons
from ..model.adapters import Adapter

PROJECTION_CHUNK = 8  # tokens per projection matmul: one fixed shape, whatever the number of new tokens


class Scorer:
    """`score(l, i, t) = a^l_i * <W_out^l[:, i], W_U[t]>`, optionally through the final norm.

    The projection column `W_out^T W_U[t]` of each token ([L, F], fp32) is computed once and kept
    in a small LRU cache: across a corpus the same concept tokens come back again and again. The
    cache is dropped when any weight it was computed from changes in place (a patch applied or
    reverted bumps the tensors' version counters).
    """

    def __init__(self, adapter: Adapter, fold_norm: bool = False, cache_tokens: int = 256):
        self.adapter, self.fold_norm, self.cache_tokens = adapter, fold_norm, cache_tokens
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._versions: tuple | None = None

    def _weights_version(self) -> tuple | None:
        ad = self.adapter
        ws = [ad.out_weight(l) for l in range(ad.n_layers)] + [ad.unembed_weight()]
        if self.fold_norm and ad.final_norm is not None and getattr(ad.final_norm, "weight", None) is not None:
            ws.append(ad.final_norm.weight)
        try:
            return tuple((w.data_ptr(), w._version) for w in ws)
        except RuntimeError:  # inference-mode tensors keep no version counter: never trust the cache
            return None

    def unembed_rows(self, tokens: list[int]) -> tuple[torch.Tensor, bool]:
        """([K, d] fp32 (fp64 kept) unembedding rows of `tokens`, scaled by a folded norm's weight;
        whether output vectors are centred first (a folded LayerNorm))."""
        ad = self.adapter
        w_u = ad.unembed_weight()
        rows = w_u[torch.tensor(tokens, device=w_u.device)]  # [K, d]
        rows = rows if rows.dtype == torch.float64 else rows.float()
        center = False
        if self.fold_norm:
            w = ad.norm_weight()
            if w is not None:
                rows = rows * w.to(rows.device, rows.dtype)
            center = ad.norm_kind() == "layer"
        return rows, center

    @torch.no_grad()
    def projection(self, tokens: list[int], edits: list | None = None) -> torch.Tensor:
        """[C, L, F] fp32: the projection column of each token (in order, repeats allowed).
        edits: per concept None or {layer: (neuron idx [n], new output vectors [n, d])}: those neurons'
        entries are projected from the new vectors (a per-request patch's) instead of W_out's."""
        cols = self.base_projection(tokens)
        if edits is None or not any(edits):
            return cols
        cols = cols.clone()
        rows, center = self.unembed_rows(tokens)  # [C, d]
        for c, edit in enumerate(edits):
            for layer, (idx, new) in (edit or {}).items():
                # the same padded matmul shape as the cached columns
                padded = rows[c : c + 1].expand(PROJECTION_CHUNK, -1).to(new.device)  # [CHUNK, d]
                col = token_projection(new.t(), padded, center)[:, 0]  # [n]
                cols[c, layer, idx.to(cols.device)] = col.to(cols.device, cols.dtype)
        return cols

    @torch.no_grad()
    def base_projection(self, tokens: list[int]) -> torch.Tensor:
        """[C, L, F] fp32: the cached projection columns of the model's own W_out."""
        versions = self._weights_version()
        if versions is None or versions != self._versions:
            self._cache.clear()
            self._versions = versions
        missing = sorted({t for t in tokens if t not in self._cache})
        if missing:
            ad = self.adapter
            rows, center = self.unembed_rows(missing)
            for start in range(0, len(missing), PROJECTION_CHUNK):
                chunk = rows[start : start + PROJECTION_CHUNK]  # [<=CHUNK, d]
                # Always the same matmul shape (the last chunk padded with repeats of its last row): a
                # matmul's rounding depends on its shape, so a token's column must not depend on which
                # other tokens happened to be missing with it, or results would depend on a run's history
                # (restarts, process count, batch order).
                padded = torch.cat([chunk, chunk[-1:].expand(PROJECTION_CHUNK - len(chunk), -1)])  # [CHUNK, d]
                # Each layer on its own device (a device_map split over GPUs); the columns meet on W_U's.
                proj = torch.stack([token_projection(w, padded.to(w.device), center).to(rows.device)
                                    for w in (ad.out_weight(l) for l in range(ad.n_layers))])  # [L, F, CHUNK]
                for k, t in enumerate(missing[start : start + PROJECTION_CHUNK]):
                    self._cache[t] = proj[:, :, k].contiguous()
        for t in tokens:
            self._cache.move_to_end(t)
        cols = torch.stack([self._cache[t] for t in tokens])  # [C, L, F]
        while len(self._cache) > max(self.cache_tokens, len(set(tokens))):
            self._cache.popitem(last=False)
        return cols

    def norm_denominator(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, d] final-norm inputs -> [C] the norm's denominator (RMS or std, with eps)."""
        x = x if x.dtype == torch.float64 else x.float()
        eps = self.adapter.norm_eps()
        if self.adapter.norm_kind() == "layer":
            return (x.var(-1, unbiased=False) + eps).sqrt()
        return (x.pow(2).mean(-1) + eps).sqrt()

    @torch.no_grad()
    def score(self, acts: torch.Tensor, tokens: list[int], norm_inputs: torch.Tensor | None = None,
              edits: list | None = None) -> torch.Tensor:
        """acts [C, L, F] at each concept's position -> scores [C, L, F] fp32 (edits: see `projection`)."""
        scores = contribution_scores(acts, self.projection(tokens, edits).to(acts.device))
        if self.fold_norm:
            scores = scores / self.norm_denominator(norm_inputs)[:, None, None]
        return scores

    @torch.no_grad()
    def score_image(self, stats: dict[str, torch.Tensor], tokens: list[int], reduce: str,
                    edits: list | None = None) -> torch.Tensor:
        """Image-position view: stats of the concept's sample ({'sum','max','min': [C, L, F], 'count': [C]})."""
        proj = self.projection(tokens, edits).to(stats["count"].device)
        stats = {k: (v.to(proj.dtype) if v.is_floating_point() else v) for k, v in stats.items()}
        if reduce == "mean":
            return stats["sum"] / stats["count"].clamp(min=1)[:, None, None].float() * proj
        # max over positions of a*P: the largest a when P >= 0, the smallest when P < 0.
        return torch.where(proj >= 0, stats["max"] * proj, stats["min"] * proj)

    @staticmethod
    def top(scores: torch.Tensor, k: int) -> list[list[list]]:
        """[C, L, F] -> per concept [[layer, index, score], ...] by descending score."""
        values, layers, index = topk_neurons(scores, k)
        v, l, i = values.tolist(), layers.tolist(), index.tolist()
        return [[[lc[j], ic[j], vc[j]] for j in range(len(vc))] for vc, lc, ic in zip(v, l, i)]
