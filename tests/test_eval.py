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
             "images": ["missing.png"]}, "missing image missing.png"),
           ({"messages": [{"role": "user", "content": "x"}]}, "the last turn must be the assistant's"),
           ({"text": "x"}, "'messages' or 'conversations'")]
    for record, message in bad:
        path = _write(tmp_path / "bad.jsonl", [multi, record])
        with pytest.raises(AwakerError, match=message) as e:
            load_samples(path)
        assert str(e.value).startswith(f"{path}:2: ")  # file:line, as training reports it
        assert "skip_bad_records" not in str(e.value)  # eval has no such option


def test_load_samples_conversations_layout_and_limit(tmp_path):
    """Eval reads what training reads: the LLaVA/Qwen layout with `images`, a system turn, a task, and a
    broken record after --limit is never read."""
    make_image("y")[0].save(tmp_path / "b.png")
    record = {"system": "Answer in one word.", "images": ["b.png"], "task": "shape",
              "conversations": [{"from": "human", "value": "What shape?<image>"}, {"from": "gpt", "value": "ok"},
                                {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n" + "{broken\n")
    [sample] = load_samples(path, limit=1)
    assert (sample.task, sample.question, sample.answer, sample.images) == ("shape", "And the colour?", "red",
                                                                             [tmp_path / "b.png"])
    assert [m["role"] for m in sample.prompt] == ["system", "user", "assistant", "user"]
    assert sample.prompt[1]["content"] == [{"type": "text", "text": "What shape?"}, {"type": "image"}]
    with pytest.raises(AwakerError, match=f"{path}:2: bad JSON"):
        load_samples(path)


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


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """One batch of prompts of different lengths: one image, two images of different sizes, no image, and
    a system turn with an earlier exchange."""
    root = tmp_path_factory.mktemp("mixed")
    for i in range(3):
        make_image(f"eval-engine/{i}")[0].resize((112, 56 * (i + 1))).save(root / f"{i}.png")
    def user(text):
        return {"role": "user", "content": text}

    records = [
        {"messages": [user("<image>What colour are the shapes?"), {"role": "assistant", "content": "-"}],
         "images": ["0.png"]},
        {"messages": [user("<image><image>Which digit is shown?"), {"role": "assistant", "content": "-"}],
         "images": ["1.png", "2.png"]},
        {"messages": [user("Repeat: red blue"), {"role": "assistant", "content": "-"}]},
        {"messages": [{"role": "system", "content": "Answer briefly."}, user("<image>What shape are they?"),
                      {"role": "assistant", "content": "They are circles."}, user("How many shapes are there?"),
                      {"role": "assistant", "content": "-"}], "images": ["2.png"]},
    ]
    return _write(root / "mixed.jsonl", records)


@pytest.mark.parametrize("which", ["pretrained dense", "random LoRA-MoE"])
def test_engine_answers_equal_transformers_generate(which, mixed_data, random_moe):
    """Eval's engine (static cache, one prefill for the batch, routing once per request) answers exactly
    what transformers' greedy `generate` answers for the same left-padded batch, routes included."""
    import torch
    from PIL import Image

    from awaker_cli.evaluate import answer_samples, eval_engine, generate_answers, load_for_eval, prepare

    path = tiny_base_path() if which == "pretrained dense" else random_moe
    model, processor, _ = load_for_eval(path, device="cpu")
    reference, _, _ = load_for_eval(path, device="cpu")  # the engine merges and fuses its model in place
    samples = load_samples(mixed_data)
    engine = eval_engine(model, processor)
    got = answer_samples(engine, [s.prompt for s in samples], [s.images for s in samples], max_new_tokens=12)

    images = [[Image.open(p).convert("RGB") for p in s.images] for s in samples]
    inputs = prepare(processor, [s.prompt for s in samples], images)
    want = generate_answers(reference, processor, inputs, 12, stop=sorted(engine.stop_ids))
    assert [g.text.strip() for g in got] == want
    if which == "pretrained dense":  # real answers, ending at a stop token at different steps
        assert want[0].startswith("They are") and {g.finish_reason for g in got} == {"stop"}
        assert len({len(g.tokens) for g in got}) > 1
    else:
        routes = torch.cat([g.routing.expert_ids for g in got])
        assert torch.equal(routes, reference.awaker_state.current.expert_ids)
        assert len({tuple(r) for r in routes[:, :, 0].tolist()}) > 1, "the batch should mix routes"


def test_eval_bad_device_and_dtype(neutral_data, capsys):
    for option, value, message in (("--dtype", "fp8", "--dtype must be one of"), ("--device", "tpu", "--device must be")):
        assert run(["eval", str(tiny_base_path()), "--data", str(neutral_data), option, value]) == 2
        assert message in capsys.readouterr().err
