"""``--watch`` and ``--rescan-every``, shared by `mmsearch index` and `mmsearch serve`:
keep the index current after the command's own work (:mod:`mmsearch.ingest.watch`)."""

from __future__ import annotations

import threading
from typing import Annotated, Any, Optional

import typer

from mmsearch.cli.common import err

WatchOpt = Annotated[bool, typer.Option(
    "--watch", help="Keep watching the folders and index what changes (pip install "
    "'mmsearch[watch]').")]
RescanOpt = Annotated[Optional[str], typer.Option(
    help="With --watch: also rescan every folder this often (90s, 10m, 2h); without events "
    "(network mounts, the OS's watch limit) it rescans every 10m unless set.")]


def watch_options(watch: bool, rescan_every: str | None) -> dict[str, Any] | None:
    """The watcher's options from the flags, checked before any work (None: no --watch)."""
    from mmsearch.errors import UsageError
    from mmsearch.ingest.watch import parse_duration, require_watchfiles

    if not watch:
        if rescan_every is not None:
            raise UsageError("--rescan-every goes with --watch")
        return None
    require_watchfiles()
    return {"rescan_every": parse_duration(rescan_every) if rescan_every else None}


def keep_watching(engine: Any, roots: list[str], stop: threading.Event,
                  options: dict[str, Any], **index_options: Any) -> None:
    """Watch ``roots`` with ``engine`` as the index's writer until ``stop`` (Ctrl-C)."""
    from mmsearch.ingest.watch import Watcher

    def run(folders: Any, progress: Any, stop: threading.Event) -> Any:
        return engine.index(folders, progress=progress, stop=stop, **index_options)

    err(f"watching {len(roots)} folder{'s' * (len(roots) != 1)} for changes (Ctrl-C to stop)")
    Watcher(roots, run, say=err, stop=stop, **options).run()
