"""The synthetic tasks: four families whose answer formats conflict, two styles each, cued in the prompt.

    colour   color-word   "red"                         color-json   '{"color": "RED"}'
    count    count-numeral "3"                           count-word   "three"
    digit    ocr-numeral  "7"                            ocr-word     "seven"
    caption  caption-sentence "Three red triangles and the digit 7."   caption-tags "red, triangle, 3, 7"

The same question with a different short cue ("Reply in JSON.") wants a different answer format: the
multi-task conflict a LoRA-MoE should resolve. `neutral_qa` gives the plain-sentence descriptions the
tiny base is pretrained on, in none of these formats, so adaptation has something to learn.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .images import Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_TOKEN = "<image>"

QUESTIONS = {
    "color": "What colour are the shapes?",
    "count": "How many shapes are there?",
    "ocr": "Which digit is shown?",
    "caption": "Describe the image.",
}


def _plural(scene: Scene) -> str:
    return scene.shape + ("s" if scene.count > 1 else "")


def _json_colour(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and list(value) == ["color"] and isinstance(value["color"], str)
            and re.fullmatch(r"[A-Z]+", value["color"]) is not None)


def _fullmatch(pattern: str) -> Callable[[str], bool]:
    regex = re.compile(pattern)
    return lambda text: regex.fullmatch(text) is not None


_NUMBER_WORD = "(" + "|".join(NUMBER_WORDS) + ")"


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    cue: str  # the short style instruction appended to the question
    answer: Callable[[Scene], str]
    complies: Callable[[str], bool]  # does a (stripped) answer have this task's format?

    def prompt(self) -> str:
        return f"{QUESTIONS[self.family]} {self.cue}"


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("color-word", "color", "Reply with one word.", lambda s: s.colour, _fullmatch(r"[a-z]+")),
    Task("color-json", "color", "Reply in JSON.", lambda s: json.dumps({"color": s.colour.upper()}), _json_colour),
    Task("count-numeral", "count", "Reply with a numeral.", lambda s: str(s.count), _fullmatch(r"\d+")),
    Task("count-word", "count", "Reply in words.", lambda s: NUMBER_WORDS[s.count], _fullmatch(_NUMBER_WORD)),
    Task("ocr-numeral", "ocr", "Reply with a numeral.", lambda s: str(s.digit), _fullmatch(r"\d+")),
    Task("ocr-word", "ocr", "Reply in words.", lambda s: NUMBER_WORDS[s.digit], _fullmatch(_NUMBER_WORD)),
    Task("caption-sentence", "caption", "Reply with a sentence.",
         lambda s: f"{NUMBER_WORDS[s.count].capitalize()} {s.colour} {_plural(s)} and the digit {s.digit}.",
         _fullmatch(r"[A-Z][^,\n]*\.")),
    Task("caption-tags", "caption", "Reply with tags.",
         lambda s: f"{s.colour}, {s.shape}, {s.count}, {s.digit}", _fullmatch(r"[a-z0-9]+(, [a-z0-9]+)+")),
]}
FAMILIES = tuple(dict.fromkeys(t.family for t in TASKS.values()))


def format_ok(task: str, text: str) -> bool | None:
    """Whether `text` has the answer format of `task`; None for a task this module does not know."""
    spec = TASKS.get(task)
    return None if spec is None else spec.complies(text.strip())


def task_record(task: str, scene: Scene, image_path: str) -> dict:
    """One sample in the training data format (LLaMA-Factory messages + images, plus `task`)."""
    spec = TASKS[task]
    return {
        "messages": [{"role": "user", "content": IMAGE_TOKEN + spec.prompt()},
                     {"role": "assistant", "content": spec.answer(scene)}],
        "images": [image_path],
        "task": task,
    }


# ---- neutral descriptions, for pretraining the tiny base ----------------------------------------------

NEUTRAL_KINDS = ("describe", "color", "count", "ocr", "shape")


def _number(n: int, rng: random.Random) -> str:
    # Both spellings, so the base knows that "3" and "three" mean the same count.
    return NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)


def neutral_qa(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question (the task families' questions without a style cue) and a plain-sentence answer."""
    if kind == "describe":
        return QUESTIONS["caption"], (f"The picture shows {_number(scene.count, rng)} {scene.colour} "
                                      f"{_plural(scene)} and a digit {_number(scene.digit, rng)}.")
    if kind == "color":
        return QUESTIONS["color"], f"They are {scene.colour}."
    if kind == "count":
        verb = "is" if scene.count == 1 else "are"
        return QUESTIONS["count"], f"There {verb} {_number(scene.count, rng)} {_plural(scene)}."
    if kind == "ocr":
        return QUESTIONS["ocr"], f"The digit is {_number(scene.digit, rng)}."
    if kind == "shape":
        return "What shape are they?", f"They are {scene.shape}s."
    raise ValueError(f"unknown kind {kind!r}")
