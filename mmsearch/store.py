"""One index on disk: a folder with the SQLite catalog and two FAISS files.

``<home>/<name>/catalog.sqlite``  source of truth: rows, vectors, model identity
``<home>/<name>/images.faiss``    derived: image vectors, ids = images.id
``<home>/<name>/texts.faiss``     derived: text vectors, ids = texts.id
``<home>/<name>/write.lock``      held (flock) by the one process writing

Crash safety rests on three rules:

* Rows and their vectors are committed to the catalog together, in one
  transaction; a FAISS file is only ever replaced atomically (temporary file,
  fsync, rename) and is never ahead of the catalog it was saved from.
* An id is never reused and never changes vector: a changed file gets a new id
  (see :meth:`Catalog.next_image_id`). So a FAISS file is correct for every id
  it shares with the catalog, and bringing it up to date is a matter of ids.
* After each save the file's size and CRC-32 are recorded in the catalog;
  a file that does not match (damaged, or replaced while we looked) is never
  trusted: it is rebuilt from the vectors the catalog stores.

On open, each FAISS file is checked (checksum, readability, dimension, ids)
against the catalog; a file that is stale (a run was killed before saving it),
damaged or missing is brought back in line from the catalog, and the repair is
reported in :attr:`Store.repairs`. Readers never write; only the process holding
the write lock saves.
"""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from mmsearch.catalog import (Catalog, EmptyCatalogError, bad_embeddings, bad_texts,
                              forget_embeddings, forget_texts, fs_hint, vector_sizes)
from mmsearch.errors import (CorruptIndexError, EmptyIndexError, IndexLockedError,
                             IndexNotFoundError, StorageError, TrainingError)
from mmsearch.models import ModelIdentity
from mmsearch.vectors import VectorIndex, factory_string, train_size

Kind = Literal["images", "texts"]
KINDS: tuple[Kind, ...] = ("images", "texts")
CATALOG = "catalog.sqlite"
LOCK = "write.lock"
FULL_CRC_LIMIT = 1 << 30   # files up to 1 GiB are checksummed whole (~0.3 s/GiB), larger ones
CRC_EDGE = 64 << 20        # by their size and first and last 64 MiB
CHECK_SAMPLE = 50_000      # vectors compared with the catalog by `check`
REBUILD_CHUNK = 65_536     # vectors read from the catalog at a time when rebuilding (128 MiB at 512-d)


@dataclass
class Store:
    """An open index folder. Use :meth:`open`; close with :meth:`close`."""

    root: Path
    catalog: Catalog
    repairs: list[str] = field(default_factory=list)
    #: (key, text) pairs whose damaged vectors :meth:`repair` dropped; the caller embeds them again
    texts_to_embed: list[tuple[str, str]] = field(default_factory=list)
    _vectors: dict[str, VectorIndex] = field(default_factory=dict)
    _lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path, *, create: bool) -> "Store":
        """Open an index folder; ``create`` makes it (a writer), otherwise it must exist.

        Raises :class:`IndexNotFoundError` (no such index), :class:`EmptyIndexError`
        (created but nothing committed yet), :class:`CorruptIndexError` (damaged
        catalog) or :class:`StorageError` (cannot read or create it).
        """
        path = root / CATALOG
        if not path.is_file():
            if not create:
                raise IndexNotFoundError(
                    f"no index {root.name!r} in {root.parent} (run `mmsearch index FOLDER` first)")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {root}: {exc.strerror or exc}") from exc
        try:
            catalog = Catalog(path, create=create, require_schema=not create)
        except EmptyCatalogError:
            if any((root / f"{kind}.faiss").is_file() for kind in KINDS):
                # vector files are only written once the catalog holds a schema
                raise CorruptIndexError(
                    f"catalog {path} is empty but vector files exist: the catalog was lost; "
                    f"delete {root} and run `mmsearch index` again") from None
            if lock_holder(root) is not None:
                raise EmptyIndexError(f"index {root.name!r} is being created by another "
                                      "process and holds nothing yet; try again shortly") from None
            raise EmptyIndexError(f"index {root.name!r} holds nothing yet (its first run was "
                                  "interrupted): run `mmsearch index FOLDER`") from None
        return cls(root, catalog)

    def close(self) -> None:
        self.unlock()
        self.catalog.close()

    # -- identity ------------------------------------------------------------
    @property
    def model(self) -> ModelIdentity | None:
        """The model the index was built with; None until one is recorded with its dimension."""
        raw = self.catalog.get_meta("model")
        if not raw or self.dim is None:
            return None
        try:
            return ModelIdentity.from_json(raw)
        except (ValueError, TypeError) as exc:
            raise CorruptIndexError(f"catalog {self.catalog.path}: the model record is "
                                    f"unreadable ({exc})") from None

    @property
    def dim(self) -> int | None:
        raw = self.catalog.get_meta("dim")
        if not raw:
            return None
        if not raw.isdigit() or int(raw) < 1:
            raise CorruptIndexError(f"catalog {self.catalog.path}: invalid dimension {raw!r}")
        return int(raw)

    def set_model(self, identity: ModelIdentity, dim: int) -> None:
        self.catalog.set_metas({"model": identity.to_json(), "dim": str(dim)})  # both or neither
        self._vectors.clear()  # any index opened before had no dimension to go by

    @property
    def requested_type(self) -> str:
        """The image index type asked for (``auto`` unless a run said otherwise)."""
        return self.catalog.get_meta("index_type") or "auto"

    def retype(self, requested: str | None = None) -> None:
        """Record ``requested`` (if given) and rebuild the image index if its type should change."""
        if requested is not None:
            self.catalog.set_meta("index_type", requested)
        n, dim = self.catalog.image_count(), self.dim
        if dim is None:
            return
        wanted = factory_string(self.requested_type, n, dim)
        built_for = self.catalog.get_meta("images_index_asked") or self.catalog.get_meta("images_index")
        if wanted != (built_for or "Flat"):
            self.rebuild("images", note=False)

    # -- the writer lock ---------------------------------------------------------
    def lock(self, timeout: float = 0.0) -> None:
        """Take the write lock, waiting up to ``timeout`` seconds, or raise :class:`IndexLockedError`.

        The lock is an ``flock`` on ``write.lock``: the OS drops it when its
        holder dies, however it dies, so a killed run never leaves a stale lock
        (the pid written in the file is for messages only). Temporary files
        left by a killed save are removed once the lock is held.
        """
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot write to {self.root}: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                pid = _read_pid(fd)
                os.close(fd)
                who = f" (pid {pid})" if pid else ""
                raise IndexLockedError(
                    f"index {self.root.name!r} is being written by another process{who}; "
                    "wait for it to finish (queries keep working meanwhile)") from None
            except OSError as exc:
                os.close(fd)
                raise StorageError(f"cannot lock {self.root / LOCK}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational; a full disk must not stop us from locking
        self._lock_fd = fd
        self._remove_temp_files()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def writing(self) -> bool:
        return self._lock_fd is not None

    def _temp_files(self) -> list[Path]:
        return [p for kind in KINDS for p in self.root.glob(f"{kind}.faiss.*.tmp")]

    def _remove_temp_files(self) -> None:
        for path in self._temp_files():
            try:
                path.unlink()
            except OSError:
                pass

    # -- vectors ------------------------------------------------------------------
    def vectors(self, kind: Kind) -> VectorIndex:
        """The FAISS index of ``kind``, loaded once and checked against the catalog."""
        if kind not in self._vectors:
            self._vectors[kind] = self._load_synced(kind)
        return self._vectors[kind]

    def _path(self, kind: Kind) -> Path:
        return self.root / f"{kind}.faiss"

    def _catalog_ids(self, kind: Kind) -> np.ndarray:
        return self.catalog.all_image_ids() if kind == "images" else self.catalog.all_text_ids()

    def _catalog_vectors(self, kind: Kind, ids: np.ndarray | None = None):
        dim = self.dim or 0
        if kind == "images":
            return self.catalog.image_vectors(dim, ids)
        return self.catalog.text_vectors(dim, ids)

    def _read_file(self, kind: Kind) -> tuple[VectorIndex | None, np.ndarray, str | None]:
        """(the FAISS file of ``kind`` if it can be trusted, else None; its ids; why not)."""
        path = self._path(kind)
        none = np.zeros(0, np.int64)
        if not path.is_file():
            return None, none, None
        recorded = self.catalog.get_meta(f"{kind}_file")
        if recorded is not None and recorded != _fingerprint(path):
            return None, none, (f"{path.name} is not the file last saved (damaged, or "
                                "replaced while being read)")
        try:
            index = VectorIndex.load(path, mmap=True)  # pages are read when searched, not at open
        except CorruptIndexError as exc:
            return None, none, str(exc)
        except MemoryError:  # a damaged size field: FAISS asked for absurd amounts of memory
            return None, none, f"vector file {path} is unreadable: damaged sizes"
        dim = self.dim
        if dim is not None and index.dim != dim:
            return None, none, f"{path.name} has dimension {index.dim}, the catalog {dim}"
        have = index.ids()
        if have.size != index.ntotal or not _all_distinct(have):
            return None, none, f"{path.name} has duplicated or inconsistent ids"
        return index, have, None

    def _load_synced(self, kind: Kind) -> VectorIndex:
        index, have, problem = self._read_file(kind)
        if problem:
            self.repairs.append(f"{problem}; rebuilt from the catalog")
        if index is None:
            return self.rebuild(kind, note=not problem and self._catalog_ids(kind).size > 0)
        return self._sync(kind, index, have)

    def _sync(self, kind: Kind, index: VectorIndex, have: np.ndarray) -> VectorIndex:
        """Bring ``index`` (holding ids ``have``) in line with the catalog's ids (ids never
        change vector)."""
        if _summary(have) == self.catalog.id_summary(kind):
            return index  # ids are unique on both sides and never reused: the same set
        want = self._catalog_ids(kind)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if not extra.size and not missing.size:
            return index
        self.repairs.append(f"{kind}.faiss was behind the catalog (+{missing.size} "
                            f"-{extra.size} vectors); brought up to date")
        if extra.size and not index.remove(extra):
            return self.rebuild(kind, note=False)
        index.add(*self._catalog_vectors(kind, missing))
        if self.writing:
            self._save_index(kind, index)
        return index

    def rebuild(self, kind: Kind, *, note: bool = True, index_type: str | None = None) -> VectorIndex:
        """A fresh FAISS index from the catalog's vectors (trained if approximate), saved if writing.

        Vectors are read and added a chunk at a time and an approximate index is trained
        on a random sample, so memory holds the index being built, not the collection twice.
        """
        wanted = index_type or (self.requested_type if kind == "images" else "flat")
        ids = self._catalog_ids(kind)
        dim = self.dim or self._stored_dim() or 1
        asked = factory_string(wanted, len(ids), dim)
        try:
            index = VectorIndex.create(dim, wanted, expected=len(ids),
                                       train=self._training_sample(kind, ids, wanted, dim))
        except TrainingError:
            if ids.size >= 10_000:
                raise
            wanted = "flat"  # too few vectors to train an approximate index: exact is fast here
            index = VectorIndex.create(dim, wanted)
        for chunk_ids, vecs in self.catalog.vector_chunks(kind, dim, REBUILD_CHUNK):
            index.add(chunk_ids, vecs)
        if note and ids.size:
            self.repairs.append(f"{kind}.faiss rebuilt from {ids.size} stored vectors")
        self._vectors[kind] = index
        if self.writing:
            self._save_index(kind, index,
                             {f"{kind}_index": factory_string(wanted, len(ids), dim),
                              f"{kind}_index_asked": asked})
        return index

    def _training_sample(self, kind: Kind, ids: np.ndarray, wanted: str,
                         dim: int) -> np.ndarray | None:
        """Vectors to train ``wanted`` on: a random sample of ``ids`` (None for exact types)."""
        if not ids.size or not VectorIndex.needs_training(wanted, len(ids), dim):
            return None
        size = train_size(len(ids), wanted, dim)
        chosen = ids if size >= ids.size else np.random.default_rng(0).choice(ids, size, replace=False)
        return self._catalog_vectors(kind, chosen)[1]

    def save(self, kind: Kind) -> None:
        if kind in self._vectors:
            self._save_index(kind, self._vectors[kind])

    def _save_index(self, kind: Kind, index: VectorIndex, meta: dict[str, str] | None = None) -> None:
        """Replace the file atomically, then record its checksum (with ``meta``) in the catalog."""
        if not self.writing:
            raise StorageError(f"{self.root.name}: saving {kind}.faiss needs the write lock")
        path = self._path(kind)
        try:
            index.save(path)
            fingerprint = _fingerprint(path)
        except (OSError, StorageError) as exc:  # VectorIndex.save lets mkstemp's OSError out
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            hint = fs_hint(path)
            if hint or "No space left" in detail:
                detail = (hint or " (the disk is full)").strip(" ()")
            elif isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot write {path}: {detail}") from exc
        self.catalog.set_metas({f"{kind}_file": fingerprint, **(meta or {})})

    # -- integrity ----------------------------------------------------------------
    def check(self) -> list[str]:
        """Problems found between catalog, FAISS files and disk; nothing is changed."""
        problems = self.catalog.integrity_problems()
        if problems:
            return problems
        try:
            model, dim = self.model, self.dim
        except CorruptIndexError as exc:
            return [str(exc)]
        if model is None or dim is None:
            has_rows = self.catalog.image_count() or self.catalog.text_count()
            return ["catalog has images but no model"] if has_rows else []
        stored_dim = self._stored_dim()
        if stored_dim is not None and stored_dim != dim:
            return [f"the catalog records dimension {dim} but all its vectors have {stored_dim}"]
        bad = bad_embeddings(self.catalog, dim)
        if bad:
            problems.append(f"{len(bad)} stored vectors are damaged")
        damaged_texts = bad_texts(self.catalog, dim)
        if damaged_texts:
            problems.append(f"{len(damaged_texts)} stored text vectors are damaged")
        dangling = self.catalog.dangling_images()
        if dangling:
            problems.append(f"{len(dangling)} images have no stored vector")
        if not bad and not damaged_texts:
            for kind in KINDS:
                problems += self._check_vectors(kind, dim)
        gone = sum(1 for _, p in self.catalog.all_image_paths() if not os.path.lexists(p))
        if gone:
            problems.append(f"{gone} indexed files no longer exist on disk")
        temp = self._temp_files()
        if temp and lock_holder(self.root) is None:
            problems.append(f"{len(temp)} temporary files left by an interrupted save")
        return problems

    def _check_vectors(self, kind: Kind, dim: int) -> list[str]:
        path = self._path(kind)
        want = self._catalog_ids(kind)
        if not path.is_file():
            return [f"{path.name} is missing"] if want.size else []
        index, have, problem = self._read_file(kind)
        if index is None:
            return [problem or f"{path.name} is unreadable"]
        missing = np.setdiff1d(want, have).size
        extra = np.setdiff1d(have, want).size
        if missing or extra:
            return [f"{path.name} is behind the catalog: {missing} vectors missing, {extra} "
                    "unknown (an interrupted run; the next `index` or `check --repair` "
                    "brings it up to date)"]
        wrong = self._compare_vectors(kind, index, want)
        if wrong:
            return [f"{path.name}: {wrong} vectors differ from the catalog's"]
        return []

    def _compare_vectors(self, kind: Kind, index: VectorIndex, ids: np.ndarray) -> int:
        """How many of (a sample of) ``ids`` hold another vector in FAISS than in the catalog."""
        if ids.size > CHECK_SAMPLE:
            ids = np.random.default_rng(0).choice(ids, CHECK_SAMPLE, replace=False)
        ids, stored = self._catalog_vectors(kind, ids)
        if not ids.size:
            return 0
        try:  # exact for Flat and HNSW-over-Flat; IVF without a direct map cannot
            held = index._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except (RuntimeError, AttributeError):
            return 0
        tolerance = 1e-5 if "Flat" in index.description and "IVF" not in index.description else 0.5
        return int((np.abs(held - stored).max(axis=1) > tolerance).sum())

    def repair(self) -> list[str]:
        """Fix what :meth:`check` finds; returns paths whose vectors must be embedded again.

        The caller holds the write lock. Damaged vectors are forgotten (their
        files are re-embedded by the caller), rows without a vector likewise,
        FAISS files are rebuilt from the catalog, rows of files gone from disk
        are removed, temporary files left by a killed save are deleted.
        """
        dim = self.dim or 0
        stored_dim = self._stored_dim()
        if stored_dim is not None and stored_dim != dim:  # the vectors agree: the record is wrong
            self.catalog.set_meta("dim", str(stored_dim))
            dim = stored_dim
        redo = forget_embeddings(self.catalog, bad_embeddings(self.catalog, dim))
        damaged_texts = bad_texts(self.catalog, dim)
        forget_texts(self.catalog, damaged_texts)
        self.texts_to_embed = list(damaged_texts.values())
        dangling = self.catalog.dangling_images()
        gone = [i for i, p in self.catalog.all_image_paths() if not os.path.lexists(p)]
        self.catalog.commit_images({}, [], delete_ids=sorted(set(gone) | set(dangling)))
        redo += list(dangling.values())
        self.catalog.drop_orphan_embeddings()
        for kind in KINDS:
            self.rebuild(kind, note=False, index_type=self.catalog.get_meta(f"{kind}_index"))
        self._remove_temp_files()
        return [p for p in redo if os.path.lexists(p)]

    def _stored_dim(self) -> int | None:
        """The dimension every stored vector has, if they all agree (None if none or mixed)."""
        sizes = vector_sizes(self.catalog)
        if len(sizes) == 1:
            size, count = next(iter(sizes.items()))
            if count >= 2 and size and size % 4 == 0:  # one vector alone proves nothing
                return size // 4
        return None

    def files(self) -> Iterator[tuple[str, Path, int]]:
        for name in (CATALOG, "images.faiss", "texts.faiss"):
            path = self.root / name
            if path.is_file():
                yield name, path, path.stat().st_size


def lock_holder(root: Path) -> int | None:
    """The pid (0 if unknown) of the process holding ``root``'s write lock, None if free."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd) or 0
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def _fingerprint(path: Path) -> str:
    """``size:crc32`` of a file (whole up to FULL_CRC_LIMIT, else its size, head and tail)."""
    crc = 0
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= FULL_CRC_LIMIT:
                while chunk := f.read(16 << 20):
                    crc = zlib.crc32(chunk, crc)
            else:
                crc = zlib.crc32(f.read(CRC_EDGE))
                f.seek(size - CRC_EDGE)
                crc = zlib.crc32(f.read(CRC_EDGE), crc)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return f"{size}:{crc:08x}"


def _all_distinct(ids: np.ndarray) -> bool:
    """No id twice (sorting: numpy 2's ``unique`` is ~70x slower on a million ids)."""
    ordered = np.sort(ids)
    return bool((ordered[1:] != ordered[:-1]).all())


def _summary(ids: np.ndarray) -> tuple[int, int, int, int]:
    """(count, min, max, sum) of unique ids, as :meth:`Catalog.id_summary` gives them.

    Ids are never reused and each new one is above all earlier ones, so additions
    the file lacks raise the catalog's max and deletions it lacks change the count;
    the sum guards the rest. Any difference sends :meth:`Store._sync` to the full
    comparison of the id lists.
    """
    if not ids.size:
        return 0, 0, 0, 0
    return int(ids.size), int(ids.min()), int(ids.max()), int(ids.sum())
