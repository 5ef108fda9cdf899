"""A small synthetic image-question-answer set (solid shapes on plain backgrounds), for tests and the
tiny-model demo: PNG images beside a JSONL file in either record layout."""
from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (250, 250, 250), "black": (10, 10, 10)}
QUESTIONS = ["what colour is the shape ?", "describe the image .", "what color is the shape ?"]


def write_synthetic_dataset(out: str | Path, n: int = 16, *, layout: str = "messages", seed: int = 0,
                            text_only_every: int = 0, name: str = "train.jsonl", question: str | None = None,
                            answer: str | None = None) -> Path:
    """Write `n` records (and their images under out/images) to out/NAME and return its path.

    layout: messages (LLaMA-Factory) or conversations (LLaVA). text_only_every=k: every k-th record
    has no image (a text-only turn, to mix both span rules in a batch). question/answer: the same
    question and answer for every record (default: colour questions and their answers)."""
    from PIL import Image, ImageDraw

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        colour = names[i % len(names)]
        q = question or QUESTIONS[rng.randrange(len(QUESTIONS))]
        a = answer or (colour if "colo" in q else f"a picture of a {colour} square .")
        if text_only_every and i % text_only_every == text_only_every - 1:
            turns, images = [("user", f"the shape is {colour} . {q}"), ("assistant", a)], []
        else:
            w, h = rng.choice([(84, 56), (56, 84), (112, 112), (56, 56)])
            img = Image.new("RGB", (w, h), COLOURS["white" if colour != "white" else "black"])
            ImageDraw.Draw(img).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=COLOURS[colour])
            path = f"images/{i:04d}.png"
            img.save(out / path)
            turns, images = [("user", f"<image>{q}"), ("assistant", a)], [path]
        if layout == "messages":
            rec = {"messages": [{"role": r, "content": c} for r, c in turns], "images": images}
        elif layout == "conversations":
            rec = {"conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns]}
            if images:
                rec["image"] = images[0]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        lines.append(json.dumps(rec))
    path = out / name
    path.write_text("\n".join(lines) + "\n")
    return path
