"""Heatmaps and masks: neuron activations at the image-token positions, laid back on the patch grid.

A map is the mean over the chosen neurons of each one's activation at every image token
(oriented: times the sign of the neuron's projection `<W_out[:, i], W_U[t]>` on the concept token,
so that high means "pushes toward the concept"; `orient=False` is the paper's raw mean). The grid is
upsampled to the image the model sees (bilinear, half-pixel centres, vectorised), min-max
normalised, coloured and laid over the image; the mask keeps the pixels at or above a percentile.

`method="occlusion"` maps instead where the neurons read their concept from: per image token, how much
their (oriented) activation at the position that predicts the concept drops when that token's
embedding is replaced by the mean image-token embedding (1 + n_img teacher-forced passes per map).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io as _io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import MMNError
from ..io import atomic_open, write_json
from ..model.adapters import check_activation
from ..model.inputs import as_image
from .engine import DEFAULT_PROMPT
from .moe_scoring import check_units, moe_recording

# Colour maps: (position, r, g, b) stops, linearly interpolated.
COLORMAPS = {
    "jet": [(0.0, 0.0, 0.0, 0.5), (0.125, 0.0, 0.0, 1.0), (0.375, 0.0, 1.0, 1.0), (0.625, 1.0, 1.0, 0.0),
            (0.875, 1.0, 0.0, 0.0), (1.0, 0.5, 0.0, 0.0)],
    "viridis": [(0.0, 0.267, 0.005, 0.329), (0.125, 0.283, 0.141, 0.458), (0.25, 0.254, 0.265, 0.530),
                (0.375, 0.207, 0.372, 0.553), (0.5, 0.164, 0.471, 0.558), (0.625, 0.128, 0.567, 0.551),
                (0.75, 0.135, 0.659, 0.518), (0.875, 0.478, 0.821, 0.318), (1.0, 0.993, 0.906, 0.144)],
}
METHODS = ("activation", "occlusion")
DISPLAY_MIN = 224  # `mmn heatmap` and the report enlarge smaller overlays (nearest, integer factor)
DEFAULT_CMAP = "viridis"  # no red in it: stays readable over red objects, and ordered for colour-blind readers


# ----------------------------------------------------------------------------------- image maths
def bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] -> [height, width], bilinear with half-pixel centres (torch's align_corners=False)."""
    grid = np.asarray(grid, dtype=np.float64)
    gh, gw = grid.shape

    def axis(n_out: int, n_in: int):
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = axis(height, gh)
    x0, x1, wx = axis(width, gw)
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def normalise(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def colourise(x01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 [H, W, 3] through a built-in colour map."""
    if cmap not in COLORMAPS:
        raise MMNError(f"unknown colour map {cmap!r}: use one of {sorted(COLORMAPS)}")
    stops = np.array(COLORMAPS[cmap])
    x = np.clip(x01, 0, 1)
    rgb = np.stack([np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], -1)
    return np.round(rgb * 255).astype(np.uint8)


def binary_mask(heat: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """Pixels at or above the `percentile`-th percentile of the map (bool, same shape)."""
    if not 0 <= percentile <= 100:
        raise MMNError(f"percentile must be in [0, 100], got {percentile}")
    return np.asarray(heat) >= np.percentile(heat, percentile)


def _size(d, key):
    if d is None:
        return None
    v = getattr(d, key, None)
    if v is None and isinstance(d, dict):
        v = d.get(key)
    return v


def view_box(image_processor, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the original image the model sees: the centre crop of CLIP-style
    processors (resize the shortest edge, crop), else the whole image."""
    ip = image_processor
    short, crop = _size(getattr(ip, "size", None), "shortest_edge"), getattr(ip, "crop_size", None)
    ch, cw = _size(crop, "height"), _size(crop, "width")
    if getattr(ip, "do_center_crop", False) and short and ch and cw:
        s = short / min(width, height)
        left, top = (width * s - cw) / 2, (height * s - ch) / 2
        box = (left / s, top / s, (left + cw) / s, (top + ch) / s)
        return (max(0, round(box[0])), max(0, round(box[1])), min(width, round(box[2])), min(height, round(box[3])))
    return (0, 0, width, height)


# ----------------------------------------------------------------------------------- patch grid
def merge_factor(cfg) -> int:
    """How many patches per side one image token merges: Mistral3's spatial_merge_size, Idefics3 / SmolVLM's
    pixel-shuffle scale_factor, InternVL's downsample_ratio (1/m), Aya Vision's downsample_factor; 1 else."""
    for key in ("spatial_merge_size", "scale_factor", "downsample_factor"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return value
    ratio = getattr(cfg, "downsample_ratio", None)
    return round(1 / ratio) if isinstance(ratio, float) and 0 < ratio < 1 else 1


def patch_grid(engine, n_tokens: int, inputs: dict | None = None, row: int = 0) -> tuple[int, int, int]:
    """(rows, cols, skip) of the image tokens of one prompt: `skip` leading tokens (CLS) are not on the grid.

    LLaVA-style models: (image_size / patch_size)^2 patches, plus CLS with vision_feature_select_strategy
    "full"; Qwen2-VL: image_grid_thw / spatial_merge_size; models that merge m x m patches per token
    (`merge_factor`): the patch grid / m. Q-Former models (InstructBLIP, BLIP-2) and
    any count that is not the grid raise MMNError saying why.
    """
    model = engine.model
    cfg, name = model.config, type(model).__name__
    if "blip" in name.lower() or getattr(cfg, "qformer_config", None) is not None:
        raise MMNError(f"{name} gives its decoder {n_tokens} Q-Former query tokens: learned summaries of the "
                       "whole image, with no position on it, so there is no patch grid to lay activations on. "
                       "Heatmaps need a model whose image tokens are patches (LLaVA, Qwen2-VL, ...)")
    if inputs is not None and inputs.get("image_grid_thw") is not None:  # Qwen2-VL family
        t, h, w = (int(v) for v in inputs["image_grid_thw"][row].tolist())
        merge = int(getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 2) or 1)
        rows, cols = h // merge, w // merge
        if t != 1 or rows * cols != n_tokens:
            raise MMNError(f"{n_tokens} image tokens do not match the grid {t}x{h}x{w} / merge {merge} of "
                           "image_grid_thw (videos and several images per prompt are not supported)")
        return rows, cols, 0
    if inputs is not None and inputs.get("image_sizes") is not None and getattr(cfg, "image_grid_pinpoints", None):
        raise MMNError(f"{name} tiles each image at several resolutions (anyres): its {n_tokens} image tokens "
                       "are not one patch grid; heatmaps support single-grid models (LLaVA-1.5, Qwen2-VL)")
    vc = getattr(cfg, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if not size or not patch:
        raise MMNError(f"cannot lay {n_tokens} image tokens of {name} on a patch grid: its vision config gives "
                       "no image_size and patch_size")
    g = int(size) // int(patch)
    # "full" keeps CLIP's CLS token in front of the patches (SigLIP towers have none)
    skip = 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0
    merge = merge_factor(cfg)  # patches merged m x m into one token, in raster order (pixel shuffle, spatial merge)
    for side in dict.fromkeys((g, g // merge if g % merge == 0 else g)):
        for lead in dict.fromkeys((skip, 0)):
            if n_tokens == side * side + lead:
                return side, side, lead
    pooled = getattr(cfg, "mm_tokens_per_image", None)  # Gemma 3: the patch grid average-pooled to a square
    if pooled == n_tokens and math.isqrt(n_tokens) ** 2 == n_tokens:
        r = math.isqrt(n_tokens)
        return r, r, 0
    raise MMNError(f"{n_tokens} image tokens of {name} are not the {g}x{g} patch grid of {size}-px images with "
                   f"{patch}-px patches (+{skip} CLS): cannot lay them on the image")


# ----------------------------------------------------------------------------------- forward pass
@dataclass
class Trace:
    """One forward pass over prompts (and teacher-forced captions) with chosen neurons recorded."""

    acts: torch.Tensor  # [B, T, N] fp32 on CPU, columns in the order of `neurons`
    input_ids: torch.Tensor  # [B, T]
    image_mask: torch.Tensor  # [B, T] bool
    inputs: dict  # the prompt inputs (image_grid_thw ...)
    index: torch.Tensor | None = None  # [B, S] positions predicting each caption token
    token_probs: torch.Tensor | None = None  # [B, S] p(caption token | everything before), NaN past the end
    neurons: list = field(default_factory=list)

    def image_rows(self, b: int) -> torch.Tensor:
        """[n_img, N]: row b's activations at its image tokens."""
        return self.acts[b][self.image_mask[b]]


def _pil(images) -> list:
    return [as_image(x) for x in images]


def _by_layer(neurons) -> dict[int, list[int]]:
    """layer -> list of column positions in `neurons` order (duplicates allowed)."""
    out: dict[int, list[int]] = {}
    for k, n in enumerate(neurons):
        out.setdefault(int(n[0]), []).append(k)
    return out


def units(ad, neurons) -> list[tuple]:
    """`neurons` checked against the model: (layer, index) pairs of a dense model, (layer, expert, index) of
    one with mixture-of-experts layers (find's records without their score)."""
    if ad.is_moe:
        return check_units(ad, neurons)
    neurons = [(int(n[0]), int(n[1])) for n in neurons]
    for l, i in neurons:
        if not (0 <= l < ad.n_layers and 0 <= i < ad.d_mlp):
            raise MMNError(f"neuron ({l}, {i}) out of range: layers 0..{ad.n_layers - 1}, neurons 0..{ad.d_mlp - 1}")
    return neurons


@contextlib.contextmanager
def _recording(engine, neurons, activation: str, select=None):
    """Hooks on the layers of `neurons` [(l, i)], or [(l, e, i)] on an MoE model (moe_recording): cols[l] =
    select(h)[..., their indices] (fp32, CPU) at each call; yields (groups: layer -> column positions in
    `neurons`, cols). Removed on exit."""
    ad = engine.adapter
    check_activation(activation)
    if ad.is_moe:
        if activation != "down_proj_input":
            ad.require_dense(f"a heatmap with activation={activation!r}")
        with moe_recording(ad, neurons, select) as recorded:
            yield recorded
        return
    groups, cols = _by_layer(neurons), {}

    def keep(layer, h):
        idx = torch.tensor([int(neurons[k][1]) for k in groups[layer]], device=h.device)
        cols[layer] = (h if select is None else select(h))[..., idx].float().cpu()

    with contextlib.ExitStack() as hooks:
        for layer in groups:
            hooks.enter_context(ad.hook_site(layer, activation).hooked(functools.partial(keep, layer)))
        yield groups, cols


@torch.no_grad()
def trace(engine, images, neurons, captions=None, prompt: str = DEFAULT_PROMPT, prefix: str | None = None,
          activation: str = "down_proj_input", probs: bool = False) -> Trace:
    """Run the prompts (plus `captions`, token id lists, teacher-forced) once; record `neurons` [(l, i)]
    ([(l, e, i)] on an MoE model: an expert neuron's activation is g_e h_{e,i}, 0 where e is not routed) at
    every position, and with `probs` each caption token's probability."""
    ad = engine.adapter
    if ad.image_token_id is None:
        raise MMNError("the model config names no image token (image_token_id): cannot find image positions")
    neurons = units(ad, neurons)
    inputs = engine.encode(_pil(images), prompt, prefix)
    run, index = inputs, None
    if captions is not None:
        run, index = engine.teacher_forced(inputs, [[int(t) for t in c] for c in captions])
    kwargs = {"logits_to_keep": index.shape[1] + 1} if probs and captions is not None else {}  # T-1 .. T+S-1
    with _recording(engine, neurons, activation) as (groups, cols), engine.swap_lock:
        try:
            out = engine.model(**run, use_cache=False, **kwargs)
        except TypeError:  # no logits_to_keep on this model
            out = engine.model(**run, use_cache=False)
    ids = run["input_ids"]
    acts = torch.zeros(ids.shape[0], ids.shape[1], len(neurons))
    for layer, ks in groups.items():
        acts[:, :, ks] = cols[layer]
    t = Trace(acts, ids.cpu(), (ids == ad.image_token_id).cpu(), inputs, None if index is None else index.cpu(),
              None, neurons)
    if probs and captions is not None:
        logits = out.logits
        offset = ids.shape[1] - logits.shape[1]
        s = index.shape[1]
        rows = logits[torch.arange(ids.shape[0], device=logits.device)[:, None], (index - offset).to(logits.device)]
        logp = torch.log_softmax(rows.float(), -1)  # [B, S, V]
        targets = torch.full((ids.shape[0], s), 0, dtype=torch.long)
        valid = torch.zeros(ids.shape[0], s, dtype=torch.bool)
        for b, c in enumerate(captions):
            targets[b, : len(c)] = torch.tensor([int(x) for x in c], dtype=torch.long)
            valid[b, : len(c)] = True
        p = logp.gather(-1, targets.to(logp.device)[:, :, None])[..., 0].exp().cpu()
        t.token_probs = p.masked_fill(~valid, float("nan"))
    return t


def language_model(engine) -> nn.Module:
    """The module of `engine`'s model that runs the decoder layers (it takes inputs_embeds)."""
    return engine.adapter.language_model


def occlusion_values(engine, image, caption, step: int, neurons, signs=None, prompt: str = DEFAULT_PROMPT,
                     prefix: str | None = None, activation: str = "down_proj_input", chunk: int = 32):
    """([n_img] drop of sum_j sign_j a_j at the position predicting caption token `step` when each image
    token's embedding is replaced by the mean image-token embedding, the prompt inputs). Runs the
    teacher-forced prompt + caption 1 + n_img times, `chunk` copies per forward pass."""
    ad = engine.adapter
    neurons = units(ad, neurons)
    inputs = engine.encode(_pil([image]), prompt, prefix)
    run, index = engine.teacher_forced(inputs, [[int(t) for t in caption]])
    img_pos = (run["input_ids"][0] == ad.image_token_id).nonzero()[:, 0]
    if len(img_pos) == 0:
        raise MMNError("the prompt carries no image tokens")
    pos = int(index[0, step])
    signs = [1.0] * len(neurons) if signs is None else signs
    jobs = [None] + list(range(len(img_pos)))  # None: the unoccluded pass
    totals = []
    lm = language_model(engine)
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]

        def embeds_hook(_m, args, kwargs, part=part):
            e = kwargs.get("inputs_embeds")
            if e is None:
                raise MMNError("occlusion heatmaps need the language model to be called with inputs_embeds")
            e = e.clone()
            fill = e[0, img_pos.to(e.device)].mean(0)
            for r, j in enumerate(part):
                if j is not None:
                    e[r, int(img_pos[j])] = fill
            return args, dict(kwargs, inputs_embeds=e)

        handle = lm.register_forward_pre_hook(embeds_hook, with_kwargs=True)
        rep = {k: (torch.cat([v] * len(part)) if torch.is_tensor(v) else v) for k, v in run.items()}
        try:
            with _recording(engine, neurons, activation, lambda h: h[:, pos]) as (groups, cols), \
                    torch.no_grad(), engine.swap_lock:
                engine.model(**rep, use_cache=False)
        finally:
            handle.remove()
        tot = torch.zeros(len(part))
        for layer, ks in groups.items():
            for col, k in enumerate(ks):
                tot += float(signs[k]) * cols[layer][:, col]
        totals.append(tot)
    t = torch.cat(totals)
    return (t[0] - t[1:]).numpy(), inputs


# ----------------------------------------------------------------------------------- rendering
@dataclass
class Heatmap:
    view: "object"  # PIL image: the part of the original image the model sees
    grid: np.ndarray  # [rows, cols] the mean map on the patch grid
    heat: np.ndarray  # [H, W] upsampled to the view, before normalising
    mask: np.ndarray  # [H, W] bool
    threshold: float
    box: tuple

    def overlay(self, cmap: str = DEFAULT_CMAP, alpha: float = 0.5, display_min: int = DISPLAY_MIN,
                colour_bar: bool = False):
        """The heat over the view; `colour_bar`: a key on the right (top: the map's highest value,
        bottom: its lowest; the map is min-max normalised per image)."""
        base = np.asarray(self.view.convert("RGB"), dtype=np.float64)
        rgb = (1 - alpha) * base + alpha * colourise(normalise(self.heat), cmap)
        img = _enlarge(Image.fromarray(np.round(rgb).astype(np.uint8)), display_min)
        return _with_colour_bar(img, cmap) if colour_bar else img

    def masked(self, dim: float = 0.8, display_min: int = DISPLAY_MIN):
        """The view with everything outside the mask darkened (the paper's mask picture)."""
        base = np.asarray(self.view.convert("RGB"), dtype=np.float64)
        out = np.where(self.mask[..., None], base, base * (1 - dim))
        return _enlarge(Image.fromarray(np.round(out).astype(np.uint8)), display_min)

    def mask_image(self):
        return Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L")


def _with_colour_bar(img, cmap: str):
    """`img` with a gap and a vertical colour key on its right, as wide as a sixteenth of it (>= 6 px)."""
    w, h = img.size
    bar_w, gap = max(6, w // 16), max(2, w // 64)
    ramp = np.linspace(1.0, 0.0, h)[:, None].repeat(bar_w, 1)  # [H, bar_w]: high at the top
    out = Image.new("RGB", (w + gap + bar_w, h), (255, 255, 255))
    out.paste(img, (0, 0))
    out.paste(Image.fromarray(colourise(ramp, cmap)), (w + gap, 0))
    return out


def _enlarge(img, display_min: int):
    f = max(1, -(-display_min // max(1, max(img.size)))) if display_min else 1
    return img if f == 1 else img.resize((img.width * f, img.height * f), resample=0)


def render(engine, image, values: np.ndarray, inputs: dict | None = None, row: int = 0,
           percentile: float = 95.0) -> Heatmap:
    """values [n_img] (one per image token) -> Heatmap over the view of `image`."""
    values = np.asarray(values, dtype=np.float64)
    rows, cols, skip = patch_grid(engine, len(values), inputs, row)
    grid = values[skip:].reshape(rows, cols)
    image = _pil([image])[0]
    box = view_box(getattr(engine.prompter, "image_processor", None) or
                   getattr(engine.processor, "image_processor", None), image.width, image.height)
    view = image.crop(box) if box != (0, 0, image.width, image.height) else image
    heat = bilinear(grid, view.height, view.width)
    mask = binary_mask(heat, percentile)
    return Heatmap(view, grid, heat, mask, float(np.percentile(heat, percentile)), box)


def concept_signs(engine, token_id: int | None, neurons) -> list[float]:
    """sign(<W_out^l[:, i], W_U[t]>) per neuron (all +1 without a token); on an MoE model, neurons (l, e, i)
    and the unit's own output vector (expert e's down_proj[e][:, i], the shared expert's, a dense W_out's)."""
    if token_id is None:
        return [1.0] * len(neurons)
    ad = engine.adapter
    with torch.no_grad():
        u = ad.unembed_weight()[int(token_id)].float()
        outs = [ad.unit_weight(n[0], n[1] if len(n) == 3 else -1)[:, n[-1]] for n in units(ad, neurons)]
        return [1.0 if float(w.float() @ u.to(w.device)) >= 0 else -1.0 for w in outs]


def maps(engine, images, items, method: str = "activation", orient: bool = True, prompt: str = DEFAULT_PROMPT,
         prefix: str | None = None, activation: str = "down_proj_input", percentile: float = 95.0) -> list:
    """Heatmaps of one batch. items[k] = (image row b, neurons [(l, i)] ([(l, e, i)] on an MoE model), token_id
    or None, caption ids or
    None, step or None); returns one Heatmap per item. One forward pass for the batch (activation), or
    1 + n_img teacher-forced passes per item (occlusion, which needs caption and step)."""
    if method not in METHODS:
        raise MMNError(f"heatmap method must be one of {METHODS}, got {method!r}")
    images = _pil(images)
    signs = [concept_signs(engine, tok if orient else None, ns) for _b, ns, tok, _c, _s in items]
    out: list = [None] * len(items)
    if method == "activation":
        union = list(dict.fromkeys(tuple(int(v) for v in n) for _b, ns, *_ in items for n in ns))
        col = {n: k for k, n in enumerate(union)}
        t = trace(engine, images, union, prompt=prompt, prefix=prefix, activation=activation)
        for k, (b, ns, *_rest) in enumerate(items):
            img_acts = t.image_rows(b)  # [n_img, N]
            sel = torch.stack([img_acts[:, col[tuple(int(v) for v in n)]] * s for n, s in zip(ns, signs[k])], -1)
            out[k] = render(engine, images[b], sel.mean(-1).numpy(), t.inputs, b, percentile)
        return out
    for k, (b, ns, _tok, caption, step) in enumerate(items):
        if caption is None or step is None:
            raise MMNError("occlusion heatmaps need the concept's caption and step (run find first)")
        vals, inputs = occlusion_values(engine, images[b], caption, step, ns, signs[k], prompt, prefix, activation)
        out[k] = render(engine, images[b], vals, inputs, 0, percentile)
    return out


# ----------------------------------------------------------------------------------- files
def safe_name(s: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._")[:limit] or "_"


def unique_name(s: str) -> str:
    """A file or folder name for `s` that no other string gets: `s` itself when it is already a safe name
    (plain ASCII ids keep their layout), else its safe name (64 characters at most) + "-" + a short sha1
    of `s` ("a b" -> "a_b-<sha1>", which "a_b" never becomes). write_heatmaps names folders and files by it."""
    s = str(s)
    if safe_name(s) == s:
        return s
    return f"{safe_name(s, 64)}-{hashlib.sha1(s.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def save_png(img, path: Path) -> None:
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def save_heatmap(hm: Heatmap, stem: Path, meta: dict, cmap: str = DEFAULT_CMAP, display_min: int = 0,
                 write_meta: bool = True) -> dict:
    """`<stem>.heatmap.png` (overlay with a colour key; enlarged to `display_min` px for viewing),
    `<stem>.mask.png` (binary, the view's pixels) and, with `write_meta`, `<stem>.json`. Returns the JSON record."""
    save_png(hm.overlay(cmap, display_min=display_min, colour_bar=True), stem.with_name(stem.name + ".heatmap.png"))
    save_png(hm.mask_image(), stem.with_name(stem.name + ".mask.png"))
    info = dict(meta, grid=np.round(hm.grid, 6).tolist(), box=list(hm.box), threshold=hm.threshold,
                mask_fraction=float(hm.mask.mean()), heatmap=stem.name + ".heatmap.png", mask=stem.name + ".mask.png")
    if write_meta:
        write_json(stem.with_name(stem.name + ".json"), info)
    return info


def write_heatmaps(engine, images, results, out_dir, n: int = 10, percentile: float = 95.0,
                   method: str = "activation", prompt: str = DEFAULT_PROMPT, prefix: str | None = None,
                   activation: str = "down_proj_input", cmap: str = DEFAULT_CMAP, orient: bool = True) -> list[dict]:
    """For one batch of `mmn find`: images (PIL or paths) and their results (ImageResult or results.jsonl
    dicts), in the same order. For each image and each concept word (first occurrence), the map of the
    concept's top-n neurons in that image's ranking: `out_dir/<id>/<word>.heatmap.png` and `.mask.png`
    (at the pixels the model sees), and per image `out_dir/<id>/heatmaps.json` (one record per concept:
    neurons, grid values, threshold, the PNG file names, ...). <id> and <word> are `unique_name` of the
    id and the word: the id itself when it is a safe file name, else a sanitised name + a short hash.
    Costs one prefill pass per batch (activation) or 1 + n_img teacher-forced passes per concept
    (occlusion). Returns the records written."""
    recs = [r.to_dict() if hasattr(r, "to_dict") else r for r in results]
    if len(recs) != len(images):
        raise MMNError(f"{len(images)} images for {len(recs)} results")
    items, keys = [], []
    width = 3 if engine.adapter.is_moe else 2  # a record's (layer, index) or (layer, expert, index)
    for b, rec in enumerate(recs):
        seen = set()
        for c in rec["concepts"]:
            word = c["word"].lower()
            if word in seen or not c["neurons"]:
                continue
            seen.add(word)
            ns = [tuple(int(v) for v in x[:width]) for x in c["neurons"][:n]]
            items.append((b, ns, c["token_id"], rec["output_ids"], c["step"]))
            keys.append((b, word, ns))
    if not items:
        return []
    hms = maps(engine, images, items, method, orient, prompt, prefix, activation, percentile)
    per_image: dict[int, list] = {}
    for hm, (b, word, ns) in zip(hms, keys):
        rec = recs[b]
        meta = {"id": rec["id"], "image": rec.get("image", ""), "concept": word, "neurons": [list(x) for x in ns],
                "method": method, "oriented": orient, "percentile": percentile}
        stem = Path(out_dir) / unique_name(rec["id"]) / unique_name(word)
        per_image.setdefault(b, []).append(save_heatmap(hm, stem, meta, cmap, write_meta=False))
    for b, infos in per_image.items():
        write_json(Path(out_dir) / unique_name(recs[b]["id"]) / "heatmaps.json", infos)
    return [info for b in sorted(per_image) for info in per_image[b]]


def read_heatmaps(out_dir) -> list[dict]:
    """The heatmap records under `out_dir` (per-image heatmaps.json of write_heatmaps, or `mmn heatmap`'s
    one-record JSON files), each with "_dir", the folder its PNG files are in (the records name their
    files, so any folder naming reads back; `unique_name(id)` is write_heatmaps' folder of an image)."""
    recs = []
    for p in sorted(Path(out_dir).rglob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and "heatmap" in rec and "concept" in rec:
                recs.append(dict(rec, _dir=str(p.parent)))
    return recs
