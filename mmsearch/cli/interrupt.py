"""Ctrl-C for long commands (index, finetune, distill): the first asks the run to stop
after its current batch, a second one aborts."""

from __future__ import annotations

import signal
import threading
from typing import Any

from mmsearch.cli.common import err


class stop_on_sigint:
    """While active, the first Ctrl-C sets ``stop``; a second one raises KeyboardInterrupt."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            err("aborted: what was committed is kept; run the same command to resume")
            raise KeyboardInterrupt
        self.stop.set()
        err("stopping after the current batch (Ctrl-C again to abort)...")

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
