"""Adapter-only outputs (the default of `awaker train`, `upcycle --adapter-only`): the directory holds the
adapters and a record of the base, every command finds and verifies that base, and a moved or changed
base is one clear error."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from awaker_cli.checkpoint import Checkpoint
from awaker_cli.checkpoint.base_ref import ADAPTERS_FILE, BASE_FILE
from awaker_cli.cli import run
from awaker_cli.model import load_model
from awaker_cli.tiny import build_tiny_base
from awaker_cli.train.synthetic import write_synthetic_dataset

from .conftest import chat_inputs, model_tensors, solid

FAST = ["train.warmup_steps=1", "train.save_steps=0", "train.device=cpu", "train.batch_size=4",
        "train.grad_accum=1", "train.epochs=2", "train.lr=1e-2"]


@pytest.fixture()
def base(tiny_base, tmp_path):
    """A private copy of the tiny base: these tests move and change it."""
    return shutil.copytree(tiny_base, tmp_path / "base")


def upcycle(base, out, *extra):
    assert run(["upcycle", str(base), str(out), "--rank", "4", "--seed", "3", *extra]) == 0
    return out


def test_upcycle_adapter_only_is_the_full_model_without_the_copy(base, tmp_path, capsys):
    full = upcycle(base, tmp_path / "full")
    light = upcycle(base, tmp_path / "light", "--adapter-only")
    assert not (light / "model.safetensors").exists() and (light / ADAPTERS_FILE).is_file()
    assert (light / ADAPTERS_FILE).stat().st_size * 5 < (full / "model.safetensors").stat().st_size
    record = json.loads((light / BASE_FILE).read_text())
    assert record["path"] == str(base.resolve()) and record["relative"] == "../base"
    # every tensor, base included, reads the same as in the complete directory
    a, b = model_tensors(full), model_tensors(light)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert run(["info", str(light), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base"]["verified"] and info["base"]["path"] == str(base.resolve())
    assert info["transformers_loads"].startswith("nothing")
    assert "adapters and routers only" in (light / "README.md").read_text()


def test_train_writes_adapters_only_by_default_and_full_on_request(base, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n=4)
    s1, s1_full, s2 = tmp_path / "s1", tmp_path / "s1-full", tmp_path / "s2"
    common = [f"data.train={data}", *FAST]
    assert run(["train", "tiny-stage1", f"model={base}", f"output_dir={s1}", *common]) == 0
    assert run(["train", "tiny-stage1", f"model={base}", f"output_dir={s1_full}", *common, "--full"]) == 0
    assert (s1 / BASE_FILE).is_file() and not (s1 / "model.safetensors").exists()
    assert (s1_full / "model.safetensors").is_file() and not (s1_full / BASE_FILE).exists()
    # same training, same model: the two forms hold the same tensors (base bit-identical)
    a, b = model_tensors(s1), model_tensors(s1_full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # stage 2 from an adapter-only stage 1 records the same dense base (not the stage-1 directory)
    assert run(["train", "tiny-stage2", f"init_from={s1}", f"output_dir={s2}", *common]) == 0
    record = json.loads((s2 / BASE_FILE).read_text())
    assert record["path"] == str(base.resolve()) and record["relative"] == "../base"
    # ... and is the model a complete run gives: same tensors, same logits
    s2_full = tmp_path / "s2-full"
    assert run(["train", "tiny-stage2", f"init_from={s1_full}", f"output_dir={s2_full}", *common, "--full"]) == 0
    a, b = model_tensors(s2), model_tensors(s2_full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoProcessor

    inputs = chat_inputs(AutoProcessor.from_pretrained(s2), ["what colour is it ?"], [solid("red")])
    with torch.no_grad():
        torch.testing.assert_close(load_model(s2)(**inputs).logits, load_model(s2_full)(**inputs).logits,
                                   rtol=0, atol=0)
    # an export is always complete
    assert run(["export", str(s2), str(tmp_path / "s2-nf4")]) == 0
    assert (tmp_path / "s2-nf4" / "model.safetensors").is_file() and not (tmp_path / "s2-nf4" / BASE_FILE).exists()


def test_moved_base_is_one_clear_error_and_moving_both_keeps_working(base, tmp_path, capsys):
    light = upcycle(base, tmp_path / "light", "--adapter-only")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(base), moved / "base")
    capsys.readouterr()
    assert run(["info", str(light)]) == 2
    err = capsys.readouterr().err
    assert "its base model is gone" in err and str(base.resolve()) in err and "Traceback" not in err
    # the base and the model moved together: found through the recorded relative path, and re-verified
    shutil.move(str(light), moved / "light")
    assert run(["info", str(moved / "light")]) == 0
    assert Checkpoint(moved / "light").base.path == (moved / "base").resolve()


def test_outputs_of_a_moved_project_record_where_the_base_is_now(base, tmp_path):
    """A project moved as a whole: its adapter-only model finds the base by the relative path, and what is
    made from it (a pruned copy, a next training stage) records the base's new place, so it opens too."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.move(str(base), project / "base")
    light = upcycle(project / "base", project / "light", "--adapter-only")
    moved = shutil.move(str(project), tmp_path / "moved")
    assert run(["prune", str(moved / "light"), str(moved / "pruned"), "--rank", "2"]) == 0
    data = write_synthetic_dataset(tmp_path / "data", n=4)
    assert run(["train", "tiny-stage3", f"init_from={moved / 'light'}", f"output_dir={moved / 's3'}",
                f"data.train={data}", *FAST]) == 0
    for out in ("pruned", "s3"):
        record = json.loads((moved / out / BASE_FILE).read_text())
        assert record["path"] == str((moved / "base").resolve()) and record["relative"] == "../base"
        assert Checkpoint(moved / out).base.path == (moved / "base").resolve()
    assert not light.exists()


def test_changed_base_is_refused_touched_base_verifies(base, tmp_path, capsys):
    light = upcycle(base, tmp_path / "light", "--adapter-only")
    os.utime(base / "model.safetensors", ns=(1, 1))  # same bytes, new time: re-hashed and accepted
    assert Checkpoint(light).base is not None
    tensors = load_file(str(base / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert run(["chat", str(light), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "has changed since the adapters were made" in err and "Traceback" not in err


def test_force_never_replaces_the_base_of_an_adapter_only_input(tiny_base, tmp_path, capsys):
    # the base is itself an awaker output (a complete upcycle), so --force alone would allow replacing it
    moe = upcycle(tiny_base, tmp_path / "moe")
    data = write_synthetic_dataset(tmp_path / "data", n=4)
    s3 = tmp_path / "s3"
    assert run(["train", "tiny-stage3", f"init_from={moe}", f"output_dir={s3}", f"data.train={data}", *FAST]) == 0
    assert json.loads((s3 / BASE_FILE).read_text())["path"] == str(moe.resolve())
    capsys.readouterr()
    assert run(["prune", str(s3), str(moe), "--rank", "2", "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert (moe / "model.safetensors").is_file()


def test_prune_and_merge_keep_an_adapter_only_input_adapter_only(random_moe, tmp_path, monkeypatch):
    """Pruning or merging experts leaves the base as it is: from an adapter-only model they write adapters
    on the same base, without reading its tensors (the same tensors as with --full, which writes a
    complete directory)."""
    data = write_synthetic_dataset(tmp_path / "data", n=4)
    s3 = tmp_path / "s3"
    assert run(["train", "tiny-stage3", f"init_from={random_moe}", f"output_dir={s3}", f"data.train={data}",
                *FAST]) == 0
    base_keys = set(Checkpoint(s3).base_tensors())
    get = Checkpoint.get

    def adapters_only(self, key):
        assert key not in base_keys, f"read the base tensor {key}"
        return get(self, key)

    for name, args in (("prune", ["prune", "--rank", "2"]), ("merge", ["merge", "--experts", "1,3"])):
        light, full = tmp_path / f"{name}-light", tmp_path / f"{name}-full"
        with monkeypatch.context() as m:
            m.setattr(Checkpoint, "get", adapters_only)
            assert run([args[0], str(s3), str(light), *args[1:]]) == 0
        assert run([args[0], str(s3), str(full), *args[1:], "--full"]) == 0
        assert sorted(p.name for p in light.glob("*.safetensors")) == [ADAPTERS_FILE]
        assert not (full / BASE_FILE).exists()
        assert json.loads((light / BASE_FILE).read_text())["tensors_sha256"] == \
            json.loads((s3 / BASE_FILE).read_text())["tensors_sha256"]
        want, got = model_tensors(full), model_tensors(light)
        assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_relink_points_a_directory_at_a_verified_copy_of_its_base(base, tiny_bases, tmp_path, capsys):
    light = upcycle(base, tmp_path / "light", "--adapter-only")
    want = model_tensors(light)
    copy = tiny_bases["v5-sharded"]  # the same weights in transformers 5's key layout, in several shards
    shutil.rmtree(base)
    capsys.readouterr()
    assert run(["relink", str(light), str(copy), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(copy.resolve()) and json.loads((light / BASE_FILE).read_text()) == record
    assert Checkpoint(light).base.path == copy.resolve()
    got = model_tensors(light)
    assert got.keys() == want.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert run(["chat", str(light), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0


def test_relink_refuses_other_weights_and_complete_directories(base, tmp_path, capsys):
    light = upcycle(base, tmp_path / "light", "--adapter-only")
    before = (light / BASE_FILE).read_text()
    other = build_tiny_base(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert run(["relink", str(light), str(other)]) == 2
    err = capsys.readouterr().err
    assert "are not the ones" in err and "Traceback" not in err
    assert (light / BASE_FILE).read_text() == before  # a refused relink changes nothing
    full = upcycle(base, tmp_path / "full")
    assert run(["relink", str(full), str(base)]) == 2
    assert "not an adapter-only awaker directory" in capsys.readouterr().err


@pytest.mark.parametrize("adapter_only", [True, False])
def test_the_saving_bar_counts_every_byte_once(tiny_moe, tmp_path, adapter_only):
    """The final save of a training run shows one bar over what it hashes, copies and writes: it ends
    exactly at its total."""
    from awaker_cli.model.config import AwakerConfig
    from awaker_cli.model.save import save_with_source_base

    source = Checkpoint(tiny_moe)
    adapters = {k: source.get(k) for k in source.tensors if k not in source.base_tensors()}
    seen, lock = {}, threading.Lock()

    @contextlib.contextmanager
    def bar(description, total):
        seen.update(total=total, done=0)

        def advance(n):
            with lock:  # the base is hashed in threads
                seen["done"] += n
        yield advance

    save_with_source_base(tmp_path / "out", source, adapters, AwakerConfig.load(tiny_moe), adapter_only=adapter_only,
                          bar=bar)
    assert seen["total"] == source.total_bytes and seen["done"] == seen["total"]
