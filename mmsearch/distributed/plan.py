"""Planning a distributed run on the driver: which files the cluster must process.

The folders are walked as locally (:func:`mmsearch.ingest.diff.scan`); URLs are listed
with fsspec (:func:`mmsearch.ingest.remote.list_url`) and kept as full URLs. The diff
with the catalog is the local runner's (:func:`mmsearch.ingest.diff.reconcile`): a file
whose size and mtime match its catalog row is unchanged and never leaves the driver;
files gone from disk are forgotten at once; every candidate (new, or changed in size or
mtime) becomes a manifest row with an id given out now by the catalog
(:meth:`Store.reserve_image_ids`: never given again, whatever happens to the run),
and the id and content hash of the row it may replace. The cluster hashes it: same
content as its old row means only the mtime changed (no decode, no model). The
manifest is cut into shards of ``shard_size`` rows and written before ``run.json``,
which makes the run exist: a driver killed before that leaves only unused ids.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mmsearch.distributed.shards import MANIFEST_COLUMNS, Run, ShardLayout, write_table
from mmsearch.ingest.diff import IndexReport, Scan, ScanStopped, forget_gone, reconcile, scan, stopped
from mmsearch.ingest.remote import list_url
from mmsearch.locations import is_url

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store


@dataclass(frozen=True)
class Planned:
    """A run written to disk, or None when nothing needs the cluster."""

    run: Run | None
    roots: list[str]


def plan_run(store: "Store", layout: ShardLayout, roots: Iterable[Path | str], model: str,
             report: IndexReport, shard_size: int, stop: threading.Event | None = None,
             just_stored: set[int] | frozenset[int] = frozenset(),
             just_failed: set[str] | frozenset[str] = frozenset()) -> Planned:
    """Scan ``roots``, forget deleted files, write the manifest of the rest; see the module.
    This invocation's work (a resumed run) is not counted or tried again: rows in
    ``just_stored`` are not unchanged, files in ``just_failed`` are left as they are."""
    scanned = _scan(list(roots), report, stop)
    found = reconcile(store, scanned, report, settled=just_stored, left=just_failed)
    forget_gone(store, found.gone, report)  # the cluster hashes: moves are not known here
    todo = found.candidates
    if not todo:
        return Planned(None, scanned.roots)
    first_id = store.reserve_image_ids(len(todo))
    first = layout.next_shard()
    rows = [{"id": first_id + n, "path": str(f.path), "size": f.size, "mtime_ns": f.mtime_ns,
             "old_id": row.id if row else None, "old_hash": row.content_hash if row else None}
            for n, (f, row) in enumerate(todo)]
    count = 0
    for count, start in enumerate(range(0, len(rows), shard_size), 1):
        write_table(layout.manifest(first + count - 1), rows[start:start + shard_size],
                    MANIFEST_COLUMNS)
    run = Run(first, count, len(rows), model, scanned.roots)
    layout.write_run(run)
    return Planned(run, scanned.roots)


def _scan(roots: list[Path | str], report: IndexReport, stop: threading.Event | None) -> Scan:
    """:func:`scan` of the local roots, then the URLs listed with fsspec (a file found twice
    is taken once)."""
    scanned = scan([Path(r) for r in roots if not is_url(r)], report, stop)
    seen = {str(f.path) for f in scanned.found}
    for url in [r for r in roots if is_url(r)]:
        root, _, files = list_url(url, stop)
        if stopped(stop):
            raise ScanStopped
        scanned.roots.append(root)
        scanned.found += [f for f in files if f.path not in seen]
        seen.update(f.path for f in files)
    return scanned
