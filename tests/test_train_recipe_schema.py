"""The recipe's pydantic schema: `awaker train --recipe-schema` (the JSON schema editors read), the shipped
recipes against it, and pydantic's errors as one line with exit 2."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.train.recipe import find_recipe, load_recipe, shipped_recipes

from .test_train_recipe import expect_error

def problems(value, schema: dict) -> list[str]:
    """What a JSON-schema validator (an editor's) flags in value, one line per problem."""
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


@pytest.fixture(scope="module")
def schema():
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run(["train", "--recipe-schema"]) == 0  # no recipe needed
    return json.loads(buf.getvalue())


def test_recipe_schema_is_json_for_editors(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"stage", "model", "init_from", "output_dir", "adapter", "data", "train"} == set(schema["properties"])
    assert schema["properties"]["stage"]["enum"] == [1, 2, 3]
    defs = schema["$defs"]
    assert {"AdapterSection", "DataSection", "TrainSection"} <= set(defs)
    for obj in (schema, *defs.values()):
        assert obj["additionalProperties"] is False  # editors flag unknown keys, as awaker does
        for name, prop in obj["properties"].items():
            assert prop.get("description") or "$ref" in prop, f"{name} has no description to show on hover"
    train = defs["TrainSection"]["properties"]
    assert train["precision"]["enum"] == ["bf16", "fp32"] and train["batch_size"]["minimum"] == 1
    assert train["lr"]["exclusiveMinimum"] == 0 and train["lr"]["type"] == "number"


def test_shipped_recipes_validate_against_the_schema(schema):
    names = shipped_recipes()
    assert len(names) >= 9
    for name in names:
        data = yaml.safe_load(find_recipe(name).read_text())
        assert problems(data, schema) == [], name
        assert load_recipe(name).stage == data["stage"]
    # the checker finds what an editor would flag
    bad = {"stage": 4, "adapter": {"rank": "big", "combine": "sum"}, "train": {"lrr": 1, "lr": 0, "progress": 1},
           "data": {"train": ["a.jsonl", ["b.jsonl"]]}}
    assert len(problems(bad, schema)) == 7, problems(bad, schema)


@pytest.mark.parametrize("text,fragments", [
    ("train:\n  lrr: 1\n", ["unknown field train.lrr", "allowed in train: seed, epochs"]),
    ("adapter:\n  rank: big\n", ["recipe: adapter.rank must be an integer, got 'big'"]),
    ("data: [a.jsonl]\n", ["recipe: data must be a mapping of fields, got ['a.jsonl']"]),
    ("train:\n  epochs: true\n", ["train.epochs must be an integer, got True"]),
    ("train:\n  progress: 1\n", ["train.progress must be true or false, got 1"]),
    ("train:\n  warmup_ratio: 1\n", ["train.warmup_ratio must be in [0, 1), got 1"]),
    ("data:\n  train: [a.jsonl, [b]]\n", ["data.train[1] must be a string, got ['b']"]),
    ("adapter:\n  moe_targets: [o_proj, qproj]\n", ["adapter.moe_targets[1] must be one of q_proj, k_proj"]),
])
def test_schema_errors_are_one_line(tmp_path, capsys, text, fragments):
    path = tmp_path / "r.yaml"
    path.write_text("stage: 2\ninit_from: s1\n" + text)
    expect_error(capsys, ["train", str(path), "--print-config"], *fragments)
    with pytest.raises(AwakerError) as info:  # the library raises the project's error, not pydantic's
        load_recipe(str(path))
    assert type(info.value) is AwakerError and info.value.__suppress_context__


def test_lax_where_recipes_need_it(tmp_path):
    """YAML 1.1 reads 1e-4 as a string, an empty section as null, a lone file as a scalar: all still read."""
    path = tmp_path / "r.yaml"
    path.write_text("stage: 1\nmodel: 7\nadapter:\ndata:\n  train: a.jsonl\ntrain:\n  lr: 1e-4\n  epochs: 2.0\n")
    r = load_recipe(str(path))
    assert r.train.lr == pytest.approx(1e-4) and r.train.epochs == 2 and isinstance(r.train.epochs, int)
    assert r.data.train == ["a.jsonl"] and r.model == "7" and r.adapter.rank is None


def test_the_schema_accepts_what_awaker_accepts(schema, tmp_path):
    """An editor must not flag what awaker reads: an empty section, a lone file or target for a list."""
    texts = ["stage: 1\nmodel: m\nadapter:\ndata:\n  train: a.jsonl\n  val: b.jsonl\ntrain:\n  lr: 1.0e-4\n",
             "stage: 2\ninit_from: s1\nadapter:\n  moe_targets: o_proj\n"]
    for text in texts:
        (tmp_path / "r.yaml").write_text(text)
        load_recipe(str(tmp_path / "r.yaml"))  # awaker reads it
        assert problems(yaml.safe_load(text), schema) == [], text
    assert problems({"stage": 2, "adapter": {"moe_targets": "qproj"}}, schema) != []
