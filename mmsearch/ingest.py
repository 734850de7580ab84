"""Indexing a folder: discover → compare with the catalog → embed what is new → store.

A run is incremental. A file whose size and mtime match its row is unchanged.
Otherwise its content hash decides: same content (touched, moved or copied) reuses
the stored embedding; new content is decoded and embedded. Rows whose files
are gone are removed. Work is committed in batches, catalog first and then the
FAISS file, so an interrupted run keeps everything it finished.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from mmsearch.catalog import StoredImage
from mmsearch.decode import content_hash
from mmsearch.discover import FoundFile, SkippedFile, canonical_root, walk
from mmsearch.embed import default_workers, embed_paths
from mmsearch.errors import DecodeError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models import Embedder
    from mmsearch.store import Store

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: scan, hash, embed
COMMIT_EVERY = 256  # images per catalog transaction


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class IndexReport:
    """What an index run did. ``embedded`` counts model forward passes per image."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    embedded: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


@dataclass
class _Plan:
    touch: list[StoredImage] = field(default_factory=list)     # same content, new mtime
    reuse: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    dupes: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    embed: list[tuple[FoundFile, str, StoredImage | None]] = field(default_factory=list)
    remove: list[StoredImage] = field(default_factory=list)


def _noop(stage: str, done: int, total: int) -> None:
    pass


def scan(roots: Iterable[Path], report: IndexReport) -> tuple[list[FoundFile], list[str], list[str]]:
    """Walk ``roots``; returns found files, the canonical roots, and unreadable dirs to keep."""
    found: dict[Path, FoundFile] = {}
    canon: list[str] = []
    keep: list[str] = []
    for root in roots:
        if not os.path.lexists(root):
            raise UsageError(f"no such file or directory: {root}")
        canon.append(str(canonical_root(root)))
        for item in walk(root):
            if isinstance(item, SkippedFile):
                report.skipped.append(Skipped(str(item.path), item.reason))
                keep.append(str(item.path))
            else:
                found.setdefault(item.path, item)
    return list(found.values()), canon, keep


def plan(store: "Store", found: list[FoundFile], roots: list[str], keep: list[str],
         report: IndexReport, progress: Progress, workers: int) -> _Plan:
    """Decide, per file, whether it is unchanged, reusable, to embed, or gone."""
    stored: dict[str, StoredImage] = {}
    for root in roots:
        stored.update(store.catalog.images_under(root))
    todo: list[tuple[FoundFile, StoredImage | None]] = []
    for f in found:
        row = stored.get(str(f.path))
        if row and (row.size, row.mtime_ns) == (f.size, f.mtime_ns):
            report.unchanged += 1
        else:
            todo.append((f, row))
    seen = {str(f.path) for f in found}
    result = _Plan(remove=[r for p, r in stored.items()
                           if p not in seen and not any(_inside(p, k) for k in keep)])
    hashes = _hash_all([f.path for f, _ in todo], workers, progress, report)
    known = store.catalog.known_vectors([h for h in hashes if h], store.dim or 0)
    batch_hashes: set[str] = set()
    for (f, row), h in zip(todo, hashes):
        if h is None:
            continue
        if row and row.content_hash == h:
            report.unchanged += 1
            result.touch.append(StoredImage(row.id, row.path, f.size, f.mtime_ns, h))
        elif h in known:
            result.reuse.append((f, h, row))
        elif h in batch_hashes:  # a copy of a file embedded in this run: reuse it afterwards
            result.dupes.append((f, h, row))
        else:
            batch_hashes.add(h)
            result.embed.append((f, h, row))
    return result


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _hash_all(paths: list[Path], workers: int, progress: Progress,
              report: IndexReport) -> list[str | None]:
    def one(p: Path) -> str | None:
        try:
            return content_hash(p)
        except DecodeError as exc:
            report.skipped.append(Skipped(str(p), str(exc)))
            return None

    out: list[str | None] = []
    with ThreadPoolExecutor(workers) as pool:
        for i, h in enumerate(pool.map(one, paths), 1):
            out.append(h)
            if i % 64 == 0 or i == len(paths):
                progress("hash", i, len(paths))
    return out


def run(store: "Store", embedder: "Embedder", roots: Iterable[Path], *, batch_size: int = 32,
        workers: int = 0, draft: bool = True, progress: Progress = _noop,
        stop: threading.Event | None = None) -> IndexReport:
    """Bring the index in line with ``roots``. The caller holds the store's write lock."""
    start = time.perf_counter()
    report = IndexReport()
    workers = workers or default_workers()
    found, canon, keep = scan(roots, report)
    progress("scan", len(found), len(found))
    todo = plan(store, found, canon, keep, report, progress, workers)
    store.vectors("images")  # load and check the FAISS file before the first commit
    ids = _IdAllocator(store.catalog.next_image_id())
    _apply_removals(store, todo, report)
    _apply_reuse(store, todo.reuse, ids, report)
    _embed_new(store, embedder, todo, ids, report, progress, stop,
               batch_size=batch_size, workers=workers, draft=draft)
    _apply_reuse(store, todo.dupes if not report.interrupted else [], ids, report)
    if not report.interrupted:
        store.catalog.drop_orphan_embeddings()
    store.save("images")
    report.seconds = time.perf_counter() - start
    return report


class _IdAllocator:
    def __init__(self, first: int) -> None:
        self._next = first

    def take(self, row: StoredImage | None) -> int:
        if row is not None:
            return row.id
        self._next += 1
        return self._next - 1


def _apply_removals(store: "Store", todo: _Plan, report: IndexReport) -> None:
    store.catalog.touch_images(todo.touch)
    gone = np.asarray([r.id for r in todo.remove], dtype=np.int64)
    store.catalog.commit_images({}, [], delete_ids=gone)
    _remove_vectors(store, gone)
    report.removed += len(gone)


def _remove_vectors(store: "Store", ids: np.ndarray) -> bool:
    """Drop ``ids`` from FAISS; False when it had to be rebuilt from the catalog instead."""
    if ids.size and not store.vectors("images").remove(ids):
        store.rebuild("images", note=False)  # an index type without removal (HNSW)
        return False
    return True


def _apply_reuse(store: "Store", entries: list[tuple[FoundFile, str, StoredImage | None]],
                 ids: _IdAllocator, report: IndexReport) -> None:
    """Rows for files whose content is already embedded: no model call."""
    known = store.catalog.known_vectors([h for _, h, _ in entries], store.dim or 0)
    pending = []
    for f, h, row in entries:
        if h not in known:
            report.skipped.append(Skipped(str(f.path), "same content as a file that failed"))
            continue
        pending.append((StoredImage(ids.take(row), str(f.path), f.size, f.mtime_ns, h),
                        known[h], row is not None))
    _commit(store, pending, report, embedded=False)


def _embed_new(store: "Store", embedder: "Embedder", todo: _Plan, ids: _IdAllocator,
               report: IndexReport, progress: Progress, stop: threading.Event | None,
               **options) -> None:
    jobs = {f.path: (f, h, row) for f, h, row in todo.embed}
    pending: list[tuple[StoredImage, np.ndarray, bool]] = []
    done = 0
    progress("embed", 0, len(jobs))
    for batch in embed_paths(embedder, list(jobs), **options):
        for path, reason in batch.failed:
            report.skipped.append(Skipped(str(path), reason))
        for path, vec in zip(batch.paths, batch.vectors):
            f, h, row = jobs[path]
            pending.append((StoredImage(ids.take(row), str(f.path), f.size, f.mtime_ns, h), vec,
                            row is not None))
        done += len(batch.paths) + len(batch.failed)
        progress("embed", done, len(jobs))
        if len(pending) >= COMMIT_EVERY:
            _commit(store, pending, report)
            pending = []
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
    _commit(store, pending, report)


def _commit(store: "Store", pending: list[tuple[StoredImage, np.ndarray, bool]],
            report: IndexReport, embedded: bool = True) -> None:
    """Catalog rows and vectors in one transaction, then the in-memory FAISS index."""
    if not pending:
        return
    rows = [p[0] for p in pending]
    vectors = np.stack([p[1] for p in pending])
    new = {r.content_hash: v for r, v in zip(rows, vectors)} if embedded else {}
    store.catalog.commit_images(new, rows)
    replaced = np.asarray([r.id for r, _, upd in pending if upd], dtype=np.int64)
    if _remove_vectors(store, replaced):  # else the rebuild already holds the new rows
        store.vectors("images").add(np.asarray([r.id for r in rows], np.int64), vectors)
    report.embedded += len(rows) if embedded else 0
    report.updated += len(replaced)
    report.added += len(rows) - len(replaced)
