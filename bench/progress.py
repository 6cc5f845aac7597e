"""Progress for long work: a rich bar with ETA and the running robust accuracy; silent with --quiet."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """One bar per stage (sweep, attacks); `advance` names the unit done and the running robust count."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: int | None = None

    def __enter__(self) -> Reporter:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
                disable=not sys.stderr.isatty(),
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)

    def start(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total, status="")

    def advance(self, what: str, robust: int, n: int) -> None:
        if self._progress is not None and self._task is not None:
            acc = 100.0 * robust / max(n, 1)
            self._progress.update(self._task, advance=1, status=f"{what}  robust {acc:.1f}% of batch")

    def skip(self, units: int) -> None:
        """Units already done in an earlier (resumed) session."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=units, status="resumed")
