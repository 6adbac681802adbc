"""The pool's fill shown as a progress bar while ``nex up`` starts (on a terminal only)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class FillProgress:
    """A callable ``(ready, total)`` for the pool; a bar on a terminal, nothing otherwise."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        if sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("Filling the warm pool"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
                auto_refresh=False,  # refreshed from Trio
            )

    def __call__(self, ready: int, total: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("fill", total=total)
        self._bar.update(self._task, completed=ready, total=total, refresh=True)

    def close(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.stop()
