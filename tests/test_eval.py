"""`awaker eval`: metrics on hand-made predictions, data parsing, and the command end to end on the
shipped tiny base (dense) and an upcycled LoRA-MoE (routing statistics)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from awaker_cli.cli import run
from awaker_cli.errors import AwakerError
from awaker_cli.evaluate import comparison_table, load_samples, routing_stats, score
from awaker_cli.synth import TASKS, make_image, tiny_base_path, write_dataset


def test_score_exact_match_format_and_macro():
    tasks = ["color-word", "color-word", "color-json", "color-json", "all"]
    answers = ["red", "blue", '{"color": "RED"}', '{"color": "BLUE"}', "The answer."]
    predictions = [" red\n", "green", '{"color": "red"}', '{"color": "BLUE"}', "the answer."]
    result = score(tasks, answers, predictions)
    assert result["n"] == 5
    assert result["tasks"]["color-word"] == {"n": 2, "exact_match": 0.5, "format": 1.0}  # green: wrong, but a word
    assert result["tasks"]["color-json"] == {"n": 2, "exact_match": 0.5, "format": 0.5}  # lowercase is off-format
    assert result["tasks"]["all"] == {"n": 1, "exact_match": 0.0, "format": None}  # case counts; no format known
    assert result["macro"] == {"exact_match": pytest.approx(1 / 3), "format": 0.75}
    assert result["micro_exact_match"] == pytest.approx(2 / 5)


def test_routing_purity_and_histogram():
    tasks = ["a", "a", "b", "b"]
    experts = [[0, 0], [0, 0], [1, 0], [1, 1]]  # router 0 separates a|b, router 1 mixes one b into a's expert
    stats = routing_stats(tasks, experts, num_experts=3)
    assert stats["purity_per_router"] == [1.0, 0.75]
    assert stats["purity"] == pytest.approx(0.875)
    assert stats["chance"] == 0.5
    assert stats["histogram"] == {"a": [1.0, 0.0, 0.0], "b": [0.25, 0.75, 0.0]}
    collapsed = routing_stats(tasks, [[2, 2]] * 4, num_experts=3)
    assert collapsed["purity"] == collapsed["chance"] == 0.5


def test_comparison_table_puts_models_side_by_side():
    from rich.console import Console

    dense = {"tasks": {"color-word": {"exact_match": 0.5}, "count-word": {"exact_match": 1.0}}, "macro": {"exact_match": 0.75}}
    moe = {"tasks": {"color-word": {"exact_match": 1.0}}, "macro": {"exact_match": 1.0}, "routing": {"purity": 0.5}}
    console = Console(width=100, record=True)
    console.print(comparison_table({"dense LoRA": dense, "LoRA-MoE": moe}))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "count-word" in line)
    assert "100.0" in row and row.rstrip().endswith("- │")  # the MoE did not report that task
    assert "75.0" in next(line for line in lines if "macro" in line)
    assert "50.0" in next(line for line in lines if "routing purity" in line)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_samples_formats_and_errors(tmp_path):
    make_image("x")[0].save(tmp_path / "a.png")
    llava = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                  {"from": "gpt", "value": "A picture."}]}
    multi = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Colour?"},
                          {"role": "assistant", "content": "red"}], "task": "color-word"}
    samples = load_samples(_write(tmp_path / "d.jsonl", [llava, multi]))
    assert samples[0].task == "all" and samples[0].answer == "A picture." and samples[0].images == [tmp_path / "a.png"]
    assert samples[0].prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]}]
    assert samples[1].question == "Colour?" and len(samples[1].prompt) == 4 and samples[1].prompt[0]["content"] == "Be brief."
    (tmp_path / "d.json").write_text(json.dumps([multi]))  # a JSON list works too
    assert load_samples(tmp_path / "d.json")[0].answer == "red"
    bad = [({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
             "images": ["a.png"]}, "2 <image> placeholder"),
           ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
             "images": ["missing.png"]}, "not found"),
           ({"messages": [{"role": "user", "content": "x"}]}, "assistant answer"),
           ({"text": "x"}, "'messages' or 'conversations'")]
    for record, message in bad:
        with pytest.raises(AwakerError, match=message):
            load_samples(_write(tmp_path / "bad.jsonl", [record]))


@pytest.fixture(scope="module")
def neutral_data(tmp_path_factory):
    """Questions the shipped base was pretrained to answer (neutral style), no task field."""
    root = tmp_path_factory.mktemp("evaldata")
    records = []
    for i in range(6):
        image, scene = make_image(f"eval-test/{i}")
        image.save(root / f"{i}.png")
        question, answer = (("What colour are the shapes?", f"They are {scene.colour}.") if i % 2 else
                            ("What shape are they?", f"They are {scene.shape}s."))
        records.append({"messages": [{"role": "user", "content": "<image>" + question},
                                     {"role": "assistant", "content": answer}], "images": [f"{i}.png"]})
    return _write(root / "neutral.jsonl", records)


def test_eval_dense_end_to_end(neutral_data, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    assert run(["eval", str(tiny_base_path()), "--data", str(neutral_data), "--batch-size", "4",
                "--predictions", str(preds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "dense" and "routing" not in result and result["n"] == 6
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert set(rows[0]) >= {"index", "task", "question", "answer", "prediction"}
    assert rows[1]["question"] == "<image>What colour are the shapes?"
    # the pretrained base really answers (a random model would not), and the metrics match the rows
    assert result["tasks"]["all"]["exact_match"] == sum(r["prediction"] == r["answer"] for r in rows) / 6 >= 5 / 6
    # batching with left padding does not change greedy answers
    assert run(["eval", str(tiny_base_path()), "--data", str(neutral_data), "--batch-size", "1",
                "--predictions", str(tmp_path / "p1.jsonl"), "--json"]) == 0
    capsys.readouterr()
    assert [json.loads(line)["prediction"] for line in (tmp_path / "p1.jsonl").read_text().splitlines()] == \
           [r["prediction"] for r in rows]


def test_eval_moe_routing_and_table(tiny_moe, tmp_path, capsys):
    data = write_dataset(tmp_path / "d", 0, 16, seed=2)["test"]
    preds = tmp_path / "p.jsonl"
    assert run(["eval", str(tiny_moe), "--data", data, "--max-new-tokens", "2", "--batch-size", "8",
                "--predictions", str(preds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    routing, rows = result["routing"], [json.loads(line) for line in preds.read_text().splitlines()]
    assert result["kind"] == "awaker" and sorted(routing["histogram"]) == sorted(TASKS)
    assert all(len(r["experts"]) == 4 for r in rows)  # 2 layers x 2 routers, top-1 expert each
    for task, shares in routing["histogram"].items():  # the histogram is the rows' routes, counted
        mine = [r["experts"] for r in rows if r["task"] == task]
        assert shares == [sum(e.count(x) for e in mine) / (4 * len(mine)) for x in range(4)]
    assert routing["chance"] == 2 / 16 and routing["chance"] <= routing["purity"] <= 1
    assert run(["eval", str(tiny_moe), "--data", data, "--max-new-tokens", "1", "--limit", "4"]) == 0
    err = capsys.readouterr().err
    assert "macro" in err and "routing purity" in err


def test_eval_bad_input(tmp_path, neutral_data, capsys):
    assert run(["eval", str(tmp_path), "--data", str(neutral_data)]) == 2
    assert "error:" in capsys.readouterr().err
    assert run(["eval", str(tiny_base_path()), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
