"""Model cards: Hub metadata that says what a directory is and where it came from, read back with
huggingface_hub's own ModelCard."""
from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from awaker_cli.checkpoint.files import hub_id
from awaker_cli.cli import run


def cli(capsys, *args) -> dict:
    capsys.readouterr()
    assert run([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def cached_base(tiny_base, tmp_path_factory):
    """The tiny base laid out as a hub-cache snapshot, with a license in its card, as a downloaded model is."""
    snap = tmp_path_factory.mktemp("hub") / "models--Org--Tiny-VL" / "snapshots" / "0123abc"
    shutil.copytree(tiny_base, snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\ntags: [vision]\n---\n\n# Tiny-VL\n")
    return snap


def test_hub_id():
    assert hub_id("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct"
    assert hub_id("/x/hub/models--Qwen--Qwen2-VL-7B-Instruct/snapshots/abc") == "Qwen/Qwen2-VL-7B-Instruct"
    assert hub_id("/tmp") is None and hub_id("./out/stage1") is None and hub_id("a/b/c") is None


def test_upcycled_card_names_the_hub_base_and_its_license(cached_base, tmp_path, capsys):
    out = tmp_path / "moe"
    cli(capsys, "upcycle", cached_base, out, "--rank", "4")
    card = ModelCard.load(out / "README.md")
    d = card.data
    assert d.base_model == "Org/Tiny-VL"  # the hub id, not the local snapshot path
    assert d.base_model_relation == "finetune" and d.license == "apache-2.0"
    assert d.pipeline_tag == "image-text-to-text" and d.library_name == "transformers"
    assert {"awaker", "qwen2-vl", "lora-moe"} <= set(d.tags)
    assert "loads only the base model" in card.text
    assert "only the base model" in cli(capsys, "info", out)["transformers_loads"]

    # a model derived from it (here a baked dense model) keeps naming the hub base, and is not tagged lora-moe
    dense = tmp_path / "dense"
    cli(capsys, "merge", out, dense, "--expert", 0, "--p", 0.8)
    d = ModelCard.load(dense / "README.md").data
    assert not (dense / "awaker_config.json").exists()
    assert d.base_model == "Org/Tiny-VL" and d.license == "apache-2.0"
    assert "lora-moe" not in d.tags and "lora" not in d.tags
    assert "loads it as it is" in ModelCard.load(dense / "README.md").text
    assert cli(capsys, "info", dense)["transformers_loads"] == "the whole model"


def test_local_base_has_no_hub_base_model(tiny_moe, tmp_path, capsys):
    d = ModelCard.load(tiny_moe / "README.md").data
    assert d.base_model is None and getattr(d, "base_model_relation", None) is None  # a local path is no hub id


def test_quantized_export_card(random_moe, tmp_path, capsys):
    out = tmp_path / "nf4"
    cli(capsys, "export", random_moe, out, "--quantize", "nf4")
    d = ModelCard.load(out / "README.md").data
    assert "bitsandbytes" in d.tags and "lora-moe" in d.tags
