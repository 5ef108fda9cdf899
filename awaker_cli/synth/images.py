"""Deterministic synthetic images: 1–5 shapes of one kind and one colour plus one digit, on a 4×4 grid.

Each object sits in its own 28×28 cell, which is exactly one visual token of Qwen2-VL (14-pixel patches,
2×2 merge) at the default 112×112 size, so a tiny vision tower can learn what it sees in minutes on a
CPU. The digit is drawn as a seven-segment glyph (no font file: the bytes do not depend on the fonts
installed). Everything comes from one `random.Random`, so a seed gives the same PNG bytes every time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 20), "purple": (140, 60, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 5
SIZE = 112
GRID = 4  # cells per side; SIZE / GRID = 28 pixels = one merged visual token

# Seven segments: a (top), b (top right), c (bottom right), d (bottom), e (bottom left), f (top left), g (middle).
_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
    "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` shapes of one kind and colour, and one digit."""

    shape: str
    colour: str
    count: int
    digit: int
    cells: tuple[int, ...]  # grid cells of the shapes, then of the digit (last)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "count": self.count, "digit": self.digit}


def sample_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, MAX_COUNT)
    cells = tuple(rng.sample(range(GRID * GRID), count + 1))
    return Scene(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), count, rng.randint(0, 9), cells)


def render(scene: Scene, rng: random.Random, size: int = SIZE) -> Image.Image:
    """Draw `scene`; `rng` jitters the background tint and each object's size and position in its cell."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for index in scene.cells[:-1]:
        cx, cy = _cell_centre(index, cell, rng)
        r = cell * rng.uniform(0.28, 0.4)
        _draw_shape(draw, scene.shape, cx, cy, r, COLOURS[scene.colour])
    cx, cy = _cell_centre(scene.cells[-1], cell, rng)
    ink = tuple([rng.randint(0, 60)] * 3)
    _draw_digit(draw, str(scene.digit), cx, cy, cell * rng.uniform(0.6, 0.75), ink)
    return image


def make_image(seed: str | int, size: int = SIZE) -> tuple[Image.Image, Scene]:
    """The image (and its scene) of one seed: the only entry point the datasets use."""
    rng = random.Random(seed)
    scene = sample_scene(rng)
    return render(scene, rng, size), scene


def _cell_centre(index: int, cell: float, rng: random.Random) -> tuple[float, float]:
    row, col = divmod(index, GRID)
    jitter = cell * 0.08
    return (col + 0.5) * cell + rng.uniform(-jitter, jitter), (row + 0.5) * cell + rng.uniform(-jitter, jitter)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.85  # a square of the same area as the circle looks the same size
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_digit(draw: ImageDraw.ImageDraw, digit: str, cx: float, cy: float, height: float, ink):
    w, h = height * 0.5, height / 2  # glyph width and half height
    x0, x1 = cx - w / 2, cx + w / 2
    y0, y1, y2 = cy - h, cy, cy + h
    lines = {
        "a": [(x0, y0), (x1, y0)], "b": [(x1, y0), (x1, y1)], "c": [(x1, y1), (x1, y2)],
        "d": [(x0, y2), (x1, y2)], "e": [(x0, y1), (x0, y2)], "f": [(x0, y0), (x0, y1)], "g": [(x0, y1), (x1, y1)],
    }
    width = max(2, round(height / 7))
    for segment in _SEGMENTS[digit]:
        draw.line(lines[segment], fill=ink, width=width)
