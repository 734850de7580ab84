"""``mmsearch index --runner ray``: plan on the driver, embed on the cluster, store on the driver.

1. A run left unfinished by a killed or stopped driver is finished first: its shards
   that are complete are not redone.
2. The folders (and fsspec URLs: ``s3://bucket/photos/``) are planned (:mod:`.plan`):
   unchanged files stay on the driver, deleted ones are forgotten, the rest go to the
   cluster in manifest shards.
3. The cluster decodes and embeds (:mod:`.ray_runner`). As each shard's rows are all
   back, the driver stores them through the store's verbs, under the ids the plan gave
   out, and writes the shard's files in clip-retrieval's layout (:mod:`.shards`). In which
   order is the index's storage's to say (:meth:`VectorSource.store_shard
   <mmsearch.store.storage.VectorSource.store_shard>`):

   ``catalog``  rows and float32 vectors in one catalog transaction, then the files (a
                copy of the vectors for other tools). A shard whose files exist was
                stored, so a re-run never redoes it; a shard stored but not yet
                written is redone, and rows already in the catalog are not added twice.
   ``shards``   the files first (the npy holds the vectors for good), then the rows with
                their (shard, row) locations in one transaction. A re-run commits a
                shard whose files exist but whose rows do not, from its files: an npy
                file is never rewritten once the catalog points into it.
4. When the index type needs training and can be merged (IVF), it is built in parts
   on the cluster (:mod:`.build`); otherwise the store builds it as after a local run.

Either way ``query`` and ``serve`` use the index as a local one.
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
from mmsearch.distributed.shards import (FOLDER, Run, ShardLayout, pyarrow, read_arrow, read_npy,
                                         read_table, write_shard)
from mmsearch.errors import StorageError, UsageError
from mmsearch.ingest.backfill import backfill_metadata
from mmsearch.ingest.embed import default_workers
from mmsearch.ingest.diff import IndexReport, ScanStopped, Skipped, stopped, touch
from mmsearch.locations import as_url, filesystem, is_url
from mmsearch.progress import Progress, no_progress
from mmsearch.store import ImageFile, StoredImage
from mmsearch.settings import BATCH_SIZE, DEVICE

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
    device: str = DEVICE
    batch_size: int = BATCH_SIZE
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
        self.source = store.vector_source  # how the index keeps its image vectors
        self.stored: set[int] = set()  # ids this invocation stored or touched
        self.failed: set[str] = set()  # paths that failed in this invocation

    def run(self, roots: list[Path | str]) -> None:
        """Finish a pending run, plan and execute a new one, build the index. In an index
        stored as shards the driver never holds the vectors: the image index is left alone
        while rows are stored, then built (or brought up to date) at the end."""
        with self.source.driver_writes(self.store.image_index_deferred):
            self._run(roots)

    def _run(self, roots: list[Path | str]) -> None:
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
        except ScanStopped:
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
        self.source.commit_written([k for k in run.shards if k not in todo], self._commit_written)
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
            if stopped(self.stop):
                self.report.interrupted = True  # shards not stored yet are redone next time
                return

    def _store_shard(self, k: int, rows: list[dict[str, Any]]) -> None:
        """Rows of shard ``k`` into the catalog and its files (the status last), in the order
        the storage says: in an index stored as shards the files first, else the rows."""
        ok = [r for r in rows if r["status"] == "ok"]
        status = [_status_row(r) for r in rows]
        vectors = np.stack([r["vector"] for r in ok]) if ok else self._no_vectors()
        self.source.store_shard(np.asarray([r["id"] for r in ok], np.int64), vectors,
                                write=lambda i, v: write_shard(self.layout, k, i, v, status),
                                commit=lambda stored: self._commit(k, rows, stored),
                                stored=self.store.image_vectors)

    def _no_vectors(self) -> np.ndarray:
        return np.zeros((0, self.store.dim or 0), dtype=np.float32)

    def _commit_written(self, k: int) -> None:
        """Shard ``k``'s files exist (an index stored as shards): commit its rows unless a
        killed driver already did (the one transaction adds every new row or none)."""
        status = [_from_status(r) for r in read_table(self.layout.status(k))]
        ok = [r for r in status if r["status"] == "ok"]
        if len(self.store.read.image_paths([r["id"] for r in ok])) == len(ok):
            return
        vectors = read_npy(self.layout.npy(k)) if ok else self._no_vectors()
        if len(vectors) != len(ok):
            raise StorageError(f"{self.layout.npy(k)}: {len(vectors)} vectors for {len(ok)} "
                               f"rows; delete {self.layout.status(k)} to embed the shard again")
        self._commit(k, status, vectors)

    def _commit(self, k: int, rows: list[dict[str, Any]], stored: np.ndarray) -> None:
        """Record shard ``k``'s rows: failures in the report, touched files, new rows (row j
        of ``stored``, the ok rows' vectors as the index keeps them, is the j-th's)."""
        report = self.report
        for r in rows:
            if r["status"] == "failed":
                report.skipped.append(Skipped(r["path"], r["reason"]))
                self.failed.add(r["path"])
        same = [r for r in rows if r["status"] == "same"]
        touch(self.store, [(StoredImage(r["old_id"], r["path"], r["size"], r["mtime_ns"],
                                        r["content_hash"]), json.loads(r["meta"])) for r in same],
              report)
        self.stored.update(r["old_id"] for r in same)
        self.stored.update(r["id"] for r in rows if r["status"] == "ok")
        self._put(k, [r for r in rows if r["status"] == "ok"], stored)

    def _put(self, k: int, ok: list[dict[str, Any]], stored: np.ndarray) -> None:
        """Add the rows not yet in the catalog, each replacing the row that holds its path
        now (its old row, normally); a content already stored keeps its vector. ``stored``:
        row j is ``ok[j]``'s vector, row j of shard ``k``'s npy (in an index stored as shards)."""
        present = set(self.store.read.image_paths([r["id"] for r in ok]))
        fresh = [(j, r) for j, r in enumerate(ok) if r["id"] not in present]
        if not fresh:
            return
        holders = self.store.read.images_at([r["path"] for _, r in fresh])
        known = self.store.known_vectors({r["content_hash"] for _, r in fresh})
        for j, r in fresh:
            known.setdefault(r["content_hash"], stored[j])
        files = [ImageFile(r["path"], r["size"], r["mtime_ns"], r["content_hash"],
                           json.loads(r["meta"])) for _, r in fresh]
        replaces = [holders[r["path"]].id if r["path"] in holders else None for _, r in fresh]
        vectors = np.stack([known[r["content_hash"]] for _, r in fresh])
        self.store.put_images(files, self.source.rows(k, [j for j, _ in fresh], vectors),
                              replaces=replaces, ids=[r["id"] for _, r in fresh])
        self.report.count_put(replaces, embedded=True)

    def build(self) -> bool:
        """Build the image index on the cluster when its type is trained and mergeable."""
        from mmsearch.distributed.build import build_store_index

        return build_store_index(self.store, self.options.index_type, self.ray, self.progress)


def _from_status(s: dict[str, Any]) -> dict[str, Any]:
    """A row of a status file as the row the cluster sent (without its vector)."""
    return {**s, "path": s["image_path"], "reason": s["reason"] or "",
            "content_hash": s["content_hash"] or "", "meta": s["meta"] or "{}",
            "old_id": -1 if s["old_id"] is None else s["old_id"], "vector": None}


def _status_row(r: dict[str, Any]) -> dict[str, Any]:
    return {"id": r["id"], "image_path": r["path"], "size": r["size"], "mtime_ns": r["mtime_ns"],
            "status": r["status"], "reason": r["reason"] or None,
            "content_hash": r["content_hash"] or None, "meta": r["meta"],
            "old_id": r["old_id"] if r["old_id"] >= 0 else None}
