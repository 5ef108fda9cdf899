"""The `awaker` command line: a Typer app whose commands (awaker_cli/commands/) only parse options and
call the library. Bad input ends with one `error:` line and exit code 2; --debug shows the traceback."""
from __future__ import annotations

import inspect
import json
import sys

import click
import typer
from rich.text import Text

from .errors import AwakerError
from .progress import stderr

app = typer.Typer(
    name="awaker",
    help="Build, train and run Awaker2.5-VL-style LoRA-MoE models from dense Qwen2-VL, Qwen2.5-VL or Qwen3-VL "
         "checkpoints.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=True,  # awaker --install-completion (bash, zsh, fish, PowerShell)
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


# Newer typer raises its own copies of click's exceptions (typer._click, typer.Exit, typer.Abort) instead
# of click's: catch both families, whichever typer is installed.
try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # older typer: plain click
    _TyperClickException = click.ClickException
_EXIT = (click.exceptions.Exit, typer.Exit)
_USAGE = (click.ClickException, _TyperClickException)
_ABORT = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)


def _error_line(label: str, message: str) -> None:
    stderr.print(Text.assemble((label, "bold red"), message), highlight=False, soft_wrap=True)


def _os_error(e: OSError) -> str:
    """One line for a filesystem failure: the path and the cause (disk full, read-only, permission)."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
    return f"{where}: {e.strerror}" if where and e.strerror else str(e)


def _quiet_libraries() -> None:
    """Notices that say nothing to an awaker user: bitsandbytes' CPU backend offers to download a kernel
    from the hub (there is a working fallback), PIL warns about large images (the processor resizes them)."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


def _reflow_help(typer_app: typer.Typer) -> None:
    """Typer's rich help keeps a docstring's line breaks, and the terminal then wraps each line again
    (half-empty lines): give every paragraph of every command's help as one line to wrap."""
    for command in typer_app.registered_commands:
        text = inspect.cleandoc(command.help or command.callback.__doc__ or "")
        command.help = "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n"))  # \b: keep as laid out
                                     for p in text.split("\n\n"))
    for group in typer_app.registered_groups:
        _reflow_help(group.typer_instance)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this; `main` exits with it). Usage errors and bad
    input (AwakerError, a full disk, a read-only directory) end with one line and exit 2; Ctrl-C with
    "interrupted" and 130; anything else is a bug in awaker: one line, exit 1."""
    global _debug
    _debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        from . import commands  # noqa: F401  (registers the commands on `app`; inside: Ctrl-C here too)

        _reflow_help(app)
        _quiet_libraries()
        result = app(args=argv, standalone_mode=False, prog_name="awaker")
        if result == 130:  # typer turns Ctrl-C inside a command into Exit(130) and returns its code
            stderr.print("interrupted")
        return result if isinstance(result, int) else 0
    except _EXIT as e:
        return e.exit_code
    except _USAGE as e:
        e.show()  # click's own usage message: "Usage: …" and "Error: …"
        return e.exit_code
    except _ABORT:
        stderr.print("interrupted")
        return 130
    except (AwakerError, OSError) as e:
        if _debug:
            stderr.print_exception()
        _error_line("error: ", str(e) if isinstance(e, AwakerError) else _os_error(e))
        return 2
    except Exception as e:  # a bug in awaker, not bad input: say so briefly
        if _debug:
            stderr.print_exception()
        _error_line("internal error: ", f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        return 1


def main() -> None:
    sys.exit(run())
