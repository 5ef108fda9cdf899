"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written."""
from __future__ import annotations

import json
import shutil

import pytest

from awaker_cli.cli import run


def expect_error(capsys, argv, *fragments):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def base_copy(tiny_bases, tmp_path):
    dst = tmp_path / "base"
    shutil.copytree(tiny_bases["hub-sharded"], dst)
    return dst


def test_missing_path(capsys, tmp_path):
    expect_error(capsys, ["upcycle", str(tmp_path / "nope"), str(tmp_path / "out")], "no such directory")
    expect_error(capsys, ["info", str(tmp_path / "nope")], "no such directory")


def test_not_a_qwen2_vl_config(capsys, base_copy, tmp_path):
    cfg = json.loads((base_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (base_copy / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["upcycle", str(base_copy), str(tmp_path / "out")], "not a supported vision-language model", "llama")


def test_corrupt_safetensors(capsys, base_copy, tmp_path):
    shard = sorted(base_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    expect_error(capsys, ["upcycle", str(base_copy), str(tmp_path / "out")], "corrupt", shard.name)


def test_truncated_safetensors(capsys, base_copy, tmp_path):
    shard = sorted(base_copy.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    expect_error(capsys, ["info", str(base_copy)], "truncated", shard.name)


def test_index_points_to_missing_shard(capsys, base_copy, tmp_path):
    sorted(base_copy.glob("model-*.safetensors"))[2].unlink()
    expect_error(capsys, ["upcycle", str(base_copy), str(tmp_path / "out")], "missing shard")


@pytest.mark.parametrize("argv,fragment", [
    (["--moe-targets", "o_proj,fc9"], "unknown target module 'fc9'"),
    (["--experts", "0"], "experts must be at least 1"),
    (["--rank", "0"], "rank must be at least 1"),
    (["--experts", "2", "--top-k", "3"], "top-k must be between 1 and the number of experts (2)"),
    (["--combine", "sum"], "combine must be one of"),
    (["--max-shard-size", "lots"], "cannot read size"),
])
def test_bad_options(capsys, tiny_base, tmp_path, argv, fragment):
    expect_error(capsys, ["upcycle", str(tiny_base), str(tmp_path / "out"), *argv], fragment)
    assert not (tmp_path / "out").exists()


def test_output_exists_needs_force(capsys, tiny_base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(capsys, ["upcycle", str(tiny_base), str(out), "--rank", "4"], "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what awaker wrote: a directory of the user's is refused, and kept
    expect_error(capsys, ["upcycle", str(tiny_base), str(out), "--rank", "4", "--force"], "is not an awaker output")
    assert (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "moe"
    assert run(["upcycle", str(tiny_base), str(mine), "--rank", "4", "--json"]) == 0
    (mine / "stale.txt").write_text("from before")
    assert run(["upcycle", str(tiny_base), str(mine), "--rank", "8", "--force", "--json"]) == 0
    assert not (mine / "stale.txt").exists() and (mine / "awaker_config.json").exists()


def test_missing_processor_files(capsys, base_copy, tmp_path):
    (base_copy / "tokenizer.json").unlink()
    expect_error(capsys, ["upcycle", str(base_copy), str(tmp_path / "out")], "missing processor/tokenizer files",
                 "tokenizer")


def test_already_upcycled(capsys, tiny_moe, tmp_path):
    expect_error(capsys, ["upcycle", str(tiny_moe), str(tmp_path / "out")], "already an awaker model")


def test_interrupted_write_leaves_nothing(tiny_base, tmp_path, monkeypatch):
    from awaker_cli.checkpoint import writer

    calls = {"n": 0}
    real_write_shard = writer._write_shard

    def dying_write_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write
        real_write_shard(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_shard", dying_write_shard)
    out = tmp_path / "out"
    assert run(["upcycle", str(tiny_base), str(out), "--rank", "4", "--max-shard-size", "200KB"]) == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary directory may be left behind"


def test_debug_shows_traceback(capsys, tmp_path):
    assert run(["--debug", "info", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_help_for_every_command(capsys):
    for command in ("upcycle", "info", "make-tiny"):
        assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Turn a dense Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint" in out


def test_help_paragraphs_flow_to_the_terminal_width(capsys, monkeypatch):
    """A docstring's line breaks are not kept: each paragraph wraps at the terminal's width only."""
    monkeypatch.setenv("COLUMNS", "200")
    assert run(["upcycle", "--help"]) == 0
    assert "get routed experts plus a global expert" in capsys.readouterr().out
    assert run(["merge", "--help"]) == 0  # a \b block (a table of examples) keeps its lines
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert any(line.startswith("awaker merge MODEL OUT --expert 2 --p 0.8") and line.endswith("global expert")
               for line in lines)


def test_corrupt_tokenizer_config(capsys, base_copy, tmp_path):
    (base_copy / "tokenizer_config.json").write_text("{ not json")
    expect_error(capsys, ["upcycle", str(base_copy), str(tmp_path / "out")], "tokenizer_config.json", "not valid JSON")


def test_brackets_in_paths_are_not_markup(capsys, tmp_path):
    expect_error(capsys, ["info", str(tmp_path / "a[/b]")], "a[/b]", "no such directory")


def test_help_imports_no_torch():
    # `awaker --help` and `awaker COMMAND --help` must stay fast: torch, transformers and triton take
    # seconds to import, so command modules import them (and the library modules that need them) lazily.
    import subprocess
    import sys

    code = """
import json, sys
import typer.main
from awaker_cli.cli import app, run
codes = [run(["--help"])]
for name in typer.main.get_command(app).commands:
    codes.append(run([name, "--help"]))
print(json.dumps({"codes": codes, "heavy": [m for m in ("torch", "transformers", "triton") if m in sys.modules]}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["codes"]) > 10 and set(result["codes"]) == {0}
    assert result["heavy"] == []


def test_help_defaults_match_the_library():
    import typer.main

    from awaker_cli.checkpoint import DEFAULT_SHARD_SIZE, parse_size
    from awaker_cli.cli import DEFAULT_MAX_SHARD_SIZE, app
    from awaker_cli.ops.convert import DEFAULT_ALPHA

    assert parse_size(DEFAULT_MAX_SHARD_SIZE) == DEFAULT_SHARD_SIZE
    run(["--help"])  # registers the commands
    convert = typer.main.get_command(app).commands["convert"]
    assert next(p.default for p in convert.params if p.name == "alpha") == DEFAULT_ALPHA


def test_shell_completion():
    """`awaker --install-completion` installs what this answers: the shell's completion requests."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "_AWAKER_COMPLETE": "complete_bash", "COMP_WORDS": "awaker tra", "COMP_CWORD": "1"}
    out = subprocess.run([sys.executable, "-m", "awaker_cli"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["train"], out.stderr
