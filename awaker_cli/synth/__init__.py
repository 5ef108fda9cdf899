"""Synthetic multi-task data (images with shapes and a digit, four task families with conflicting answer
formats), and the tiny pretrained Qwen2-VL base shipped with the package."""
from .dataset import write_dataset
from .images import COLOURS, SHAPES, Scene, make_image
from .tasks import FAMILIES, NUMBER_WORDS, TASKS, format_ok, neutral_qa, task_record

__all__ = ["COLOURS", "FAMILIES", "NUMBER_WORDS", "SHAPES", "TASKS", "Scene", "format_ok", "make_image",
           "neutral_qa", "task_record", "tiny_base_path", "write_dataset"]


def tiny_base_path():
    """The directory of the shipped tiny pretrained Qwen2-VL (awaker_cli/assets/tiny-base)."""
    from pathlib import Path

    from ..errors import AwakerError

    path = Path(__file__).resolve().parent.parent / "assets" / "tiny-base"
    if not (path / "config.json").is_file():
        raise AwakerError(f"{path}: the shipped tiny base is missing (rebuild it with `awaker pretrain-tiny`)")
    return path
