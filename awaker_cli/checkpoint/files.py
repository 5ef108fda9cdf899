"""The non-weight files a Qwen2-VL directory needs (tokenizer, processor, chat template), copied whole and
verified, plus the model card. A missing file is an error, not a surprise at chat time."""
from __future__ import annotations

import filecmp
import json
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
        file, key = name.split(":")
        path = directory / file
        return path.is_file() and key in _read_json(path)
    return (directory / name).is_file()


def missing_processor_files(directory: Path) -> list[str]:
    return [f"{group} ({' or '.join(names)})" for group, names in REQUIRED_GROUPS.items()
            if not any(_present(directory, n) for n in names)]


def processor_files(directory: Path) -> list[str]:
    names = {n for names in REQUIRED_GROUPS.values() for n in names if ":" not in n} | set(OPTIONAL)
    return sorted(n for n in names if (directory / n).is_file())


def check_processor_files(directory: Path) -> list[str]:
    """The processor file names of `directory`; an error if one is missing or is not valid JSON."""
    missing = missing_processor_files(directory)
    if missing:
        raise AwakerError(f"{directory}: missing processor/tokenizer files: {', '.join(missing)}")
    names = processor_files(directory)
    for name in names:
        if name.endswith(".json"):
            _read_json(directory / name)  # a corrupt file: say so now, not at chat time
    return names


def _check_link(directory: Path, name: str) -> None:
    """A file of the set may be a link only into its own model directory, or (a hub cache snapshot) into
    the cached repository's blobs/: a link elsewhere (merges.txt -> /etc/passwd) would copy that file."""
    path = directory / name
    if not path.is_symlink():
        return
    target, home = path.resolve(), directory.resolve()
    roots = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    if not any(target == r or r in target.parents for r in roots):
        raise AwakerError(f"{path}: is a link to {target}, outside the model directory; copy the real file there")


def copy_processor_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer/processor/chat-template set, byte for byte, and check the copy. Links are
    followed only inside the model directory (or its hub cache); the copies are regular files."""
    names = check_processor_files(src)
    for name in names:
        _check_link(src, name)
        shutil.copy2(src / name, dst / name)
        if not filecmp.cmp(src / name, dst / name, shallow=False):
            raise AwakerError(f"{dst / name}: copy differs from {src / name}")
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AwakerError(f"{path}: not valid JSON ({e})")


def special_token_ids(directory: Path, tokens: list[str]) -> dict[str, int]:
    """The ids of special tokens, read from the tokenizer files (no tokenizer is loaded)."""
    found: dict[str, int] = {}
    tokenizer, config, vocab = (directory / n for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if tokenizer.is_file():
        found.update({a.get("content"): int(a["id"]) for a in _read_json(tokenizer).get("added_tokens", [])})
    if config.is_file():
        decoder = _read_json(config).get("added_tokens_decoder", {})
        found.update({a.get("content"): int(i) for i, a in decoder.items() if a.get("content") not in found})
    missing = [t for t in tokens if t not in found]
    if missing and vocab.is_file():
        found.update({t: int(i) for t, i in _read_json(vocab).items() if t in missing})
    for token in tokens:
        if token not in found:
            raise AwakerError(f"{directory}: the tokenizer has no {token} token")
    return {t: found[t] for t in tokens}


def write_model_card(directory: Path, title: str, lines: list[str]):
    body = "\n".join(f"- {line}" for line in lines)
    (directory / "README.md").write_text(
        f"---\nlibrary_name: transformers\ntags: [awaker, qwen2-vl, lora-moe]\n---\n\n# {title}\n\n{body}\n\n"
        "Load it with awaker (`awaker info`, `awaker chat`); its base tensors keep the Qwen2-VL hub names.\n")
