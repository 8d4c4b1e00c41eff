"""Progress bars for every loop longer than a few seconds (rich), silenced on request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def terminal(stderr: bool = False) -> Console:
    """The console every command prints through: rich markup is off, so a user's string (a path
    holding `[/]`, a class name) prints as itself instead of being parsed (or crashing the print
    after the work is done); tables and other renderables still render."""
    return Console(stderr=stderr, markup=False, highlight=False)


# What long-running library functions accept as `progress`: called with a short status line after
# each unit of work (a pass, an epoch); the CLI wires it to a bar's `advance(status=...)`.
StatusFn = Callable[[str], None]


class _Bar:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task = progress, task_id

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, advance=steps, **fields)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[_Bar]:
    """`with progress_bar(n, "meta-training") as bar: ... bar.advance(status="val 0.95")`."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )
    # Progress goes to stderr so stdout stays clean for tables and --json.
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task_id)
