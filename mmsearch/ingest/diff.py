"""The incremental diff of an index run, and its report: what both runners do alike.

An index run scans its roots (:func:`scan`), compares what it found with the catalog's
rows under them (:func:`diff`) and sorts every file into one of three:

* **unchanged**: its row has the same size and mtime; nothing is done;
* **candidate**: new, or its size or mtime changed; it comes with its old row (or None).
  Its content hash decides what happens: the same hash as its old row means only the
  mtime changed (a *touched* file, :func:`touch`); a hash already stored reuses its
  vector; a new one is embedded;
* **gone**: a row under the roots whose file was not found, and not under a path that
  could not be read (kept as it is). A new file with the same content *moved* there: the
  row follows it (:class:`Moves`) and keeps its id, vector and place in the index. The
  others are forgotten (:func:`forget_gone`).

:func:`reconcile` does the comparison and counts the unchanged. The local runner
(:mod:`mmsearch.ingest.run`) hashes the candidates on the driver, so it knows the moves
before it forgets anything. The Ray runner (:mod:`mmsearch.distributed`) hands the
candidates to the cluster, which hashes them; it forgets the gone rows at once, and a moved
file there gets a new id (its vector is still reused, not embedded again). Both count what
they store through :class:`IndexReport`. Where a path is, and whether it is under a root,
is :mod:`mmsearch.locations`' to say.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from mmsearch.ingest.discover import SkippedFile, walk
from mmsearch.locations import Roots, given_root
from mmsearch.store import StoredImage

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

STOP_EVERY = 256  # entries walked between two looks at the stop event


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class IndexReport:
    """What an index run did. ``embedded`` counts model forward passes per image."""

    __json_extra__ = ("images_per_second",)

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0             # files found under a new path: their rows followed them
    removed: int = 0
    embedded: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[Skipped] = field(default_factory=list)  # stored, but not whole (a video)
    frames: int = 0            # video frames stored (one per span of alike frames)
    videos_without_decoder: int = 0  # videos found but not indexed: PyAV is missing
    metadata_read: int = 0     # earlier images whose metadata this run read (an older index)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    def count_put(self, replaces: Sequence[int | None], embedded: bool) -> None:
        """Count one write of new rows, ``replaces[i]`` the id of the row the i-th one
        replaces (an updated file) or None (an added one); ``embedded``: their vectors
        came from the model in this run."""
        n_replaced = sum(old is not None for old in replaces)
        self.updated += n_replaced
        self.added += len(replaces) - n_replaced
        self.embedded += len(replaces) if embedded else 0


class ScanStopped(Exception):
    """The stop event was set before the scan finished: nothing may be removed."""


def stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


class Found(Protocol):
    """A file found under a root: a local `FoundFile` or a listed `RemoteFile`."""

    @property
    def path(self) -> Path | str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


@dataclass
class Scan:
    """What a scan found: files (one per path), canonical roots, unreadable paths to keep."""

    found: list[Found] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)


def scan(roots: Iterable[Path], report: IndexReport, stop: threading.Event | None = None,
         extensions: Collection[str] | None = None) -> Scan:
    """Walk the local ``roots`` (a missing one is a `UsageError`) for files with these
    ``extensions`` (default: the images'); what was passed over is reported and kept.
    `ScanStopped` when ``stop`` is set before the walk ends."""
    found: dict[Path, Found] = {}
    out = Scan()
    roots = list(roots)
    out.roots += [given_root(root) for root in roots]  # all checked before the first walk
    for root in roots:
        for n, item in enumerate(walk(root, extensions=extensions)):
            if n % STOP_EVERY == 0 and stopped(stop):
                raise ScanStopped
            if isinstance(item, SkippedFile):
                report.skipped.append(Skipped(str(item.path), item.reason))
                out.keep.append(str(item.path))
            else:
                found.setdefault(item.path, item)
    out.found = list(found.values())
    return out


class Candidate(NamedTuple):
    """A file to hash: new (``old`` None) or changed in size or mtime since ``old``."""

    file: Found
    old: StoredImage | None


@dataclass
class Diff:
    unchanged: list[StoredImage]
    candidates: list[Candidate]
    gone: list[StoredImage]


def diff(scanned: Scan, stored: Mapping[str, StoredImage], *,
         settled: Collection[int] = frozenset(), left: Collection[str] = frozenset()) -> Diff:
    """``scanned`` against ``stored`` (the catalog's rows under its roots, by path); see the
    module. A resumed run's own work is not taken again: rows in ``settled`` (stored or
    touched by it) are not unchanged, files in ``left`` (failed in it) are no candidates."""
    out = Diff([], [], [])
    for f in scanned.found:
        row = stored.get(str(f.path))
        if row and (row.size, row.mtime_ns) == (f.size, f.mtime_ns):
            if row.id not in settled:
                out.unchanged.append(row)
        elif str(f.path) not in left:
            out.candidates.append(Candidate(f, row))
    seen, unreadable = {str(f.path) for f in scanned.found}, Roots(scanned.keep)
    out.gone = [r for p, r in stored.items() if p not in seen and p not in unreadable]
    return out


def reconcile(store: "Store", scanned: Scan, report: IndexReport, *,
              settled: Collection[int] = frozenset(),
              left: Collection[str] = frozenset()) -> Diff:
    """:func:`diff` with the catalog; counts the unchanged. The candidates are the runner's
    to hash, the gone its to move (:class:`Moves`) or forget (:func:`forget_gone`)."""
    found = diff(scanned, store.read.images_under(scanned.roots), settled=settled, left=left)
    report.unchanged += len(found.unchanged)
    return found


class Moves:
    """The gone rows of a run, by content: a new file with a gone row's content is that
    file moved (or renamed), and takes the row (:meth:`claim`). :meth:`settle` records the
    moves and forgets the rows nothing claimed."""

    def __init__(self, gone: Iterable[StoredImage]) -> None:
        self._gone: dict[str, list[StoredImage]] = defaultdict(list)
        for row in gone:
            self._gone[row.content_hash].append(row)
        self._moved: list[tuple[StoredImage, dict[str, Any]]] = []

    def claim(self, file: Found, content_hash: str, meta: dict[str, Any]) -> bool:
        """Whether ``file`` (new under its path, with this content) is a gone row moved."""
        rows = self._gone.get(content_hash)
        if not rows:
            return False
        row = rows.pop()
        self._moved.append((StoredImage(row.id, str(file.path), file.size, file.mtime_ns,
                                        content_hash), meta))
        return True

    def taken(self) -> list[StoredImage]:
        """The claimed rows, with their files' new paths, sizes and mtimes."""
        return [r for r, _ in self._moved]

    def unclaimed(self) -> list[StoredImage]:
        return [r for rows in self._gone.values() for r in rows]

    def settle(self, store: "Store", report: IndexReport, *, forget: bool = True) -> None:
        """Record the moves of photos; forget the unclaimed rows unless ``forget`` is False
        (a run stopped before it hashed every file: they may be moves it has not seen yet)."""
        store.touch_images(self.taken())
        store.set_metadata((r.id, meta) for r, meta in self._moved)
        report.moved += len(self._moved)
        if forget:
            forget_gone(store, self.unclaimed(), report)


def forget_gone(store: "Store", gone: Sequence[StoredImage], report: IndexReport) -> None:
    store.forget_images(np.asarray([r.id for r in gone], dtype=np.int64))
    report.removed += len(gone)


def touch(store: "Store", rows: Sequence[tuple[StoredImage, dict[str, Any]]],
          report: IndexReport) -> None:
    """Record touched files (same content as their row): new size and mtime, and the
    metadata read from them; they count as unchanged."""
    store.touch_images([r for r, _ in rows])
    store.set_metadata((r.id, meta) for r, meta in rows)
    report.unchanged += len(rows)
