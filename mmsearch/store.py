"""One index on disk: a folder with the SQLite catalog and two FAISS files.

``<home>/<name>/catalog.sqlite``  source of truth: rows, vectors, model identity
``<home>/<name>/images.faiss``    derived: image vectors, ids = images.id
``<home>/<name>/texts.faiss``     derived: text vectors, ids = texts.id
``<home>/<name>/write.lock``      held (flock) by the one process writing

On open, each FAISS file is checked against the catalog (ids, dimension); a
file that is stale (a run was killed before saving it), damaged or missing is
brought back in line from the vectors the catalog stores, and the repair is
reported in :attr:`Store.repairs`. Readers never write; the writer saves the
FAISS file atomically after committing the catalog.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from mmsearch.catalog import Catalog, bad_embeddings, forget_embeddings
from mmsearch.errors import (CorruptIndexError, IndexLockedError, IndexNotFoundError,
                             StorageError, UsageError)
from mmsearch.models import ModelIdentity
from mmsearch.vectors import VectorIndex, factory_string

Kind = Literal["images", "texts"]
CATALOG = "catalog.sqlite"


@dataclass
class Store:
    """An open index folder. Use :meth:`open`; close with :meth:`close`."""

    root: Path
    catalog: Catalog
    repairs: list[str] = field(default_factory=list)
    _vectors: dict[str, VectorIndex] = field(default_factory=dict)
    _lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path, *, create: bool) -> "Store":
        if not (root / CATALOG).is_file():
            if not create:
                raise IndexNotFoundError(
                    f"no index {root.name!r} in {root.parent} (run `mmsearch index FOLDER` first)")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {root}: {exc.strerror}") from exc
        return cls(root, Catalog(root / CATALOG, create=create))

    def close(self) -> None:
        self.unlock()
        self.catalog.close()

    # -- identity ------------------------------------------------------------
    @property
    def model(self) -> ModelIdentity | None:
        raw = self.catalog.get_meta("model")
        return ModelIdentity.from_json(raw) if raw else None

    @property
    def dim(self) -> int | None:
        raw = self.catalog.get_meta("dim")
        return int(raw) if raw else None

    def set_model(self, identity: ModelIdentity, dim: int) -> None:
        self.catalog.set_meta("model", identity.to_json())
        self.catalog.set_meta("dim", str(dim))
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
        if wanted != (self.catalog.get_meta("images_index") or "Flat"):
            self.rebuild("images", note=False)

    # -- the writer lock ---------------------------------------------------------
    def lock(self) -> None:
        """Take the write lock or raise :class:`IndexLockedError`; released by the OS if we die."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / "write.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"index {self.root.name!r} is being written by another process; "
                "wait for it to finish (queries keep working meanwhile)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def writing(self) -> bool:
        return self._lock_fd is not None

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

    def _load_synced(self, kind: Kind) -> VectorIndex:
        path, dim = self._path(kind), self.dim
        index: VectorIndex | None = None
        if path.is_file():
            try:
                index = VectorIndex.load(path)
            except CorruptIndexError as exc:
                self.repairs.append(f"{exc}; rebuilt from the catalog")
            else:
                if dim is not None and index.dim != dim:
                    self.repairs.append(f"{path.name} has dimension {index.dim}, catalog {dim}; rebuilt")
                    index = None
        if index is None:
            return self.rebuild(kind, note=not path.is_file() and self._catalog_ids(kind).size > 0)
        self._sync(kind, index)
        return index

    def _sync(self, kind: Kind, index: VectorIndex) -> None:
        have, want = index.ids(), self._catalog_ids(kind)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if not extra.size and not missing.size:
            return
        self.repairs.append(f"{kind}.faiss was behind the catalog (+{missing.size} "
                            f"-{extra.size} vectors); brought up to date")
        if extra.size and not index.remove(extra):
            self._vectors[kind] = self.rebuild(kind)
            return
        index.add(*self._catalog_vectors(kind, missing))
        if self.writing:
            index.save(self._path(kind))

    def rebuild(self, kind: Kind, *, note: bool = True, index_type: str | None = None) -> VectorIndex:
        """A fresh FAISS index from the catalog's vectors (trained if approximate), saved if writing."""
        ids, vecs = self._catalog_vectors(kind)
        wanted = index_type or (self.requested_type if kind == "images" else "flat")
        dim = self.dim or (vecs.shape[1] if vecs.size else 1)
        try:
            index = VectorIndex.create(dim, wanted, expected=len(ids), train=_sample(vecs))
        except UsageError:
            if ids.size >= 10_000:
                raise
            wanted = "flat"  # too few vectors to train an approximate index: exact is fast here
            index = VectorIndex.create(dim, wanted)
        index.add(ids, vecs)
        if note and ids.size:
            self.repairs.append(f"{kind}.faiss rebuilt from {ids.size} stored vectors")
        self._vectors[kind] = index
        if self.writing:
            index.save(self._path(kind))
            self.catalog.set_meta(f"{kind}_index", factory_string(wanted, len(ids), dim))
        return index

    def save(self, kind: Kind) -> None:
        if kind in self._vectors:
            self._vectors[kind].save(self._path(kind))

    def check(self) -> list[str]:
        """Problems found between catalog, FAISS files and disk; nothing is changed."""
        problems = self.catalog.integrity_problems()
        if problems:
            return problems
        dim = self.dim
        if self.model is None or dim is None:
            return [] if self.catalog.image_count() == 0 else ["catalog has images but no model"]
        bad = bad_embeddings(self.catalog, dim)
        if bad:
            problems.append(f"{len(bad)} stored vectors are damaged")
        for kind in ("images", "texts"):
            problems += self._check_vectors(kind, dim)
        gone = sum(1 for _, p in self.catalog.all_image_paths() if not os.path.lexists(p))
        if gone:
            problems.append(f"{gone} indexed files no longer exist on disk")
        return problems

    def _check_vectors(self, kind: Kind, dim: int) -> list[str]:
        path = self._path(kind)
        want = self._catalog_ids(kind)
        if not path.is_file():
            return [f"{path.name} is missing"] if want.size else []
        try:
            index = VectorIndex.load(path)
        except CorruptIndexError as exc:
            return [str(exc)]
        if index.dim != dim:
            return [f"{path.name} has dimension {index.dim}, the model {dim}"]
        have = index.ids()
        missing = np.setdiff1d(want, have).size
        extra = np.setdiff1d(have, want).size
        dupes = have.size - np.unique(have).size
        if missing or extra or dupes:
            return [f"{path.name}: {missing} vectors missing, {extra} unknown, {dupes} duplicated"]
        return []

    def repair(self) -> list[str]:
        """Fix what :meth:`check` finds; returns paths whose vectors must be embedded again.

        The caller holds the write lock. Damaged vectors are forgotten (their
        files are re-embedded by the caller), FAISS files are rebuilt from the
        catalog, rows of files gone from disk are removed.
        """
        dim = self.dim or 0
        redo = forget_embeddings(self.catalog, bad_embeddings(self.catalog, dim))
        gone = [i for i, p in self.catalog.all_image_paths() if not os.path.lexists(p)]
        self.catalog.commit_images({}, [], delete_ids=gone)
        self.catalog.drop_orphan_embeddings()
        for kind in ("images", "texts"):
            self.rebuild(kind, note=False, index_type=self.catalog.get_meta(f"{kind}_index"))
        return [p for p in redo if os.path.lexists(p)]

    def files(self) -> Iterator[tuple[str, Path, int]]:
        for name in (CATALOG, "images.faiss", "texts.faiss"):
            path = self.root / name
            if path.is_file():
                yield name, path, path.stat().st_size


def _sample(vecs: np.ndarray, limit: int = 100_000) -> np.ndarray | None:
    if not vecs.size:
        return None
    if len(vecs) <= limit:
        return vecs
    rng = np.random.default_rng(0)
    return vecs[rng.choice(len(vecs), limit, replace=False)]
