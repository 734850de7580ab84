"""The vector index: the one module that knows FAISS.

Every index is an ``IndexIDMap2`` over some FAISS index with inner-product
metric, so ids are the catalog's row ids and scores are cosine similarities of
L2-normalised vectors. The stored index is always a CPU index; when FAISS sees
a GPU, searches run on a GPU copy of it (a transform of the CPU index, as in
``faiss.contrib``), and the CPU one stays the thing written to disk.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.errors import CorruptIndexError, StorageError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import faiss

EXACT_LIMIT = 250_000   # beyond this many vectors "auto" picks an approximate index
NAMED_TYPES = ("flat", "hnsw", "ivf", "ivfpq")


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, best first; -inf where fewer than k exist
    ids: np.ndarray     # (nq, k) int64; -1 where fewer than k exist


def factory_string(index_type: str, n: int, dim: int) -> str:
    """The FAISS factory string (without the IDMap2 prefix) for a named type or a raw string."""
    kind = index_type.lower()
    if kind == "auto":
        kind = "flat" if n <= EXACT_LIMIT else ("ivfpq" if n * dim * 4 > 8 << 30 else "hnsw")
    nlist = max(1, min(65536, int(4 * np.sqrt(max(n, 1))), n // 39))
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        return f"IVF{nlist},PQ{_pq_m(dim)}"
    return index_type.removeprefix("IDMap2,").removeprefix("IDMap,")


def _pq_m(dim: int) -> int:
    for m in (dim // 8, dim // 4, dim // 2, dim):
        if m and dim % m == 0 and m <= 96:
            return m
    return dim


def _faiss():
    import faiss

    return faiss


class VectorIndex:
    """A FAISS index of (id, vector) pairs with inner-product search."""

    def __init__(self, index: "faiss.Index", description: str) -> None:
        self._index = index
        self.description = description
        self._gpu: Any = None

    # -- construction ----------------------------------------------------------
    @classmethod
    def create(cls, dim: int, index_type: str = "flat", *, expected: int = 0,
               train: np.ndarray | None = None) -> "VectorIndex":
        """An empty index; approximate types are trained on ``train`` (needed for IVF/PQ)."""
        faiss = _faiss()
        desc = factory_string(index_type, max(expected, 0 if train is None else len(train)), dim)
        try:
            inner = faiss.index_factory(dim, desc, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise UsageError(f"invalid index type {index_type!r}: {_first_line(exc)}") from exc
        if not inner.is_trained:
            if train is None or len(train) < 1:
                raise UsageError(f"index type {desc} needs training vectors")
            try:
                inner.train(np.ascontiguousarray(train, dtype=np.float32))
            except RuntimeError as exc:
                raise UsageError(f"index type {desc} cannot be trained on {len(train)} vectors: "
                                 f"{_first_line(exc)}") from exc
        return cls(faiss.IndexIDMap2(inner), desc)

    @classmethod
    def load(cls, path: Path, *, mmap: bool = False) -> "VectorIndex":
        faiss = _faiss()
        try:
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise CorruptIndexError(f"vector file {path} is unreadable: {_first_line(exc)}") from exc
        if not isinstance(index, faiss.IndexIDMap2):
            raise CorruptIndexError(f"vector file {path} is not an mmsearch index")
        inner = faiss.downcast_index(index.index)
        return cls(index, type(inner).__name__)

    def save(self, path: Path) -> None:
        """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
        faiss = _faiss()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self._index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (RuntimeError, OSError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {_first_line(exc)}") from exc

    # -- contents --------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_exact(self) -> bool:
        return self.description in ("Flat", "IndexFlatIP", "IndexFlat")

    def ids(self) -> np.ndarray:
        return _faiss().vector_to_array(self._index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                     np.ascontiguousarray(ids, dtype=np.int64))
            self._gpu = None

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; False when this index type cannot remove (the caller rebuilds)."""
        if not len(ids):
            return True
        faiss = _faiss()
        try:
            self._index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        except RuntimeError:
            return False
        self._gpu = None
        return True

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) reconstructed from the index (exact only for Flat)."""
        ids = self.ids()
        vecs = np.vstack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else \
            np.zeros((0, self.dim), np.float32)
        return ids, vecs

    # -- search ------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, subset: np.ndarray | None = None,
               effort: int | None = None) -> SearchResult:
        """Top-``k`` by inner product; ``subset`` restricts to those ids."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.ntotal)
        if k <= 0:
            empty = np.zeros((len(queries), 0))
            return SearchResult(empty.astype(np.float32), empty.astype(np.int64))
        params = self._params(subset, effort)
        if params is None and self._gpu_index() is not None:
            scores, ids = self._gpu_search(queries, k)
        else:
            scores, ids = self._index.search(queries, k, params=params)
        return SearchResult(np.where(ids < 0, -np.inf, scores).astype(np.float32), ids)

    def _params(self, subset: np.ndarray | None, effort: int | None) -> Any:
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index)
        sel = None if subset is None else faiss.IDSelectorBatch(np.ascontiguousarray(subset, np.int64))
        if isinstance(inner, faiss.IndexIVF):
            nprobe = effort or min(inner.nlist, max(16, inner.nlist // 16))
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=effort or 128)
        return None if sel is None else faiss.SearchParameters(sel=sel)

    def _gpu_index(self) -> Any:
        faiss = _faiss()
        if self._gpu is None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:
                res = faiss.StandardGpuResources()
                self._gpu = (res, faiss.index_cpu_to_gpu(res, 0, self._index.index))
            except RuntimeError:
                self._gpu = False  # this index type has no GPU version: stay on the CPU
        return self._gpu or None

    def _gpu_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, gpu = self._gpu
        scores, pos = gpu.search(queries, k)
        id_map = self.ids()
        return scores, np.where(pos >= 0, id_map[np.clip(pos, 0, None)], -1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    for line in text:
        if "Error" in line or "error" in line:
            return line.strip()
    return text[-1].strip() if text else type(exc).__name__
