"""``mmsearch index --runner ray``: plan on the driver, embed on the cluster, store on the driver.

1. A run left unfinished by a killed or stopped driver is finished first: its shards
   that are complete are not redone.
2. The folders (and fsspec URLs: ``s3://bucket/photos/``) are planned (:mod:`.plan`):
   unchanged files stay on the driver, deleted ones are forgotten, the rest go to the
   cluster in manifest shards.
3. The cluster decodes and embeds (:mod:`.ray_runner`). As each shard's rows are all
   back, the driver stores them through the store's verbs (rows and float32 vectors in
   one catalog transaction, under the ids the plan gave out), then writes the shard's
   files in clip-retrieval's layout (:mod:`.shards`). A shard whose files exist was
   stored, so a re-run never redoes it; a shard stored but not yet written is redone,
   and rows already in the catalog are not added twice.
4. When the index type needs training and can be merged (IVF), it is built in parts
   on the cluster (:mod:`.build`); otherwise the store builds it as after a local run.

The catalog keeps every vector, as after a local run, so ``query`` and ``serve`` use
the index unchanged; the shards are a copy of the vectors for other tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from mmsearch.distributed.plan import plan_run
from mmsearch.distributed.shards import FOLDER, Run, ShardLayout, pyarrow, read_arrow, write_shard
from mmsearch.errors import UsageError
from mmsearch.ingest.backfill import backfill_metadata
from mmsearch.ingest.embed import default_workers
from mmsearch.ingest.remote import as_url, filesystem, is_url
from mmsearch.ingest.run import IndexReport, Skipped, _Stopped  # (the scan's stop signal)
from mmsearch.progress import Progress, no_progress
from mmsearch.store import ImageFile, StoredImage

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.identity import ModelIdentity
    from mmsearch.models.openclip import Embedder
    from mmsearch.settings import Settings
    from mmsearch.store import Store

SHARD_SIZE = 10_000   # manifest rows per shard


@dataclass(frozen=True)
class RayOptions:
    """How a distributed run is done: where Ray is, shard size, device, decoding."""

    address: str | None = None
    shard_size: int = SHARD_SIZE
    device: str = "auto"
    batch_size: int = 32
    draft: bool = True
    index_type: str | None = None


def options_from(settings: "Settings", address: str | None,
                 shard_size: int | None = None) -> RayOptions:
    """The options of a run from the settings (shard size: :data:`SHARD_SIZE` by default)."""
    return RayOptions(address, shard_size or SHARD_SIZE, settings.device, settings.batch_size,
                      settings.draft, settings.index_type)


def index_on_ray(store: "Store", embedder: "Callable[[], Embedder]", identity: "ModelIdentity",
                 roots: Sequence[Path | str], options: RayOptions, *,
                 progress: Progress = no_progress,
                 stop: threading.Event | None = None) -> IndexReport:
    """Bring the index in line with ``roots`` on a Ray cluster (see the module). The caller
    holds the store's write lock; ``stop`` ends the run after the shard being stored."""
    targets: list[Path | str] = [as_url(r) if is_url(r) else Path(r) for r in roots]
    for root in targets:
        if isinstance(root, str):
            filesystem(root)  # a missing s3fs, gcsfs...: one line before Ray starts
        elif not os.path.lexists(root):
            raise UsageError(f"no such file or directory: {root}")
    if options.shard_size < 1:
        raise UsageError(f"shard size must be at least 1, got {options.shard_size}")
    pyarrow()
    start = time.perf_counter()
    report = IndexReport()
    layout = ShardLayout(store.root / FOLDER)
    layout.clean()
    with contextlib.ExitStack() as session:
        work = _Work(store, layout, embedder, identity, options, report, progress, stop, session)
        if options.address is not None:
            work.ray()  # a named cluster is reached first (a local Ray starts only if needed)
        work.run(targets)
    report.seconds = time.perf_counter() - start
    return report


class _Work:
    """One driver's share of a run: feed the cluster, store and write what comes back."""

    def __init__(self, store: "Store", layout: ShardLayout, embedder: "Callable[[], Embedder]",
                 identity: "ModelIdentity", options: RayOptions, report: IndexReport,
                 progress: Progress, stop: threading.Event | None,
                 session: contextlib.ExitStack) -> None:
        self.store, self.layout, self.embedder = store, layout, embedder
        self.identity, self.options, self.report = identity, options, report
        self.progress, self.stop, self.session = progress, stop, session
        self._ray: Any = None
        self.stored: set[int] = set()  # ids this invocation stored or touched
        self.failed: set[str] = set()  # paths that failed in this invocation

    def run(self, roots: list[Path | str]) -> None:
        """Finish a pending run, plan and execute a new one, build the index."""
        layout, report = self.layout, self.report
        pending = layout.read_run()
        if pending is not None and pending.model != self.identity.fingerprint:
            layout.finish_run(pending)  # made with other weights: its ids stay unused
            pending = None
        if pending is not None:
            self.execute(pending)
        if not report.interrupted:
            self._plan_and_execute(roots)
        if not report.interrupted:
            self.store.prune()
            if self.build():
                return  # the new index is saved
        self.store.flush()

    def _plan_and_execute(self, roots: list[Path | str]) -> None:
        try:
            planned = plan_run(self.store, self.layout, roots, self.identity.fingerprint,
                               self.report, self.options.shard_size, self.stop, self.stored,
                               self.failed)
        except _Stopped:
            self.report.interrupted = True
            return
        self.progress("scan", self.report.unchanged, self.report.unchanged)
        if planned.run is not None:
            self.execute(planned.run)
        if not self.report.interrupted:
            self.report.metadata_read = backfill_metadata(self.store, planned.roots,
                                                          default_workers(), self.stop)

    def ray(self) -> Any:
        """Ray, connected (or started) on first use and for the rest of the run."""
        if self._ray is None:
            from mmsearch.distributed.ray_runner import ray_session

            self._ray = self.session.enter_context(ray_session(self.options.address))
        return self._ray

    def execute(self, run: Run) -> None:
        """Process the shards of ``run`` that are not complete; finish the run if all are."""
        todo = [k for k in run.shards if not self.layout.complete(k)]
        if todo:
            self._cluster(todo)
        if all(self.layout.complete(k) for k in run.shards):
            self.layout.finish_run(run)

    def _cluster(self, todo: list[int]) -> None:
        from mmsearch.distributed.ray_runner import preparer, run_pipeline

        tables = {k: read_arrow(self.layout.manifest(k)) for k in todo}
        manifests = {k: t.to_pylist() for k, t in tables.items()}
        waiting = {k: {r["id"] for r in rows} for k, rows in manifests.items()}
        shard_of = {i: k for k, ids in waiting.items() for i in ids}
        got: dict[int, dict[int, dict[str, Any]]] = {k: {} for k in todo}
        total, done, stored = len(shard_of), 0, 0
        o = self.options
        shell = preparer(self.embedder())
        for rows in run_pipeline(self.ray(), [t for t in tables.values() if t.num_rows], shell,
                                 self.identity, device=o.device, draft=o.draft,
                                 batch_size=o.batch_size):
            for row in rows:
                k = shard_of[row["id"]]
                done += row["id"] not in got[k]
                got[k][row["id"]] = row
            self.progress("embed", done, total)
            for k in [k for k in got if len(got[k]) == len(waiting[k])]:
                self._store_shard(k, [got[k][r["id"]] for r in manifests[k]])
                del got[k]
                stored += 1
                self.progress("store", stored, len(todo))
            if self.stop is not None and self.stop.is_set():
                self.report.interrupted = True  # shards not stored yet are redone next time
                return

    def _store_shard(self, k: int, rows: list[dict[str, Any]]) -> None:
        """Rows of shard ``k`` into the catalog (the new rows and their vectors in one
        transaction), then the shard's files, the status last."""
        report = self.report
        for r in rows:
            if r["status"] == "failed":
                report.skipped.append(Skipped(r["path"], r["reason"]))
                self.failed.add(r["path"])
        same = [r for r in rows if r["status"] == "same"]
        self.store.touch_images([StoredImage(r["old_id"], r["path"], r["size"], r["mtime_ns"],
                                             r["content_hash"]) for r in same])
        self.store.set_metadata((r["old_id"], json.loads(r["meta"])) for r in same)
        report.unchanged += len(same)
        self.stored.update(r["old_id"] for r in same)
        self.stored.update(r["id"] for r in rows if r["status"] == "ok")
        ok = [r for r in rows if r["status"] == "ok"]
        self._put(ok)
        ids, vectors = self.store.image_vectors([r["id"] for r in ok])
        status = [_status_row(r) for r in rows]
        write_shard(self.layout, k, ids, vectors, status)

    def _put(self, ok: list[dict[str, Any]]) -> None:
        """Add the rows not yet in the catalog, each replacing the row that holds its path
        now (its old row, normally); a content already stored keeps its vector."""
        present = set(self.store.read.image_paths([r["id"] for r in ok]))
        fresh = [r for r in ok if r["id"] not in present]
        if not fresh:
            return
        holders = self.store.read.images_at([r["path"] for r in fresh])
        known = self.store.known_vectors({r["content_hash"] for r in fresh})
        for r in fresh:
            known.setdefault(r["content_hash"], r["vector"])
        files = [ImageFile(r["path"], r["size"], r["mtime_ns"], r["content_hash"],
                           json.loads(r["meta"])) for r in fresh]
        replaces = [holders[r["path"]].id if r["path"] in holders else None for r in fresh]
        vectors = np.stack([known[r["content_hash"]] for r in fresh])
        self.store.put_images(files, vectors, replaces=replaces, ids=[r["id"] for r in fresh])
        n_replaced = sum(old is not None for old in replaces)
        self.report.embedded += len(fresh)
        self.report.updated += n_replaced
        self.report.added += len(fresh) - n_replaced

    def build(self) -> bool:
        """Build the image index on the cluster when its type is trained and mergeable."""
        from mmsearch.distributed.build import build_store_index

        return build_store_index(self.store, self.options.index_type, self.ray, self.progress)


def _status_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "image_path": r["path"], "size": r["size"], "mtime_ns": r["mtime_ns"],
            "status": r["status"], "reason": r["reason"] or None,
            "content_hash": r["content_hash"] or None, "meta": r["meta"],
            "old_id": r["old_id"] if r["old_id"] >= 0 else None}
