"""Keeping an index current: file-system events turned into index runs.

A :class:`Watcher` watches roots with ``watchfiles`` (Rust notify: inotify, FSEvents,
ReadDirectoryChangesW) and turns each batch of changes into one index run over the
folders they touched. The run is the caller's (``index``, in practice
:meth:`mmsearch.engine.Engine.index`), so every batch goes through the same incremental
diff as ``mmsearch index`` (:mod:`mmsearch.ingest.diff`): a moved file keeps its vector by
content hash, a deleted one is forgotten, a changed one is embedded again. This module
never writes the index itself.

* **Batches**: changes are gathered until the trees are quiet for ``quiet`` seconds, or
  until ``max_batch`` changes are waiting. Temporary and partial files (dot-files,
  ``*.part``, ``*.tmp``, ``*~``...) are ignored; the files of a batch must keep their size
  for ``settle`` seconds before it runs (a file still growing postpones it), and one that
  does not decode yet is skipped by the run and taken again on its next change. What
  waits is a set of folders and a count, so memory does not grow with the events.
* **One writer**: a run that finds the index locked by another writer
  (:class:`~mmsearch.errors.IndexLockedError`) keeps its folders and tries again every
  ``lock_retry`` seconds; nothing is lost.
* **A root that vanishes** (an unmounted disk, a renamed folder, a dropped share) is
  never read as "all deleted": a root is *present* when it is a folder that is not empty
  and still on the file system it was first seen on (an unmounted disk leaves an empty
  mount point behind). A missing root is said once, left out of every run (its rows are
  kept), and rescanned whole when it comes back.
* **Without events** (the OS's watch limit reached; network mounts, whose changes
  raise none here) the watcher falls back to rescanning every root each
  ``rescan_every`` seconds (:data:`RESCAN_EVERY_S` unless given), and says so once.
  Given explicitly, ``rescan_every`` also rescans alongside the events.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from mmsearch.errors import IndexLockedError, MMSearchError, UsageError
from mmsearch.ingest.discover import VIDEO_EXTENSIONS, supported_extensions
from mmsearch.locations import Roots, is_url, under
from mmsearch.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.ingest.diff import IndexReport

QUIET_S = 2.0          # a batch runs once the trees were quiet this long...
MAX_BATCH = 500        # ...or once this many changes wait
SETTLE_S = 0.5         # the files of a batch keep their size this long before it runs
LOCK_RETRY_S = 1.0     # between two tries of a locked index
CHECK_S = 1.0          # between two looks at the roots (present? a batch due?)
RETRY_S = 10.0         # after a run failed for another reason
RESCAN_EVERY_S = 600.0  # the fallback's period when none is given
MAX_POSTPONE = 20      # a batch waits at most this many settle checks for growing files
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".swp", "~")
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "fuse.sshfs",
                        "fuse.rclone", "davfs", "fuse.davfs2", "ceph", "glusterfs"})
INSTALL = "--watch needs the watchfiles package: pip install 'mmsearch[watch]'"

IndexRun = Callable[[list[Path], Progress, threading.Event], "IndexReport"]
Say = Callable[[str], None]


def require_watchfiles() -> None:
    """A `UsageError` saying how to install ``watchfiles`` when it is missing."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL) from None


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``10m``, ``2h`` or ``1d`` (a `UsageError` otherwise)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    number, unit = (raw[:-1], units[raw[-1]]) if raw[-1:] in units else (raw, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"not a duration: {text!r} (say 90s, 10m, 2h or 1d)")
    return seconds


def temporary(name: str) -> bool:
    """Whether a file name is a hidden, temporary or partial file's."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


@dataclass
class WatchState:
    """What the watcher is doing, as ``/api/info`` reports it."""

    state: str = "starting"   # watching, indexing, rescanning, waiting for the lock, stopped
    mode: str = "events"      # events, or rescan (no events: a periodic rescan)
    roots: int = 0
    missing: list[str] = field(default_factory=list)  # names of the roots not present now
    pending: int = 0          # changes waiting for the next batch
    indexing: int = 0         # new or changed photos in the run going on
    done: int = 0             # of those, embedded so far
    batches: int = 0
    last: dict | None = None  # the last batch: added, updated, removed, skipped, seconds

    def as_dict(self) -> dict:
        return asdict(self)


def batch_line(report: "IndexReport", folders: int) -> str:
    """One line for a batch: what it added, updated, moved, removed and skipped, and why."""
    line = (f"added {report.added}, updated {report.updated}, moved {report.moved}, "
            f"removed {report.removed}, skipped {len(report.skipped)}")
    if report.skipped:
        reasons = [f"{Path(s.path).name}: {s.reason}" for s in report.skipped[:3]]
        more = len(report.skipped) - len(reasons)
        line += " (" + "; ".join(reasons) + (f"; +{more} more" if more > 0 else "") + ")"
    return line + f" in {folders} folder{'s' * (folders != 1)}, {report.seconds:.1f}s"


def root_present(root: str, device: int | None = None) -> bool:
    """Whether ``root`` can be read as it is: a file, or a folder with something in it on
    file system ``device`` (when known). An empty folder is an unmounted disk's mount point,
    never a library whose photos were all deleted."""
    try:
        st = os.stat(root)
        if not os.path.isdir(root):
            return True
        if device is not None and st.st_dev != device:
            return False
        with os.scandir(root) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def network_mount(path: str) -> str | None:
    """The file-system type of ``path`` when it is a network mount (no events), else None."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return None
    best = max((m for m in mounts if under(path, [m[0].replace("\\040", " ")])),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best and best[1] in NETWORK_FS else None


class _Pending:
    """What waits for the next batch: the folders touched, the photos changed, a count."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # photos tracked for the settle check (a bound, not a limit on events)
        self.folders: set[str] = set()
        self.photos: set[str] = set()
        self.count = 0
        self.last = 0.0  # when the last change came

    def add(self, folder: str, photo: str | None, now: float) -> None:
        """One change; a photo's second change (created, then written) counts once."""
        self.folders.add(folder)
        if photo is not None and photo in self.photos:
            self.last = max(self.last, now)
            return
        if photo is not None and len(self.photos) < self.cap:
            self.photos.add(photo)
        self.count += 1
        self.last = max(self.last, now)

    def take(self) -> "_Pending":
        taken, fresh = _Pending(self.cap), vars(self).copy()
        vars(taken).update(fresh)
        self.folders, self.photos, self.count = set(), set(), 0
        return taken

    def put_back(self, taken: "_Pending") -> None:
        self.folders |= taken.folders
        self.photos |= set(list(taken.photos)[:max(self.cap - len(self.photos), 0)])
        self.count += taken.count


class Watcher:
    """Keeps an index in line with ``roots`` until ``stop`` is set (see the module).

    ``index(folders, progress, stop)`` runs one index run over folders (and raises
    :class:`IndexLockedError` when another writer holds the index); ``say`` gets one line
    per batch and per notice. ``events=False`` forces the periodic rescan; ``catch_up``
    rescans the present roots first (changes made while nothing watched).
    """

    def __init__(self, roots: Iterable[str], index: IndexRun, *, say: Say = lambda _: None,
                 stop: threading.Event | None = None, quiet: float = QUIET_S,
                 max_batch: int = MAX_BATCH, settle: float = SETTLE_S,
                 rescan_every: float | None = None, events: bool = True,
                 lock_retry: float = LOCK_RETRY_S, check_every: float = CHECK_S,
                 catch_up: bool = False) -> None:
        self.roots, skipped = _watchable(roots)
        self._run_index, self._say = index, say
        self.stop = stop or threading.Event()
        self.quiet, self.max_batch, self.settle = quiet, max_batch, settle
        self.rescan_every, self.lock_retry, self.check_every = rescan_every, lock_retry, check_every
        self._events, self.catch_up = events, catch_up
        self._pending = _Pending(cap=4 * max_batch)
        self._devices: dict[str, int] = {}
        self._present: set[str] = set()
        self._next_rescan = time.monotonic() + (rescan_every or RESCAN_EVERY_S)
        self._retry_at = 0.0
        self._postponed = 0
        self._exts = supported_extensions() | VIDEO_EXTENSIONS
        self.state = WatchState(roots=len(self.roots))
        for root in skipped:
            say(f"watch: {root} is not watched (URLs and single files are indexed, not watched)")

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        """Watch until ``stop`` is set; a bad file never ends it."""
        self._check_roots()
        self.state.state = "watching"
        if self.catch_up:
            self._queue_roots()
        if not self._events:
            self._fall_back("file-system events are off")
        else:
            self._no_events_on_network_mounts()
        try:
            while not self.stop.is_set():
                if self._events and self._present:
                    self._watch(sorted(self._present))
                else:
                    self._check_roots()
                    self._tick()
                    self.stop.wait(self.check_every)
        finally:
            self.state.state = "stopped"

    def _watch(self, roots: list[str]) -> None:
        """Take events on ``roots`` until the present roots change, or ``stop``."""
        import watchfiles

        self.state.mode = "events"
        try:
            for changes in watchfiles.watch(
                    *roots, watch_filter=None, debounce=int(min(self.quiet, 1.0) * 1000),
                    step=50, stop_event=self.stop, rust_timeout=int(self.check_every * 1000),
                    yield_on_timeout=True, raise_interrupt=False, ignore_permission_denied=True):
                self._add(changes)
                if self._check_roots() != set(roots):
                    return  # a root went or came back: watch the present ones afresh
                self._tick()
        except OSError as exc:  # a root that just went, or the OS's watch limit
            if self._check_roots() != set(roots):
                return
            self._fall_back(f"file-system events are unavailable ({str(exc).strip() or exc!r})")
        except RuntimeError as exc:  # notify's other errors
            self._fall_back(f"file-system events failed ({exc})")

    def _fall_back(self, why: str) -> None:
        self._events = False
        self.state.mode = "rescan"
        every = self.rescan_every or RESCAN_EVERY_S
        self.rescan_every = every
        self._say(f"watch: {why}; rescanning every {_duration(every)} instead "
                  "(--rescan-every sets how often)")
        self._queue_roots()

    def _no_events_on_network_mounts(self) -> None:
        kinds = {kind for r in self.roots if (kind := network_mount(r))}
        if kinds:
            self._fall_back(f"network mounts ({', '.join(sorted(kinds))}) raise no events")

    # -- events ------------------------------------------------------------------------
    def _add(self, changes: Iterable[tuple[object, str]]) -> None:
        now = time.monotonic()
        for change, path in changes:
            name = os.path.basename(path)
            if temporary(name):
                continue
            photo = os.path.splitext(name)[1].lower() in self._exts
            deleted = getattr(change, "name", "") == "deleted"
            if not (photo or deleted or os.path.isdir(path)):
                continue  # not a photo, nor a folder (a deleted name may have been one)
            self._pending.add(os.path.dirname(path), path if photo and not deleted else None, now)
        self.state.pending = self._pending.count

    def _queue_roots(self, roots: Iterable[str] | None = None) -> None:
        for root in (self._present if roots is None else roots):
            self._pending.add(root, None, 0.0)  # due at once
        self.state.pending = self._pending.count

    # -- roots -------------------------------------------------------------------------
    def _check_roots(self) -> set[str]:
        """The present roots; a root that went is said once, one that came back is queued."""
        present = set()
        for root in self.roots:
            if root_present(root, self._devices.get(root)):
                present.add(root)
                if root not in self._devices and os.path.isdir(root):
                    self._devices[root] = os.stat(root).st_dev
        for root in sorted(self._present - present):
            self._say(f"watch: {root} is missing (unmounted or renamed?); its photos stay "
                      "indexed, and it is rescanned when it comes back")
        back = sorted(present - self._present) if self.state.state != "starting" else []
        for root in back:
            self._say(f"watch: {root} is back; rescanning it")
        self._queue_roots(back)
        if self.state.state == "starting":
            for root in sorted(set(self.roots) - present):
                self._say(f"watch: {root} is missing; waiting for it (its photos stay indexed)")
        self._present = present
        self.state.missing = [os.path.basename(r) or r for r in self.roots if r not in present]
        return present

    # -- batches -----------------------------------------------------------------------
    def _tick(self) -> None:
        """Run a batch when one is due: quiet long enough, or big enough, or a rescan."""
        now = time.monotonic()
        if self.rescan_every and now >= self._next_rescan:
            self._next_rescan = now + self.rescan_every
            self._queue_roots()
        p = self._pending
        due = p.folders and (now - p.last >= self.quiet or p.count >= self.max_batch)
        if due and now >= self._retry_at:
            self._run_batch()

    def _run_batch(self) -> None:
        waiting = self.state.state == "waiting for the lock"
        if not waiting:
            self.state.state, self.state.indexing = "indexing", len(self._pending.photos)
        if not self._settled():
            self.state.state = "waiting for the lock" if waiting else "watching"
            return
        taken = self._pending.take()
        folders = self._targets(taken.folders)
        if not folders:  # all under missing roots: they wait for their roots
            self.state.state, self.state.pending = "watching", self._pending.count
            return
        whole = set(folders) <= self._present and not taken.photos
        self.state.state = "rescanning" if whole else "indexing"
        self.state.indexing, self.state.done = len(taken.photos), 0
        try:
            report = self._run_index([Path(f) for f in folders], self._progress, self.stop)
        except IndexLockedError:
            self._wait_for_lock(taken)
            return
        except (MMSearchError, OSError) as exc:  # e.g. a folder gone since its check
            self._say(f"watch: this batch failed and will be tried again: {exc}")
            self._pending.put_back(taken)
            self._retry_at = time.monotonic() + RETRY_S
            return
        self._done(report, len(folders))

    def _wait_for_lock(self, taken: _Pending) -> None:
        if self.state.state != "waiting for the lock":
            self._say("watch: another process is writing the index; waiting for it, then "
                      "rescanning the changed folders")
        self.state.state = "waiting for the lock"
        self._pending.put_back(taken)
        self._retry_at = time.monotonic() + self.lock_retry
        self.state.pending = self._pending.count

    def _done(self, report: "IndexReport", folders: int) -> None:
        self._say(f"watch: {batch_line(report, folders)}")
        self.state.batches += 1
        self.state.last = {"added": report.added, "updated": report.updated,
                           "moved": report.moved, "removed": report.removed,
                           "embedded": report.embedded,
                           "skipped": len(report.skipped),
                           "seconds": round(report.seconds, 2)}
        self.state.indexing = self.state.done = 0
        self.state.pending = self._pending.count
        self.state.state = "watching"
        self._retry_at = 0.0

    def _progress(self, stage: str, done: int, total: int) -> None:
        if stage == "hash":
            self.state.indexing = total
        elif stage == "embed":
            self.state.done = done

    def _targets(self, folders: Iterable[str]) -> list[str]:
        """The folders to run over: under a present root (the others wait for their root),
        each the nearest one that still exists, none under another."""
        out = set()
        for folder in folders:
            root = next((r for r in self.roots if under(folder, [r])), None)
            if root is None or root not in self._present:
                continue
            while folder != root and not os.path.isdir(folder):
                folder = os.path.dirname(folder)
            out.add(folder)
        return Roots(out).outermost()

    def _settled(self) -> bool:
        """Whether the batch's photos kept their size for ``settle`` s (else it waits)."""
        photos = list(self._pending.photos)
        if not photos or self.settle <= 0:
            return True
        before = [_size(p) for p in photos]
        self.stop.wait(self.settle)
        if before == [_size(p) for p in photos] or self._postponed >= MAX_POSTPONE:
            self._postponed = 0
            return True
        self._postponed += 1
        self._pending.last = time.monotonic()
        return False


def _size(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _watchable(roots: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the roots to watch: the outermost local folders, missing ones included; the others)."""
    local = [r for r in roots if not is_url(r) and not os.path.isfile(r)]
    return Roots(local).outermost(), [r for r in roots if is_url(r) or os.path.isfile(r)]


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
