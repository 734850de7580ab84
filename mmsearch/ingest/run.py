"""Indexing a folder: discover → compare with the catalog → embed what is new → store.

A run is incremental (:mod:`mmsearch.ingest.diff`). A file whose size and mtime match
its row is unchanged. The other files are hashed here, on the driver, in worker threads:
same content as the old row (touched), or as a row whose file is gone (moved: the row
follows the file and keeps its id), or as another stored image (copied), reuses the stored
embedding; new content is decoded and embedded. Rows whose files are gone and did not move
are removed.

Work is committed in batches of ``commit_every`` images through the store's
write verbs (:meth:`Store.put_images`: rows and their vectors in one catalog
transaction, then the in-memory FAISS index). The FAISS file is
saved at the end of the run (and every ``save_every`` seconds during a long one),
so a run killed at any moment leaves every finished batch in the catalog, and the
next open brings the FAISS file up to date from it. A changed file gets a new id
(its old row is deleted in the same transaction), so an id never changes vector.
A file rewritten between its scan and its decoding is reported, not stored (its
vector would be filed under the old content's hash); the next run takes it.
A ``stop`` event ends the run after the current batch, with everything done committed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from mmsearch.errors import DecodeError, UsageError
from mmsearch.ingest.decode import content_hash
from mmsearch.ingest.diff import (Candidate, IndexReport, Moves, ScanStopped, Skipped, reconcile,
                                  scan, stopped, touch)
from mmsearch.ingest.discover import VIDEO_EXTENSIONS, FoundFile, supported_extensions
from mmsearch.ingest.videos import VideoOptions, index_videos, split
from mmsearch.ingest.backfill import backfill_metadata, file_metadata
from mmsearch.ingest.embed import default_workers, embed_paths
from mmsearch.progress import Progress, no_progress
from mmsearch.store import ImageFile, StoredImage
from mmsearch.settings import BATCH_SIZE, DRAFT, WORKERS

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store

COMMIT_EVERY = 256  # images per catalog transaction
SAVE_EVERY_S = 60.0  # at least this long between saves of the FAISS file during a run
_HASH_CHUNK = 256  # files hashed between two looks at the stop event


@dataclass
class _Plan:
    """The candidates of a run (:func:`mmsearch.ingest.diff.reconcile`), once hashed."""

    touch: list[tuple[StoredImage, dict[str, Any]]] = field(default_factory=list)  # new mtime
    reuse: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    dupes: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    embed: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> photo metadata


def _hash_candidates(store: "Store", todo: list[Candidate], moves: Moves, report: IndexReport,
                     progress: Progress, workers: int,
                     stop: threading.Event | None = None) -> _Plan:
    """Hash the candidates: touched (same content as the old row), a gone row moved (taken
    by ``moves``), reusable, or to embed."""
    result = _Plan()
    hashed = _hash_all([f for f, _ in todo], workers, progress, report, stop)
    known = store.known_vectors([h[0] for h in hashed if h])
    batch_hashes: set[str] = set()
    for (f, row), found_hash in zip(todo, hashed):
        if found_hash is None:  # unreadable (reported) or not hashed before a stop: left as it is
            continue
        h, result.meta[str(f.path)] = found_hash
        if row and row.content_hash == h:
            result.touch.append((StoredImage(row.id, row.path, f.size, f.mtime_ns, h),
                                 result.meta[str(f.path)]))
        elif row is None and moves.claim(f, h, result.meta[str(f.path)]):
            continue
        elif h in known:
            result.reuse.append((f, h, row))
        elif h in batch_hashes:  # a copy of a file embedded in this run: reuse it afterwards
            result.dupes.append((f, h, row))
        else:
            batch_hashes.add(h)
            result.embed.append((f, h, row))
    return result


def _hash_all(files: list[FoundFile], workers: int, progress: Progress, report: IndexReport,
              stop: threading.Event | None = None) -> list[tuple[str, dict[str, Any]] | None]:
    """(content hash, metadata) of each file, read in worker threads (None: unreadable,
    or not reached before ``stop``)."""
    def one(f: FoundFile) -> tuple[str, dict[str, Any]] | None:
        try:
            return content_hash(f.path), file_metadata(f.path, f.mtime_ns)
        except DecodeError as exc:
            report.skipped.append(Skipped(str(f.path), str(exc)))
            return None

    out: list[tuple[str, dict[str, Any]] | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(files), _HASH_CHUNK):
            if stopped(stop):
                report.interrupted = True
                break
            out += pool.map(one, files[start:start + _HASH_CHUNK])
            progress("hash", len(out), len(files))
    return out + [None] * (len(files) - len(out))


def index_files(store: "Store", embedder: "Embedder | Callable[[], Embedder]", roots: Iterable[Path], *, batch_size: int = BATCH_SIZE,
        workers: int = WORKERS, draft: bool = DRAFT, progress: Progress = no_progress,
        stop: threading.Event | None = None, commit_every: int | None = None,
        save_every: float | None = None, decoder: str = "auto",
        video: VideoOptions = VideoOptions()) -> IndexReport:
    """Bring the index in line with ``roots``. The caller holds the store's write lock.

    ``commit_every`` images go in one catalog transaction; the FAISS file is
    saved at the end and, during a long run, at most every ``save_every`` seconds
    (or less often when saving is slow). Setting ``stop`` ends the run after the
    batch in progress with ``report.interrupted`` set; a stop during the scan
    changes nothing.
    """
    commit_every = COMMIT_EVERY if commit_every is None else commit_every
    save_every = SAVE_EVERY_S if save_every is None else save_every
    if commit_every < 1:
        raise UsageError(f"commit_every must be at least 1, got {commit_every}")
    start = time.perf_counter()
    report = IndexReport()
    decoders, workers = workers, workers or default_workers()  # 0: the decoder chooses
    try:
        scanned, videos = split(scan(roots, report, stop, supported_extensions() | VIDEO_EXTENSIONS))
    except ScanStopped:
        report.interrupted = True
        report.seconds = time.perf_counter() - start
        return report
    progress("scan", len(scanned.found), len(scanned.found))
    store.vectors("images")  # load and check the FAISS file before the first write
    found = reconcile(store, scanned, report)
    moves = Moves(found.gone)
    todo = _hash_candidates(store, found.candidates, moves, report, progress, workers, stop)
    moves.settle(store, report, forget=not report.interrupted)
    saver = _Saver(store, save_every)
    touch(store, todo.touch, report)
    _apply_reuse(store, todo.reuse, todo.meta, report, saver)
    embedder = _embed_new(store, embedder, todo, report, progress, stop, saver, commit_every,
               batch_size=batch_size, workers=decoders, draft=draft, decoder=decoder)
    _apply_reuse(store, todo.dupes if not report.interrupted else [], todo.meta, report, saver)
    if not report.interrupted:
        embedder = index_videos(store, embedder, videos, report, video, batch_size=batch_size,
                                stop=stop)
    if not report.interrupted:
        store.prune()
        report.metadata_read = backfill_metadata(store, scanned.roots, workers, stop)
    store.flush()
    report.seconds = time.perf_counter() - start
    return report


class _Saver:
    """Saves the FAISS file now and then during a long run, so readers and a resume
    after a crash have less to catch up from the catalog."""

    def __init__(self, store: "Store", every: float) -> None:
        self.store = store
        self.every = every
        self.last = time.monotonic()
        self.cost = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= max(self.every, 20 * self.cost):  # at most ~5% of the run
            self.store.flush()
            self.last = time.monotonic()
            self.cost = self.last - now


Pending = tuple[ImageFile, np.ndarray, "int | None"]  # a new row, its vector, the id it replaces


def _row(f: FoundFile, content: str, meta: dict[str, dict[str, Any]]) -> ImageFile:
    return ImageFile(str(f.path), f.size, f.mtime_ns, content, meta.get(str(f.path), {}))


def _apply_reuse(store: "Store", entries: list[tuple[FoundFile, str, StoredImage | None]],
                 meta: dict[str, dict[str, Any]], report: IndexReport, saver: _Saver) -> None:
    """Rows for files whose content is already embedded: no model call."""
    known = store.known_vectors([h for _, h, _ in entries])
    pending: list[Pending] = []
    for f, h, row in entries:
        if h not in known:
            report.skipped.append(Skipped(str(f.path), "same content as a file that failed"))
            continue
        pending.append((_row(f, h, meta), known[h], row.id if row else None))
    _commit(store, pending, report, saver, embedded=False)


def _embed_new(store: "Store", embedder: "Embedder | Callable[[], Embedder]", todo: _Plan,
               report: IndexReport, progress: Progress, stop: threading.Event | None,
               saver: _Saver, commit_every: int, **options) -> "Embedder | Callable[[], Embedder]":
    """Embed the new contents; returns the embedder (loaded, if it was needed)."""
    if stopped(stop):
        report.interrupted = True
        return embedder
    jobs = {f.path: (f, h, row) for f, h, row in todo.embed}
    if not jobs:
        return embedder
    if callable(embedder):  # loaded only now: a run with nothing new never loads a model
        embedder = embedder()
    pending: list[Pending] = []
    done = 0
    progress("embed", 0, len(jobs))
    expect = {f.path: (f.size, f.mtime_ns) for f, _, _ in todo.embed}
    for batch in embed_paths(embedder, list(jobs), expect=expect, **options):
        for path, reason in batch.failed:
            report.skipped.append(Skipped(str(path), reason))
        for path, vec in zip(batch.paths, batch.vectors):
            f, h, row = jobs[path]
            pending.append((_row(f, h, todo.meta), vec, row.id if row else None))
        done += len(batch.paths) + len(batch.failed)
        progress("embed", done, len(jobs))
        if len(pending) >= commit_every:
            _commit(store, pending, report, saver)
            pending = []
        if stopped(stop):
            report.interrupted = True
            break
    _commit(store, pending, report, saver)
    return embedder


def _commit(store: "Store", pending: list[Pending], report: IndexReport, saver: _Saver,
            embedded: bool = True) -> None:
    """One write of the store: new rows (and, when ``embedded``, their new vectors)."""
    if not pending:
        return
    replaced = [old for _, _, old in pending]
    store.put_images([p[0] for p in pending], np.stack([p[1] for p in pending]),
                     replaces=replaced, new_content=embedded)
    report.count_put(replaced, embedded)
    saver.tick()
