"""Fault cases: --force never deletes an input, bad input is one line and exit 2, no debris after a kill,
one writer per output. The SIGKILL loop is marked slow: `pytest -m slow tests/test_faults.py`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awaker_cli.checkpoint.outputs import MARKER, PARTIAL_MARKER, output_lock
from awaker_cli.cli import run

from .test_cli_errors import expect_error

RANK = ["--rank", "4", "--alpha", "8"]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under path (or the file itself) with its sha256: 'byte-identical afterwards'."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".partial" in p.name or ".old-" in p.name
                  or p.name.endswith(".lock"))


@pytest.fixture
def work(tiny_base, tmp_path):
    """P/base (a copy of the tiny base) and P/moe (its upcycled model), inside tmp_path."""
    shutil.copytree(tiny_base, tmp_path / "P" / "base")
    assert run(["upcycle", str(tmp_path / "P" / "base"), str(tmp_path / "P" / "moe"), *RANK, "--json"]) == 0
    return tmp_path / "P"


# -- 1. --force can never delete or pollute an input ----------------------------------------------------
def _force_cases(P: Path, release: Path):
    base, moe = P / "base", P / "moe"
    (P / "link").symlink_to(base)
    return [
        (["upcycle", base, base, *RANK, "--force"], "itself"),
        (["upcycle", base, P / "link", *RANK, "--force"], "itself"),  # OUT a symlink to BASE
        (["upcycle", base, P, *RANK, "--force"], "contains the input"),
        (["upcycle", base, base / "sub", *RANK], "lies inside the input"),
        (["export", moe, P, "--force", "--quantize", "nf4"], "contains the input"),
        (["prune", moe, P, "--force", "--rank", "2"], "contains the input"),
        (["merge", moe, P, "--force"], "contains the input"),
        (["merge", moe, moe / "sub"], "lies inside the input"),
        (["convert", release, P / "base", "--base", P / "base", "--force"], "itself"),
        (["convert", release, release.parent, "--base", base, "--force"], "contains the input"),
    ]


def test_force_never_touches_an_input(capsys, work, tmp_path):
    release_dir = work / "rel"
    release_dir.mkdir()
    release = release_dir / "pytorch_model.bin"
    tensors = load_file(str(work / "base" / "model.safetensors"))
    torch.save({f"base_model.model.{k}": v for k, v in tensors.items()}, release)
    before = {p: tree_digest(p) for p in (work / "base", work / "moe", release)}
    for argv, fragment in _force_cases(work, release):
        expect_error(capsys, [str(a) for a in argv], fragment)
        assert {p: tree_digest(p) for p in before} == before, argv
    assert not (work / "base" / "sub").exists() and not (work / "moe" / "sub").exists()


def test_force_replaces_only_an_awaker_output(capsys, work, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    expect_error(capsys, ["upcycle", str(work / "base"), str(mine), *RANK, "--force"], "not an awaker output")
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (work / "moe" / MARKER).is_file()  # awaker's own output: --force may replace it
    assert run(["upcycle", str(work / "base"), str(work / "moe"), *RANK, "--force", "--json"]) == 0


def test_data_file_inside_out_is_refused(capsys, work, tiny_records):
    data = work / "data.jsonl"
    shutil.copy(tiny_records, data)
    expect_error(capsys, ["merge", str(work / "moe"), str(work), "--data", str(data), "--force"], "input")


# -- 2. usage errors and bad input: exit 2, one clear message --------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["upcycle", "--experts", "abc", "a", "b"], "Invalid value for '--experts'"),
    (["upcycle", "a", "b", "--bogus"], "No such option"),
    (["upcycle"], "Missing argument"),
    (["no-such-command"], "No such command"),
    (["stats", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["merge", "m", "o", "--batch-size", "0"], "--batch-size"),
    (["synth", "o", "--train", "10000000000000"], "--train"),
])
def test_usage_errors_exit_2(capsys, argv, fragment):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert "Usage:" in err and fragment in err, err


def test_non_utf8_config(capsys, work, tmp_path):
    (work / "base" / "config.json").write_bytes(b"\xff\xfe{not utf-8")
    expect_error(capsys, ["upcycle", str(work / "base"), str(tmp_path / "o")], "config.json", "UTF-8")


def test_integer_base_tensor_refused(capsys, work, tmp_path):
    path = work / "base" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    expect_error(capsys, ["upcycle", str(work / "base"), str(tmp_path / "o"), *RANK], "int8", "full-precision")


def test_shapes_must_match_the_config(capsys, work, tmp_path):
    path = work / "base" / "model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:-3].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    expect_error(capsys, ["upcycle", str(work / "base"), str(tmp_path / "o"), *RANK], key, "config.json implies")


@pytest.mark.parametrize("argv, fragment", [
    (["--alpha", "nan"], "alpha must be a positive number"),
    (["--alpha", "inf"], "alpha must be a positive number"),
    (["--alpha", "-2"], "alpha must be a positive number"),
    (["--rank", "100000000"], "larger than"),
    (["--experts", "1000000", "--rank", "2"], "--yes"),
])
def test_impossible_sizes_refused_up_front(capsys, tiny_base, tmp_path, argv, fragment):
    expect_error(capsys, ["upcycle", str(tiny_base), str(tmp_path / "o"), *argv], fragment)
    assert not (tmp_path / "o").exists()


def test_free_space_checked_before_writing(capsys, tiny_base, tmp_path, monkeypatch):
    from awaker_cli.checkpoint import outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    expect_error(capsys, ["upcycle", str(tiny_base), str(tmp_path / "o"), *RANK], "needs", "GB free")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_mid_write_is_one_line(capsys, tiny_base, tmp_path, monkeypatch):
    from awaker_cli.checkpoint import writer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "o" / "model.safetensors"))

    monkeypatch.setattr(writer, "_write_shard", full)
    expect_error(capsys, ["upcycle", str(tiny_base), str(tmp_path / "o"), *RANK, "--max-shard-size", "200KB"],
                 "No space left on device")
    assert list(tmp_path.iterdir()) == [], "nothing half-written"


def test_unwritable_output_parent_is_one_line(capsys, tiny_base, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # root ignores permission bits: refuse as a read-only mount would
        if tmp_path / "ro" in (self, *self.parents):
            raise OSError(30, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    expect_error(capsys, ["upcycle", str(tiny_base), str(tmp_path / "ro" / "o"), *RANK], "Read-only file system")
    expect_error(capsys, ["synth", str(tmp_path / "ro" / "d"), "--train", "2", "--test", "1"], "Read-only")


def test_pickle_renamed_safetensors(capsys, tiny_base, tmp_path):
    fake = tmp_path / "release.safetensors"
    torch.save({"a": torch.zeros(2)}, fake)
    expect_error(capsys, ["convert", str(fake), str(tmp_path / "o"), "--base", str(tiny_base)], str(fake))


def test_predictions_must_be_a_file(capsys, work, tiny_records, tmp_path):
    (tmp_path / "preds").mkdir()
    expect_error(capsys, ["eval", str(work / "moe"), "--data", str(tiny_records), "--predictions",
                          str(tmp_path / "preds")], "is a directory")
    expect_error(capsys, ["eval", str(work / "moe"), "--data", str(tiny_records), "--predictions",
                          str(tiny_records)], "itself")
    assert list((tmp_path / "preds").iterdir()) == [] and not list(tmp_path.glob("*.partial*"))


def test_link_out_of_the_model_directory_is_refused(capsys, work, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (work / "base" / "merges.txt").unlink(missing_ok=True)
    (work / "base" / "merges.txt").symlink_to(secret)
    expect_error(capsys, ["upcycle", str(work / "base"), str(tmp_path / "o"), *RANK], "merges.txt",
                 "outside the model directory")
    assert not (tmp_path / "o").exists()


def test_outputs_honour_the_umask(work):
    for path in (work / "moe", *(work / "moe").iterdir()):
        mode = path.stat().st_mode & 0o777
        umask = os.umask(0)
        os.umask(umask)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


# -- 4. debris -----------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(capsys, work, tmp_path):
    pid = _dead_pid()
    partial = tmp_path / f".o.partial-{pid}-abcd1234"
    partial.mkdir()
    (partial / PARTIAL_MARKER).write_text(f"{pid}\n")
    (partial / "model.safetensors").write_bytes(b"half")
    foreign = tmp_path / f".o.partial-{pid}-ffff0000"  # not awaker's (no marker, not empty): left alone
    foreign.mkdir()
    (foreign / "x").write_text("?")
    assert run(["upcycle", str(work / "base"), str(tmp_path / "o"), *RANK]) == 0
    err = capsys.readouterr().err
    assert "removed 1 leftover temporary" in err and partial.name in err
    assert not partial.exists() and foreign.exists()


def test_an_old_output_moved_aside_is_put_back(capsys, work, tmp_path):
    """Killed between moving the previous output aside and renaming the new one into place."""
    pid = _dead_pid()
    old = tmp_path / f".o.old-{pid}-12345678"
    old.mkdir()
    (old / PARTIAL_MARKER).write_text(f"{pid}\n")
    shutil.copytree(work / "moe", old / "o")
    assert run(["info", str(work / "moe")]) == 0
    assert run(["upcycle", str(work / "base"), str(tmp_path / "o"), *RANK]) == 2  # o is back: needs --force
    assert "put back" in capsys.readouterr().err
    assert tree_digest(tmp_path / "o") == {k.replace("moe/", "o/", 1): v for k, v in tree_digest(work / "moe").items()}


def test_training_that_fails_before_step_1_leaves_no_output_dir(capsys, tiny_base, tiny_records, tmp_path):
    out = tmp_path / "run"
    assert run(["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={tiny_records}",
                f"output_dir={out}", "train.batch_size=64", "train.progress=false"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not out.exists() and debris(tmp_path) == []


# -- 5. one writer per output --------------------------------------------------------------------------
def test_a_second_writer_is_refused(capsys, work, tmp_path):
    out = tmp_path / "o"
    with output_lock(out):
        expect_error(capsys, ["upcycle", str(work / "base"), str(out), *RANK], f"process {os.getpid()}",
                     "is writing it")
    assert debris(tmp_path) == []
    assert run(["upcycle", str(work / "base"), str(out), *RANK]) == 0


def test_a_second_training_run_is_refused(capsys, tiny_base, tiny_records, tmp_path):
    out = tmp_path / "run"
    with output_lock(out):
        expect_error(capsys, ["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={tiny_records}",
                              f"output_dir={out}", "train.max_steps=1", "train.progress=false"], "is writing it")
    assert not out.exists()


def test_train_output_dir_may_not_be_an_input(capsys, tiny_base, tiny_records, tmp_path):
    expect_error(capsys, ["train", "--recipe", "tiny-stage1", f"model={tiny_base}", f"data.train={tiny_records}",
                          f"output_dir={tiny_records.parent}"], "contains the input")


def test_lock_held_by_a_killed_process_is_free(work, tmp_path):
    """fcntl locks die with their process: a SIGKILLed writer never leaves OUT locked."""
    out = tmp_path / "o"
    code = ("import sys, time; from pathlib import Path; from awaker_cli.checkpoint.outputs import output_lock\n"
            f"with output_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    assert run(["upcycle", str(work / "base"), str(out), *RANK]) == 0
    assert debris(tmp_path) == []


# -- the kill loop (slow) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_nothing_after_the_next_run(tiny_bases, tmp_path):
    """SIGKILL an upcycle of a sharded base at 0.2 … 3 s; the next run cleans up and writes a complete OUT."""
    base = tiny_bases["hub-sharded"]
    awaker = [sys.executable, "-m", "awaker_cli", "upcycle", str(base)]
    for i, delay in enumerate([0.2, 0.6, 1.0, 1.4, 1.8, 2.2, 2.6, 3.0]):
        out = tmp_path / f"o{i}"
        proc = subprocess.Popen([*awaker, str(out), *RANK, "--max-shard-size", "200KB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or (out / MARKER).is_file(), "OUT is either absent or complete"
        rerun = subprocess.run([*awaker, str(out), *RANK, "--max-shard-size", "200KB", "--force"],
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert debris(tmp_path) == [], (delay, debris(tmp_path))
        assert json.loads((out / "awaker_config.json").read_text())["rank"] == 4
