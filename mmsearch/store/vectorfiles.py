"""The FAISS files of an index folder, kept in agreement with the catalog.

``images.faiss`` and ``texts.faiss`` are caches of the vectors the catalog
stores. A file is only ever replaced atomically and is never ahead of the
catalog it was saved from; after each save its size and CRC-32 are recorded in
the catalog, and a file that does not match (damaged, or replaced while we
looked) is never trusted. Ids are never reused and never change vector, so
bringing a stale file up to date is a matter of ids. Everything here runs for
:class:`~mmsearch.store.Store`; only a store holding the write lock saves.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from mmsearch.errors import CorruptIndexError, StorageError
from mmsearch.store.catalog import Catalog
from mmsearch.store.sqlite import fs_hint
from mmsearch.store.lock import WriteLock
from mmsearch.store.vectors import IndexPlan, VectorIndex, plan_index

Kind = Literal["images", "texts"]
KINDS: tuple[Kind, ...] = ("images", "texts")
FULL_CRC_LIMIT = 1 << 30   # files up to 1 GiB are checksummed whole (~0.3 s/GiB), larger ones
CRC_EDGE = 64 << 20        # by their size and first and last 64 MiB
REBUILD_CHUNK = 65_536     # vectors read from the catalog at a time when rebuilding (128 MiB at 512-d)


class VectorFiles:
    """The loaded FAISS index of each kind, checked against the catalog when first used."""

    def __init__(self, root: Path, catalog: Catalog, lock: WriteLock,
                 dim: Callable[[], int | None], repairs: list[str], gpu: int | None) -> None:
        self.root, self.catalog, self.lock = root, catalog, lock
        self._dim, self.repairs, self.gpu = dim, repairs, gpu
        self._loaded: dict[str, VectorIndex] = {}

    def get(self, kind: Kind) -> VectorIndex:
        """The index of ``kind``, loaded once (memory-mapped) and synced with the catalog."""
        if kind not in self._loaded:
            self._loaded[kind] = self._load_synced(kind)
        return self._loaded[kind]

    def forget_loaded(self) -> None:
        """Drop the loaded indexes: the next :meth:`get` reads the files again."""
        self._loaded.clear()

    def path(self, kind: Kind) -> Path:
        return self.root / f"{kind}.faiss"

    def catalog_ids(self, kind: Kind) -> np.ndarray:
        return self.catalog.all_image_ids() if kind == "images" else self.catalog.all_text_ids()

    def catalog_vectors(self, kind: Kind, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        dim = self._dim() or 0
        if kind == "images":
            return self.catalog.image_vectors(dim, ids)
        return self.catalog.text_vectors(dim, ids)

    # -- reading and syncing ----------------------------------------------------------
    def read_file(self, kind: Kind) -> tuple[VectorIndex | None, np.ndarray, str | None]:
        """(the FAISS file of ``kind`` if it can be trusted, else None; its ids; why not)."""
        path, none = self.path(kind), np.zeros(0, np.int64)
        if not path.is_file():
            return None, none, None
        recorded = self.catalog.get_meta(f"{kind}_file")
        if recorded is not None and recorded != fingerprint(path):
            return None, none, (f"{path.name} is not the file last saved (damaged, or "
                                "replaced while being read)")
        try:
            index = VectorIndex.load(path, mmap=True)  # pages are read when searched, not at open
        except CorruptIndexError as exc:
            return None, none, str(exc)
        except MemoryError:  # a damaged size field: FAISS asked for absurd amounts of memory
            return None, none, f"vector file {path} is unreadable: damaged sizes"
        dim = self._dim()
        if dim is not None and index.dim != dim:
            return None, none, f"{path.name} has dimension {index.dim}, the catalog {dim}"
        have = index.ids()
        if have.size != index.ntotal or not _all_distinct(have):
            return None, none, f"{path.name} has duplicated or inconsistent ids"
        index.gpu = self.gpu
        return index, have, None

    def _load_synced(self, kind: Kind) -> VectorIndex:
        index, have, problem = self.read_file(kind)
        if problem:
            self.repairs.append(f"{problem}; rebuilt from the catalog")
        if index is None:
            return self.rebuild(kind, note=not problem and self.catalog_ids(kind).size > 0)
        return self._sync(kind, index, have)

    def _sync(self, kind: Kind, index: VectorIndex, have: np.ndarray) -> VectorIndex:
        """Bring ``index`` (holding ids ``have``) in line with the catalog's ids."""
        if _summary(have) == self.catalog.id_summary(kind):
            return index  # ids are unique on both sides and never reused: the same set
        want = self.catalog_ids(kind)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if not extra.size and not missing.size:
            return index
        self.repairs.append(f"{kind}.faiss was behind the catalog (+{missing.size} "
                            f"-{extra.size} vectors); brought up to date")
        if extra.size and not index.remove(extra):
            return self.rebuild(kind, note=False)
        index.add(*self.catalog_vectors(kind, missing))
        if self.lock.held:
            self.save(kind, index)
        return index

    # -- building ---------------------------------------------------------------------
    def plan(self, kind: Kind, index_type: str | None = None) -> IndexPlan:
        """The plan of ``kind`` for the catalog's current size (texts are always exact)."""
        wanted = index_type or (self.requested_type if kind == "images" else "flat")
        n = self.catalog.id_summary(kind)[0]
        return plan_index(wanted, n, self._dim() or self.stored_dim() or 1)

    def is_built(self, kind: Kind, plan: IndexPlan) -> bool:
        """Whether the index of ``kind`` as last built is ``plan``'s: built for its factory
        (one built as Flat because the type could not be trained on so few counts as such)."""
        built = self.catalog.get_meta(f"{kind}_index_asked") or self.catalog.get_meta(f"{kind}_index")
        return (built or "Flat") == plan.factory

    @property
    def requested_type(self) -> str:
        return self.catalog.get_meta("index_type") or "auto"

    def build(self, kind: Kind, index_type: str | None = None) -> VectorIndex:
        """A fresh index of the catalog's vectors, in memory only (trained if approximate).

        Vectors are read and added a chunk at a time and an approximate index is trained
        on a random sample, so memory holds the index being built, not the collection twice.
        """
        plan = self.plan(kind, index_type)
        index = VectorIndex.from_plan(plan, self.training_sample(kind, plan), fall_back=True)
        for chunk_ids, vecs in self.catalog.vector_chunks(kind, plan.dim, REBUILD_CHUNK):
            index.add(chunk_ids, vecs)
        index.gpu = self.gpu
        return index

    def install(self, kind: Kind, index: VectorIndex, meta: dict[str, str]) -> VectorIndex:
        """Serve and save ``index``, built elsewhere from the catalog's vectors (a sharded
        build): rows it lacks or should not have are synced first."""
        index.gpu = self.gpu
        index = self._sync(kind, index, index.ids())
        self._loaded[kind] = index
        self.save(kind, index, meta)
        return index

    def catch_up(self, kind: Kind) -> None:
        """Read the file of ``kind`` again, bring it in line with the catalog after writes
        that skipped it on purpose (no repair is noted), and save it."""
        before = len(self.repairs)
        self._loaded.pop(kind, None)
        self.get(kind)
        del self.repairs[before:]
        self.flush(kind)

    def rebuild(self, kind: Kind, *, note: bool = True, index_type: str | None = None) -> VectorIndex:
        """:meth:`build`, kept as the loaded index of ``kind`` and saved (when writing)."""
        plan = self.plan(kind, index_type)
        index = self.build(kind, index_type)
        if note and plan.n:
            self.repairs.append(f"{kind}.faiss rebuilt from {plan.n} stored vectors")
        self._loaded[kind] = index
        if self.lock.held:
            self.save(kind, index, {f"{kind}_index": index.description,
                                    f"{kind}_index_asked": plan.factory})
        return index

    def training_sample(self, kind: Kind, plan: IndexPlan) -> np.ndarray | None:
        """Vectors to train ``plan`` on: a random sample of the catalog's (None for exact types)."""
        if not plan.n or not plan.needs_training:
            return None
        ids = self.catalog_ids(kind)
        size = plan.train_size
        chosen = ids if size >= ids.size else np.random.default_rng(0).choice(ids, size, replace=False)
        return self.catalog_vectors(kind, chosen)[1]

    def stored_dim(self) -> int | None:
        """The dimension every stored vector has, if they all agree (None if none or mixed)."""
        sizes = self.catalog.vector_sizes()
        if len(sizes) == 1:
            size, count = next(iter(sizes.items()))
            if count >= 2 and size and size % 4 == 0:  # one vector alone proves nothing
                return size // 4
        return None

    # -- saving -----------------------------------------------------------------------
    def flush(self, kind: Kind) -> None:
        """Save the loaded index of ``kind`` (nothing when it was never loaded)."""
        if kind in self._loaded:
            self.save(kind, self._loaded[kind])

    def save(self, kind: Kind, index: VectorIndex, meta: dict[str, str] | None = None) -> None:
        """Replace the file atomically, then record its checksum (with ``meta``) in the catalog."""
        if not self.lock.held:
            raise StorageError(f"{self.root.name}: saving {kind}.faiss needs the write lock")
        path = self.path(kind)
        try:
            index.save(path)
            stamp = fingerprint(path)
        except (OSError, StorageError) as exc:  # VectorIndex.save lets mkstemp's OSError out
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            hint = fs_hint(path)
            if hint or "No space left" in detail:
                detail = (hint or " (the disk is full)").strip(" ()")
            elif isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot write {path}: {detail}") from exc
        self.catalog.set_metas({f"{kind}_file": stamp, **(meta or {})})

    def temp_files(self) -> list[Path]:
        return [p for kind in KINDS for p in self.root.glob(f"{kind}.faiss.*.tmp")]

    def remove_temp_files(self) -> None:
        for path in self.temp_files():
            try:
                path.unlink()
            except OSError:
                pass


def fingerprint(path: Path) -> str:
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
    the sum guards the rest. Any difference sends :meth:`VectorFiles._sync` to the
    full comparison of the id lists.
    """
    if not ids.size:
        return 0, 0, 0, 0
    return int(ids.size), int(ids.min()), int(ids.max()), int(ids.sum())
