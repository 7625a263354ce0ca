"""Synthetic captioned images of coloured shapes for the demo model.

Every image shows one object ("a red circle") or, in about 30% of images, two objects, one in
the left half and one in the right half, captioned left to right ("a red circle and a blue
square"). Generation is a pure function of (n, seed): same arguments, same pixels.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (145, 45, 185),
    "orange": (250, 135, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

IMAGE_SIZE = 32        # pixels per side of the saved images (the model's input size)
PAIR_FRACTION = 0.3    # share of images with two objects
_SUPERSAMPLE = 4       # shapes are drawn at 4x and downsampled, for anti-aliased edges


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float,
                fill: tuple[int, int, int]) -> None:
    """Draw `shape` of side/diameter `size` centred at (cx, cy) (supersampled coordinates)."""
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":  # upright, equilateral-ish, centred on its bounding box
        h = size * math.sqrt(3) / 2
        draw.polygon([(cx, cy - h / 2), (cx - r, cy + h / 2), (cx + r, cy + h / 2)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _render(objects: list[tuple[str, str, float, float, float]], background: int, size: int) -> Image.Image:
    """objects: (colour, shape, cx, cy, side) in output-pixel units -> RGB image of size x size."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for colour, shape, cx, cy, side in objects:
        _draw_shape(draw, shape, cx * s, cy * s, side * s, COLOURS[colour])
    return img.resize((size, size), Image.Resampling.BOX)


def make_example(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str]:
    """One (image, caption) pair drawn from `rng`."""
    objects, background, caption = _sample(rng, size)
    return _render(objects, background, size), caption


def _sample(rng: random.Random, size: int) -> tuple[list[tuple[str, str, float, float, float]], int, str]:
    """(objects, background grey level, caption) of one example, drawn from `rng` (the only RNG use)."""
    colours = list(COLOURS)
    background = rng.randint(195, 230)  # light grey, slightly jittered
    if rng.random() < PAIR_FRACTION:
        half = size / 2
        objects = []
        for left in (0.0, half):
            side = rng.uniform(0.7, 0.95) * half  # 11-15 px in a 16 px half at size 32
            slack = (half - side) / 2
            cx = left + half / 2 + rng.uniform(-slack, slack) * 0.8
            cy = size / 2 + rng.uniform(-1, 1) * (size - side) / 2 * 0.6
            objects.append((rng.choice(colours), rng.choice(SHAPES), cx, cy, side))
        caption = " and ".join(f"a {c} {s}" for c, s, *_ in objects)
    else:
        side = rng.uniform(0.4, 0.65) * size  # 13-21 px at size 32
        slack = (size - side) / 2 * 0.6
        cx = size / 2 + rng.uniform(-slack, slack)
        cy = size / 2 + rng.uniform(-slack, slack)
        colour, shape = rng.choice(colours), rng.choice(SHAPES)
        objects = [(colour, shape, cx, cy, side)]
        caption = f"a {colour} {shape}"
    return objects, background, caption


def make_examples(n: int, seed: int, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """`n` deterministic (PIL RGB image, caption) pairs for `seed`."""
    rng = random.Random(f"mmn-demo-shapes:{seed}")
    return [make_example(rng, size) for _ in range(n)]


def object_masks(objects: list[tuple[str, str, float, float, float]], size: int = IMAGE_SIZE) -> list:
    """Per object, a bool array [size, size]: the pixels at least half covered by that object alone
    (drawn as `_render` draws it, supersampled and box-filtered)."""

    s, masks = _SUPERSAMPLE, []
    for _colour, shape, cx, cy, side in objects:
        canvas = Image.new("L", (size * s, size * s), 0)
        _draw_shape(ImageDraw.Draw(canvas), shape, cx * s, cy * s, side * s, 255)
        cover = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
        masks.append(cover >= 0.5)
    return masks


def make_examples_with_masks(n: int, seed: int, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str, list]]:
    """`make_examples(n, seed, size)` with each object's pixels: (image, caption, masks), where masks[k]
    (bool [size, size]) is the k-th object of the caption (left to right). Same RNG stream, same images."""
    rng = random.Random(f"mmn-demo-shapes:{seed}")
    out = []
    for _ in range(n):
        objects, background, caption = _sample(rng, size)
        out.append((_render(objects, background, size), caption, object_masks(objects, size)))
    return out


def save_examples(examples: list[tuple[Image.Image, str]], out_dir: str | Path) -> Path:
    """Write `examples` as PNGs plus `manifest.jsonl` ({"image", "caption", "id"}, image paths
    relative to the manifest) into `out_dir`; returns the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(max(len(examples) - 1, 0))))
    lines = []
    for i, (image, caption) in enumerate(examples):
        ident = f"shape_{i:0{width}d}"
        name = f"{ident}.png"
        image.save(out_dir / name)
        lines.append(json.dumps({"image": name, "caption": caption, "id": ident}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + ("\n" if lines else ""))
    return manifest
