"""Photo metadata for the catalog: read with each new file, and back-filled into older indexes.

An index made before schema v3 has image rows without metadata; the next
``mmsearch index`` over their folders (or ``mmsearch check --repair``) reads it
from the files' headers and stores it. Nothing is decoded or embedded: no
model is loaded for a back-fill.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from mmsearch.errors import DecodeError
from mmsearch.ingest.metadata import metadata_from_bytes, read_metadata

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

BACKFILL_CHUNK = 512   # rows read and written per step


def file_metadata(path: Path | str, mtime_ns: int | None = None) -> dict[str, Any]:
    """The catalog's metadata columns for one file (``taken_source`` "unreadable" when its
    headers cannot be read: it is not tried again on every run)."""
    try:
        return dataclasses.asdict(read_metadata(path, mtime_ns=mtime_ns))
    except DecodeError:
        return {"taken_source": "unreadable", "ext": Path(path).suffix.lower().lstrip(".")}


def bytes_metadata(data: bytes, name: str, mtime_ns: int) -> dict[str, Any]:
    """:func:`file_metadata` of a file's bytes already in memory (read from a URL)."""
    try:
        return dataclasses.asdict(metadata_from_bytes(data, name, mtime_ns))
    except DecodeError:
        return {"taken_source": "unreadable", "ext": Path(name).suffix.lower().lstrip(".")}


def backfill_metadata(store: "Store", roots: Iterable[str] | None, workers: int,
                      stop: threading.Event | None = None) -> int:
    """Read and store the metadata of images (under ``roots``; all with None) that have
    none yet; returns how many. The store holds the write lock."""
    roots = None if roots is None else list(roots)
    done = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        while not (stop is not None and stop.is_set()):
            rows = store.missing_metadata(roots, limit=BACKFILL_CHUNK)
            if not rows:
                break
            metas = pool.map(lambda r: file_metadata(r[1], r[2]), rows)
            store.set_metadata(zip((r[0] for r in rows), metas))
            done += len(rows)
    return done
