"""Progress: the plain callback the library calls, and the bar the CLI shows for it."""

from __future__ import annotations

from typing import Any, Callable

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: scan, hash, embed, ...
# A stage "key|text" is stage ``key`` shown as ``text`` (training: "train|epoch 2/5, loss 3.1").


def no_progress(stage: str, done: int, total: int) -> None:
    """A :data:`Progress` that reports nowhere."""

_LABELS = {"scan": "scanning", "hash": "checking", "embed": "embedding", "decode": "decoding"}


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
        key, _, text = stage.partition("|")
        label = text or _LABELS.get(key, key)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(label, total=total)
        self._progress.update(self._tasks[key], completed=done, total=total, description=label)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
