"""`awaker stats` and `awaker prune`: routing histograms, pruning experts by usage, rank reduction by SVD."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoProcessor

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.cli import run
from awaker_cli.model import load_model
from awaker_cli.ops.records import read_records, run_data


def cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert run([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def routed(random_moe, tiny_records):
    """The source model's routing of every record, measured directly."""
    model = load_model(random_moe)
    return run_data(model, AutoProcessor.from_pretrained(random_moe), read_records(tiny_records))


def test_stats_histograms(random_moe, tiny_records, routed, capsys):
    s = cli_json(capsys, "stats", random_moe, "--data", tiny_records)
    assert s["records"] == 12 and len(s["routers"]) == 4
    for r, router in enumerate(s["routers"]):
        assert router["counts"] == torch.bincount(routed.expert_ids[:, r, 0], minlength=4).tolist()
        assert router["mean_p"] == pytest.approx(float(routed.probs[:, r].mean()), abs=1e-4)
        assert 0 <= router["entropy"] <= math.log(4) + 1e-6
    assert s["overall"]["counts"] == torch.bincount(routed.expert_ids.reshape(-1), minlength=4).tolist()
    assert set(s["tasks"]) == {"color", "count"}
    assert s["tasks"]["color"]["records"] + s["tasks"]["count"]["records"] == 12
    assert sum(s["tasks"]["count"]["counts"]) == s["tasks"]["count"]["records"] * 4
    assert s["loss"] == pytest.approx(routed.loss, rel=1e-5)
    capsys.readouterr()
    assert run(["stats", str(random_moe), "--data", str(tiny_records)]) == 0
    assert "task color" in capsys.readouterr().err


def test_prune_keep_removes_least_used_experts(random_moe, tiny_records, routed, tmp_path, capsys):
    out = tmp_path / "pruned"
    r = cli_json(capsys, "prune", random_moe, out, "--data", tiny_records, "--keep", 2)
    usage = torch.bincount(routed.expert_ids.reshape(-1), minlength=4).float()
    assert r["kept_experts"] == sorted(torch.argsort(-usage, stable=True)[:2].tolist())
    kept = r["kept_experts"]
    cfg = json.loads((out / "awaker_config.json").read_text())
    assert cfg["num_experts"] == 2
    old, new = Checkpoint(random_moe), Checkpoint(out)
    # router rows and expert slots of the kept experts are copied bit for bit; the global expert stays last
    assert torch.equal(new.get("awaker_routers.gate_weight"), old.get("awaker_routers.gate_weight")[:, kept])
    assert torch.equal(new.get("awaker_routers.gate_bias"), old.get("awaker_routers.gate_bias")[:, kept])
    key = "model.layers.0.self_attn.o_proj.lora_B"
    assert torch.equal(new.get(key), old.get(key)[kept + [4]])
    # the pruned model loads, runs, and a record whose expert was kept still picks it
    after = run_data(load_model(out), AutoProcessor.from_pretrained(out), read_records(tiny_records))
    before = routed.expert_ids[..., 0]
    stays = torch.isin(before, torch.tensor(kept))
    assert stays.any() and not stays.all()
    renumber = {e: i for i, e in enumerate(kept)}
    assert all(after.expert_ids[..., 0][stays].tolist()[i] == renumber[e]
               for i, e in enumerate(before[stays].tolist()))
    assert r["loss_before"] == pytest.approx(routed.loss, rel=1e-5)
    assert r["loss_after"] == pytest.approx(after.loss, rel=1e-5)
    assert r["loss_change"] == pytest.approx(after.loss - routed.loss, rel=1e-4)


def test_prune_min_share(random_moe, tiny_records, tmp_path, capsys):
    r = cli_json(capsys, "prune", random_moe, tmp_path / "p", "--data", tiny_records, "--min-share", 0.15,
                 "--dry-run")
    assert r["kept_experts"] == [e for e, u in enumerate(r["usage"]) if u >= 0.15]
    assert r["removed_experts"] and not (tmp_path / "p").exists()


def test_prune_rank_by_svd(random_moe, tmp_path, capsys):
    out = tmp_path / "rank4"
    r = cli_json(capsys, "prune", random_moe, out, "--rank", 4)
    cfg = json.loads((out / "awaker_config.json").read_text())
    assert (cfg["rank"], cfg["alpha"]) == (4, 8.0)  # scaling alpha/rank stays 2
    key = "model.layers.1.self_attn.o_proj"
    old, new = Checkpoint(random_moe), Checkpoint(out)
    product = old.get(key + ".lora_B")[2].double() @ old.get(key + ".lora_A")[2].double()
    U, S, Vh = torch.linalg.svd(product)
    torch.testing.assert_close(new.get(key + ".lora_B")[2].double() @ new.get(key + ".lora_A")[2].double(),
                               U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
    energy = r["energy_kept"]["per_module"]
    assert len(energy) == 2 * 7 and all(0 < e < 1 for e in energy.values())
    load_model(out)


def test_prune_errors(random_moe, tiny_records, tmp_path, capsys):
    def error(*args):
        capsys.readouterr()
        assert run(["prune", *map(str, args)]) == 2
        return capsys.readouterr().err

    out = tmp_path / "out"
    assert "needs --data" in error(random_moe, out, "--keep", 2)
    assert "current rank" in error(random_moe, out, "--rank", 16)
    assert "nothing to do" in error(random_moe, out)
    assert "not both" in error(random_moe, out, "--keep", 2, "--min-share", 0.1, "--data", tiny_records)
    assert "fewer than top-k" in error(random_moe, out, "--min-share", 0.99, "--data", tiny_records)
    assert "is the input" in error(random_moe, random_moe, "--rank", 4, "--force")
    assert not out.exists()


def test_data_reader_labels_assistant_tokens_only(random_moe, tiny_records, tmp_path):
    from awaker_cli.ops.records import encode
    from awaker_cli.train.data import IGNORE_INDEX

    processor = AutoProcessor.from_pretrained(random_moe)
    records = read_records(tiny_records)
    batch = encode(processor, records[:4])  # two with images, one text-only, padded as in training
    answers = [processor.tokenizer.decode(ids[labels != IGNORE_INDEX]) for ids, labels in
               zip(batch["input_ids"], batch["labels"])]
    assert answers == ["red<|im_end|>", "green<|im_end|>", "blue<|im_end|>", "4<|im_end|>"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "<image>hi"},
                                            {"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(Exception, match="1 <image> placeholder"):
        read_records(bad)


def test_stats_reads_the_conversations_layout(random_moe, tiny_records, routed, tmp_path, capsys):
    """The LLaVA/Qwen layout (`conversations` + `image`) measures exactly as the same records in the
    `messages` layout: one reader for training and every --data option."""
    lines = []
    for line in tiny_records.read_text().splitlines():
        record = json.loads(line)
        turns = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                 for m in record["messages"]]
        converted = {"conversations": turns, "task": record["task"]}
        if record.get("images"):
            converted["image"] = str(tiny_records.parent / record["images"][0])  # absolute paths work too
        lines.append(json.dumps(converted))
    data = tmp_path / "llava.jsonl"
    data.write_text("\n".join(lines) + "\n")
    s = cli_json(capsys, "stats", random_moe, "--data", data)
    assert s["records"] == 12 and set(s["tasks"]) == {"color", "count"}
    assert s["overall"]["counts"] == torch.bincount(routed.expert_ids.reshape(-1), minlength=4).tolist()
    assert s["loss"] == pytest.approx(routed.loss, rel=1e-5)


@pytest.mark.parametrize("command", ["stats", "prune", "merge", "export"])
def test_bad_data_record_is_one_error_line_with_file_and_line(command, random_moe, tiny_records, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "what is 1 plus one ?"}, {"role": "assistant", "content": "2"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}]}  # no answer
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (good, good, bad, good)) + "\n")
    args = {"stats": [], "prune": [tmp_path / "o", "--keep", 2], "merge": [tmp_path / "o"],
            "export": [tmp_path / "o", "--quantize", "none"]}[command]
    capsys.readouterr()
    assert run([command, str(random_moe), *map(str, args), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}:3: the last turn must be the assistant's"]
    assert not (tmp_path / "o").exists()
