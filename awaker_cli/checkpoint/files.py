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


def hub_id(name_or_path: str | Path | None) -> str | None:
    """The hub id behind a model reference: the reference itself when it reads as one
    ("Qwen/Qwen2-VL-7B-Instruct"), the id of a snapshot in the hub cache
    (.../models--Qwen--Qwen2-VL-7B-Instruct/snapshots/REV), else None (a plain local directory)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    parts = Path(text).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/")
    owner, _, name = text.partition("/")
    if owner and name and "/" not in name and not text.startswith((".", "~")) and not Path(text).exists():
        return text
    return None


def _card_data(directory: Path):
    """The metadata of the card in `directory`, or None when there is none (or it does not parse)."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(directory / "README.md").data if (directory / "README.md").is_file() else None
    except Exception:  # noqa: BLE001 - a base's hand-written card is not ours to judge
        return None


def write_model_card(directory: Path, title: str, lines: list[str], *, source: Path | None = None,
                     base_model: str | None = None):
    """README.md with Hub metadata (huggingface_hub's ModelCard) that says what the directory is.

    What it is comes from the directory itself: awaker_config.json makes it an awaker LoRA-MoE (or plain
    LoRA) directory that plain transformers loads only the base of; without it a dense model; a
    quantization_config in config.json a quantized one. base_model is the hub id of the dense model it
    came from: `base_model` if that is one, else the hub id of `source`, else the base_model of `source`'s
    own card (a trained model's card names the hub model its upcycled input came from). The license is
    carried over from `source`'s card.
    """
    from huggingface_hub import ModelCard, ModelCardData

    directory = Path(directory)
    source_data = _card_data(Path(source)) if source is not None else None
    base = hub_id(base_model) or hub_id(source) or (getattr(source_data, "base_model", None) if source_data else None)
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    awaker = None
    if (directory / "awaker_config.json").is_file():
        awaker = json.loads((directory / "awaker_config.json").read_text())
    config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    quantized = "quantization_config" in config
    tags = ["awaker", config.get("model_type", "qwen2_vl").replace("_", "-")]
    if awaker is not None:
        tags.append("lora-moe" if awaker.get("num_experts", 0) else "lora")
    if quantized:
        tags.append(config["quantization_config"].get("quant_method", "quantized"))
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", tags=tags,
        license=getattr(source_data, "license", None) if source_data else None,
        base_model=base, base_model_relation=("quantized" if quantized else "finetune") if base else None)
    if awaker is not None:
        cls = (config.get("architectures") or ["AutoModelForImageTextToText"])[0]
        how = ("Load it with awaker (`awaker info`, `awaker chat`, `awaker serve`). Plain transformers "
               f"(`{cls}.from_pretrained`) loads only the base model from this directory: "
               "its base tensors keep the hub names, and the adapters and routers are awaker's, which "
               "transformers skips. To get one dense model for other tools, bake a routing in with `awaker merge`.")
        if (directory / "awaker_base.json").is_file():
            how = ("Load it with awaker (`awaker info`, `awaker chat`, `awaker serve`). This directory holds the "
                   "adapters and routers only; awaker_base.json records the base model they were trained on "
                   "(path, hub id, a hash of its tensors), which awaker finds and verifies. Plain transformers "
                   "cannot load it: `awaker export` or `awaker merge` writes a complete model.")
    else:
        how = "A plain dense model: transformers (and any tool that reads its format) loads it as it is."
    body = "\n".join(f"- {line}" for line in lines)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n\n{how}\n")
    card.save(directory / "README.md")
