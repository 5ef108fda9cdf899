"""The `awaker` command line: a Typer app whose commands (awaker_cli/commands/) only parse options and
call the library. Bad input ends with one `error:` line and exit code 2; --debug shows the traceback."""
from __future__ import annotations

import json
import sys

import click
import typer
from rich.text import Text

from .errors import AwakerError
from .progress import stderr

app = typer.Typer(
    name="awaker",
    help="Build, train and run Awaker2.5-VL-style LoRA-MoE models from dense Qwen2-VL checkpoints.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
_debug = False

# Every --max-shard-size default (checkpoint.DEFAULT_SHARD_SIZE, tested equal). Written out here because the
# checkpoint package imports torch, and `awaker --help` must not wait for torch: command modules import
# torch, transformers and the library's heavy modules inside their functions only.
DEFAULT_MAX_SHARD_SIZE = "5GB"


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback when a command fails.")):
    global _debug
    _debug = debug


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this; `main` exits with it)."""
    from . import commands  # noqa: F401  (registers the commands on `app`)

    global _debug
    _debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        result = app(args=argv, standalone_mode=False, prog_name="awaker")
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        stderr.print("interrupted")
        return 130
    except AwakerError as e:
        if _debug:
            stderr.print_exception()
        stderr.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False, soft_wrap=True)
        return 2
    except Exception as e:  # a bug in awaker, not bad input: say so briefly
        if _debug:
            stderr.print_exception()
        stderr.print(Text.assemble(("internal error: ", "bold red"), f"{type(e).__name__}: {e} "
                                   "(run with --debug for the traceback)"), highlight=False, soft_wrap=True)
        return 1


def main() -> None:
    sys.exit(run())
