"""Rich progress bars on stderr, so that --json output on stdout stays machine-readable."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

stderr = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, unit: str = "bytes",
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield advance(n); unit 'bytes' shows sizes and speed, anything else a count."""
    if not enabled:
        yield lambda n: None
        return
    amount = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), *amount, TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total)
        try:
            yield lambda n: progress.advance(task, n)
        except BaseException:
            progress.live.transient = True  # a failed step: its error line alone, no half bar above it
            raise


@contextlib.contextmanager
def no_bar(description: str, total: int, *, unit: str = "bytes") -> Iterator[Callable[[int], None]]:
    """The default progress reporter of library functions that take `bar`: nothing (commands pass
    functools.partial(progress_bar, enabled=...))."""
    yield lambda n: None


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column key/value table on stderr (plans, summaries); values are plain text, never markup
    (they hold paths)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, Text(value))
    stderr.print(table)
