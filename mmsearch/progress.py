"""Progress: the plain callback the library calls, and the bar the CLI shows for it."""

from __future__ import annotations

from typing import Any, Callable

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: scan, hash, embed, ...


def no_progress(stage: str, done: int, total: int) -> None:
    """A :data:`Progress` that reports nowhere."""

_LABELS = {"scan": "scanning", "hash": "checking", "embed": "embedding"}


class ProgressBar:
    """Context manager whose :meth:`update` is a :data:`Progress`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            console = Console(stderr=True)
            if console.is_terminal:
                self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                                          MofNCompleteColumn(), TimeRemainingColumn(),
                                          console=console, transient=True)
                self._progress.start()
        return self

    def update(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(_LABELS.get(stage, stage), total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
