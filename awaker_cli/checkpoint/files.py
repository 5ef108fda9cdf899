"""The non-weight files a Qwen2-VL directory needs (tokenizer, processor, chat template), copied whole and
verified, plus the model card. A missing file is an error, not a surprise at chat time."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import AwakerError

# Each group needs one of its files; the first group's alternatives cover old and new tokenizer saves.
REQUIRED_GROUPS = {
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "tokenizer config": ("tokenizer_config.json",),
    "image processor config": ("preprocessor_config.json", "processor_config.json"),
    "chat template": ("chat_template.json", "chat_template.jinja", "tokenizer_config.json:chat_template"),
}
OPTIONAL = (
    "generation_config.json", "merges.txt", "vocab.json", "special_tokens_map.json", "added_tokens.json",
    "video_preprocessor_config.json", "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja", "tokenizer.json",
)


def _present(directory: Path, name: str) -> bool:
    if ":" in name:  # a key inside a JSON file
        import json

        file, key = name.split(":")
        path = directory / file
        return path.is_file() and key in json.loads(path.read_text())
    return (directory / name).is_file()


def missing_processor_files(directory: Path) -> list[str]:
    return [f"{group} ({' or '.join(names)})" for group, names in REQUIRED_GROUPS.items()
            if not any(_present(directory, n) for n in names)]


def processor_files(directory: Path) -> list[str]:
    names = {n for names in REQUIRED_GROUPS.values() for n in names if ":" not in n} | set(OPTIONAL)
    return sorted(n for n in names if (directory / n).is_file())


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/processor/chat-template set and check that the copy loads as a processor."""
    missing = missing_processor_files(src)
    if missing:
        raise AwakerError(f"{src}: missing processor/tokenizer files: {', '.join(missing)}")
    names = processor_files(src)
    for name in names:
        shutil.copy2(src / name, dst / name)
    verify_processor(dst)
    return names


def verify_processor(directory: Path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(directory)
    except Exception as e:  # transformers raises many types here; any of them means the set is unusable
        raise AwakerError(f"{directory}: processor files do not load ({type(e).__name__}: {e})")
    if not getattr(processor, "chat_template", None):
        raise AwakerError(f"{directory}: the processor has no chat template")


def write_model_card(directory: Path, title: str, lines: list[str]):
    body = "\n".join(f"- {line}" for line in lines)
    (directory / "README.md").write_text(
        f"---\nlibrary_name: transformers\ntags: [awaker, qwen2-vl, lora-moe]\n---\n\n# {title}\n\n{body}\n\n"
        "Load it with awaker (`awaker info`, `awaker chat`); its base tensors keep the Qwen2-VL hub names.\n")
