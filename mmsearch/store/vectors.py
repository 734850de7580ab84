"""The vector index: the one module that knows FAISS.

Ids are the catalog's row ids and scores are cosine similarities of
L2-normalised vectors (inner-product metric). Exact and graph indexes are an
``IndexIDMap2`` over the FAISS index; IVF indexes keep the catalog ids in their
inverted lists themselves (no id map: a 10M-vector IVF opens in milliseconds
instead of rebuilding a 10M-entry hash table, and uses ~60 bytes less per vector).

The type is picked from the collection size (:func:`auto_type`): exact search
while one query scans at most :data:`EXACT_FLOATS` floats, then an HNSW graph
over the float32 vectors while they fit in :data:`FLOAT_BYTES`, then IVF over
8-bit scalar-quantised codes, then IVF over 4-bit product-quantised codes.

FAISS graphs cannot forget a vector, so removing from an HNSW index marks its id
dead in the id map (-1) and searches skip it; past :data:`MAX_DEAD_FRACTION`
dead vectors ``remove`` returns False and the caller rebuilds.

Files can be opened memory-mapped (:meth:`VectorIndex.load` with ``mmap=True``):
the vectors, graph and inverted lists stay in the page cache instead of being
copied, so a big index opens in milliseconds. A mapped index is read-only to
FAISS; the first ``add``/``remove`` quietly reads it into memory first.

The stored index is always a CPU index; when FAISS sees a GPU and the device
allows it (:attr:`VectorIndex.gpu`, set from ``--device``), searches run on a
GPU copy of it, and the CPU one stays the thing written to disk.

:func:`plan_index` is where the type of an index is decided (the automatic
choice, its FAISS factory string, training size, the fallback to exact search).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.errors import CorruptIndexError, StorageError, TrainingError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import faiss

# -- automatic choice (see benchmarks/results/index_scale_*.txt for the measurements) --
EXACT_FLOATS = 1 << 25          # exact search while n*dim <= 32 Mi floats: a 128 MiB scan, ~8-15 ms
EXACT_LIMIT = EXACT_FLOATS // 512   # = 65_536 vectors at dim 512 (131_072 at dim 256)
FLOAT_BYTES = 4 << 30           # HNSW over float32 vectors while they take up to 4 GiB (2M at 512)
SQ8_BYTES = 16 << 30            # IVF over 8-bit codes up to 16 GiB of them (32M at dim 512)
HNSW_QUANTIZER_NLIST = 2048     # from this many lists the coarse quantizer is an HNSW graph
NAMED_TYPES = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")

# -- default search effort ----------------------------------------------------------------
HNSW_EF_SEARCH = 128            # efSearch of "hnsw" up to HNSW_EF_LARGE_N vectors
HNSW_EF_SEARCH_LARGE = 192      # ... and beyond
HNSW_EF_LARGE_N = 1_000_000
IVF_NPROBE_FRACTION = 32        # nprobe = nlist / this, clamped to [IVF_NPROBE_MIN, IVF_NPROBE_MAX]
IVF_NPROBE_MIN = 16
IVF_NPROBE_MAX = 512
REFINE_K_FACTOR = 4             # a ",Refine(...)" index re-ranks this many times k candidates
MIN_POINTS_PER_CENTROID = 5     # k-means on fewer training points per list than this warns
TRAIN_POINTS_PER_LIST = 8       # training sample: max(100k, this * nlist) vectors
FLAT_FALLBACK_MAX = 10_000     # below this many vectors, a type that cannot be trained becomes Flat
MAX_DEAD_FRACTION = 0.2         # HNSW: beyond this share of removed vectors, remove() asks for a rebuild


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (nq, k) float32, best first; -inf where fewer than k exist
    ids: np.ndarray     # (nq, k) int64; -1 where fewer than k exist


def auto_type(n: int, dim: int) -> str:
    """The named type ``"auto"`` resolves to for ``n`` vectors of dimension ``dim``.

    Exact while one query scans at most EXACT_FLOATS floats; then an HNSW graph
    over the float32 vectors (at 1M x 512: recall@10 0.97 at ~200x the exact QPS,
    against ~20x for IVF at the same recall) while they take at most FLOAT_BYTES;
    then IVF over 8-bit codes (10M x 512 in ~5.3 GB); then IVF over 4-bit PQ codes.
    """
    if n * dim <= EXACT_FLOATS:
        return "flat"
    if n * dim * 4 <= FLOAT_BYTES:
        return "hnsw"
    if n * dim <= SQ8_BYTES:
        return "ivfsq"
    return "ivfpq"


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near 4 sqrt(n), >= 39 vectors per list.

    Powers of two, so that the factory string (and with it the store's decision to
    rebuild, ``Store.retype``) changes only when the collection grows or shrinks ~4x,
    not on every run that adds a photo.
    """
    n = max(n, 1)
    near = 2 ** round(math.log2(4 * math.sqrt(n)))
    most = 2 ** int(math.log2(n // 39)) if n >= 39 else 1
    return int(max(1, min(65536, near, most)))


@dataclass(frozen=True)
class IndexPlan:
    """How the index of ``n`` vectors of dimension ``dim`` is built: decided here, once.

    ``requested`` is what was asked (``auto``, a named type or a FAISS factory
    string); ``factory`` the FAISS factory string it comes to for this size.
    """

    requested: str
    factory: str
    n: int
    dim: int

    @property
    def train_size(self) -> int:
        """How many vectors to train on: all up to 100k, else TRAIN_POINTS_PER_LIST per list.

        k-means costs train_size * nlist * dim per iteration, so more points per list
        would make a 10M-vector build spend most of an hour training on 2 cores.
        """
        nlist = _nlist_of(self.factory)
        most = max(100_000, TRAIN_POINTS_PER_LIST * nlist) if nlist else 100_000
        return min(self.n, most)

    @functools.cached_property
    def needs_training(self) -> bool:
        """Whether FAISS must train this index (IVF, PQ, SQ) before vectors go in."""
        return not self.empty_faiss_index().is_trained

    def empty_faiss_index(self) -> Any:
        faiss = _faiss()
        try:
            return faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise UsageError(f"invalid index type {self.requested!r}: {faiss_error_line(exc)}") from exc

    @property
    def is_exact(self) -> bool:
        """Whether the plan is exact search (``Flat``)."""
        return self.factory == "Flat"

    @property
    def flat(self) -> "IndexPlan":
        """Exact search: what is built when this type cannot be trained on few vectors."""
        return IndexPlan("flat", "Flat", self.n, self.dim)

    @property
    def may_fall_back(self) -> bool:
        """Below FLAT_FALLBACK_MAX vectors an untrainable type becomes Flat (exact is fast there)."""
        return self.n < FLAT_FALLBACK_MAX


def plan_index(index_type: str, n: int, dim: int) -> IndexPlan:
    """The :class:`IndexPlan` for ``index_type`` (``auto``, a named type or a factory string)."""
    return IndexPlan(index_type, _factory(index_type, n, dim), n, dim)


def train_size(n: int, index_type: str = "auto", dim: int = 512) -> int:
    """How many of ``n`` vectors to train ``index_type`` on (:attr:`IndexPlan.train_size`)."""
    return plan_index(index_type, n, dim).train_size


def factory_string(index_type: str, n: int, dim: int) -> str:
    """The FAISS factory string for ``index_type`` at ``n`` vectors (:attr:`IndexPlan.factory`)."""
    return plan_index(index_type, n, dim).factory


def _factory(index_type: str, n: int, dim: int) -> str:
    """The FAISS factory string (without any IDMap prefix) for a named type or a raw string."""
    kind = index_type.lower()
    if kind == "auto":
        kind = auto_type(n, dim)
    nlist = nlist_for(n)
    ivf = f"IVF{nlist}" + ("_HNSW32" if nlist >= HNSW_QUANTIZER_NLIST else "")
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32,Flat"
    if kind == "ivf":
        return f"{ivf},Flat"
    if kind == "ivfsq":
        return f"{ivf},SQ8"
    if kind == "ivfpq":
        return f"{ivf},PQ{_pq_m(dim)}x4fs"
    return index_type.removeprefix("IDMap2,").removeprefix("IDMap,")


def default_effort(index: "faiss.Index") -> int | None:
    """nprobe (IVF) or efSearch (HNSW) used when a search does not give ``effort``."""
    faiss = _faiss()
    inner = _base(index)
    if isinstance(inner, faiss.IndexIVF):
        return min(inner.nlist, max(IVF_NPROBE_MIN, min(IVF_NPROBE_MAX, inner.nlist // IVF_NPROBE_FRACTION)))
    if isinstance(inner, faiss.IndexHNSW):
        return HNSW_EF_SEARCH if inner.ntotal <= HNSW_EF_LARGE_N else HNSW_EF_SEARCH_LARGE
    return None


def _nlist_of(desc: str) -> int:
    head = desc.split(",")[0]
    if not head.startswith("IVF"):
        return 0
    digits = "".join(c for c in head[3:].split("_")[0] if c.isdigit())
    return int(digits) if digits else 0


def _pq_m(dim: int) -> int:
    """Sub-quantisers of 4 bits for ``dim``: dim/4 of them (dim/8 bytes per vector)."""
    for m in (dim // 4, dim // 2, dim // 8, dim):
        if m and dim % m == 0 and m % 2 == 0:
            return m
    return dim


def _faiss():
    import faiss

    return faiss


@contextlib.contextmanager
def _omp_threads(n: int | None) -> Iterator[None]:
    """FAISS's OpenMP threads at ``n`` in this thread for the block (None: as they are).

    One query is searched by one thread whatever the count (graphs and inverted lists split
    the queries, Flat scans with min(queries, threads)), but the id map's translation of its k
    labels is a parallel region over every thread: with other work on the cores, waking and
    waiting for the second of 2 costs 4-16 ms, against 0.6 ms for the whole 100k HNSW search.
    """
    if n is None:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)  # OpenMP keeps the setting per calling thread
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _base(index: Any) -> Any:
    """The searched FAISS index inside our wrappers (IDMap2, Refine), downcast."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index


def describe_index(index: Any) -> str:
    """A factory string for a loaded index (its class name where FAISS cannot say)."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    try:
        from faiss.contrib.factory_tools import reverse_index_factory

        desc = reverse_index_factory(inner)
    except Exception:  # noqa: BLE001 - a type the reverse factory does not know
        return type(inner).__name__
    return "HNSW32,Flat" if desc == "HNSW32" else desc


def _trained(plan: IndexPlan, train: np.ndarray | None) -> Any:
    """The FAISS index of ``plan``, trained on ``train`` if it needs it, wrapped with our ids."""
    faiss = _faiss()
    inner = plan.empty_faiss_index()
    base = _base(inner)
    if isinstance(base, faiss.IndexIVF):
        base.cp.min_points_per_centroid = MIN_POINTS_PER_CENTROID
        base.cp.spherical = True  # unit vectors: centroids stay on the sphere
    if not inner.is_trained:
        _train(inner, base, plan.factory, train)
    # index_factory and read_index return owning, already downcast objects: keep those
    # (a second downcast_index would be a non-owning view of something freed with them).
    return inner if isinstance(inner, faiss.IndexIVF) else faiss.IndexIDMap2(inner)


def _train(inner: Any, base: Any, desc: str, train: np.ndarray | None) -> None:
    if train is None or len(train) < 1:
        raise TrainingError(f"index type {desc} needs training vectors")
    pq = getattr(base, "pq", None)
    if pq is not None and len(train) < 39 * (1 << pq.nbits):
        raise TrainingError(f"index type {desc} needs at least {39 * (1 << pq.nbits)} "
                            f"training vectors for its PQ codebooks, not {len(train)}")
    try:
        inner.train(np.ascontiguousarray(train, dtype=np.float32))
    except RuntimeError as exc:
        raise TrainingError(f"index type {desc} cannot be trained on {len(train)} vectors: "
                            f"{faiss_error_line(exc)}") from exc


class VectorIndex:
    """A FAISS index of (id, vector) pairs with inner-product search.

    ``gpu`` says where searches may run: None on the CPU only, N on GPU N when
    FAISS has GPU support and sees it, -1 (the default) on GPU 0 when there is one.
    """

    def __init__(self, index: "faiss.Index", description: str, *,
                 mapped_from: tuple[Path, os.stat_result] | None = None) -> None:
        self._index = index
        self.description = description
        self._gpu: Any = None
        self.gpu: int | None = -1
        self._mapped_from = mapped_from  # (path, its stat) while the index is a read-only mapping
        self._dead = self._count_dead()  # removed from an HNSW graph: id -1 in the id map

    def _count_dead(self) -> int:
        if not isinstance(self._index, _faiss().IndexIDMap) or self._index.ntotal == 0:
            return 0
        return int((_faiss().vector_to_array(self._index.id_map) < 0).sum())

    # -- construction ----------------------------------------------------------
    @classmethod
    def create(cls, dim: int, index_type: str = "flat", *, expected: int = 0,
               train: np.ndarray | None = None) -> "VectorIndex":
        """An empty index; approximate types are trained on ``train`` (needed for IVF/PQ)."""
        n = max(expected, 0 if train is None else len(train))
        return cls.from_plan(plan_index(index_type, n, dim), train)

    @classmethod
    def from_plan(cls, plan: IndexPlan, train: np.ndarray | None = None, *,
                  fall_back: bool = False) -> "VectorIndex":
        """An empty index as ``plan`` says, trained on ``train`` when it needs training.

        ``fall_back``: when the plan's type cannot be trained on ``train`` and the
        plan allows it (:attr:`IndexPlan.may_fall_back`), build exact search instead.
        """
        try:
            return cls(_trained(plan, train), plan.factory)
        except TrainingError:
            if not (fall_back and plan.may_fall_back):
                raise
            return cls(_trained(plan.flat, None), "Flat")

    @classmethod
    def load(cls, path: Path, *, mmap: bool = False) -> "VectorIndex":
        """Read ``path``; ``mmap`` maps the vectors instead of copying them (read-only until changed).

        Every type FAISS 1.15 writes can be read mapped (``IO_FLAG_MMAP_IFC``: flat
        codes, HNSW graphs and array inverted lists become views of the file); a
        type that cannot be is read normally instead.
        """
        faiss = _faiss()
        index, mapped = None, None
        if mmap:
            try:
                stat = os.stat(path)
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
                mapped = (Path(path), stat)
            except (RuntimeError, OSError):
                index = None  # fall back to a normal read, which says what is wrong
        if index is None:
            try:
                index = faiss.read_index(str(path))
            except (RuntimeError, MemoryError) as exc:  # a damaged size field asks for terabytes
                raise CorruptIndexError(f"vector file {path} is unreadable: {faiss_error_line(exc)}") from exc
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)):
            raise CorruptIndexError(f"vector file {path} is not an mmsearch index")
        return cls(index, describe_index(index), mapped_from=mapped)

    def save(self, path: Path) -> None:
        """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
        faiss = _faiss()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            os.close(fd)
            faiss.write_index(self._index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except (RuntimeError, OSError) as exc:
            raise StorageError(f"cannot write {path}: {faiss_error_line(exc)}") from exc
        finally:  # also on Ctrl-C: never leave a half-written temporary file behind
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    @property
    def mapped(self) -> bool:
        """True while the vectors are a read-only memory map of the file."""
        return self._mapped_from is not None

    def _writable(self) -> None:
        """Turn a mapped index into an ordinary in-memory one before FAISS changes it.

        (Changing a mapped FAISS index aborts the process.) The file is read again
        when it is still the one mapped, else the mapped index is copied through
        FAISS's serialiser.
        """
        if self._mapped_from is None:
            return
        faiss = _faiss()
        path, stat = self._mapped_from
        try:
            now = os.stat(path)
            same = (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size,
                                                                  stat.st_mtime_ns)
        except OSError:
            same = False
        index = None
        if same:
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:
                index = None
        if index is None:
            index = faiss.deserialize_index(faiss.serialize_index(self._index))
        self._index = index
        self._mapped_from = None
        self._gpu = None
        self._dead = self._count_dead()

    # -- contents --------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        """Vectors held (removed ones not counted)."""
        return int(self._index.ntotal) - self._dead

    @property
    def is_exact(self) -> bool:
        return self.description in ("Flat", "IndexFlatIP", "IndexFlat")

    @property
    def is_compressed(self) -> bool:
        """True when the index keeps lossy codes (SQ, PQ) instead of the vectors, with no
        refine stage of its own: its scores are approximate."""
        desc = self.description.upper().replace(" ", "")
        if "RFLAT" in desc or "REFINE" in desc:
            return False
        return any(part.startswith(("PQ", "SQ", "OPQ")) for part in desc.split(","))

    @property
    def _has_id_map(self) -> bool:
        return isinstance(self._index, _faiss().IndexIDMap)

    def ids(self) -> np.ndarray:
        faiss = _faiss()
        if self._has_id_map:
            ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            return ids[ids >= 0] if self._dead else ids
        invlists = self._index.invlists
        parts = []
        for lst in range(self._index.nlist):
            size = invlists.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._writable()
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                     np.ascontiguousarray(ids, dtype=np.int64))
            self._gpu = None

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; False when this index type cannot remove (the caller rebuilds)."""
        if not len(ids):
            return True
        faiss = _faiss()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if isinstance(_base(self._index), faiss.IndexHNSW):
            return self._remove_from_graph(ids)
        self._writable()
        try:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            return False
        self._gpu = None
        return True

    def _remove_from_graph(self, ids: np.ndarray) -> bool:
        """Mark ``ids`` dead in the id map (-1): the graph keeps them as waypoints, searches
        skip them. False (nothing changed) once too many would be dead: rebuild then."""
        faiss = _faiss()
        id_map = faiss.vector_to_array(self._index.id_map)
        gone = np.isin(id_map, ids) & (id_map >= 0)
        if not gone.any():
            return True
        if self._dead + int(gone.sum()) > MAX_DEAD_FRACTION * len(id_map):
            return False
        self._writable()
        id_map[gone] = -1
        faiss.copy_array_to_vector(id_map, self._index.id_map)
        self._index.construct_rev_map()
        self._dead = int((id_map < 0).sum())
        self._gpu = None
        return True

    def reconstruct(self, ids: np.ndarray) -> np.ndarray | None:
        """The vectors held for ``ids`` (exact for Flat and HNSW-over-Flat; None for an IVF
        index, which cannot look vectors up by id without a direct map)."""
        try:
            return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except (RuntimeError, AttributeError):
            return None

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) reconstructed from the index (exact only for Flat)."""
        if not self._has_id_map:
            index = self._index
            ids, vecs = [], []
            for lst in range(index.nlist):
                for offset in range(index.invlists.list_size(lst)):
                    ids.append(index.invlists.get_single_id(lst, offset))
                    out = np.empty(self.dim, np.float32)
                    index.reconstruct_from_offset(lst, offset, _faiss().swig_ptr(out))
                    vecs.append(out)
            return (np.asarray(ids, np.int64),
                    np.vstack(vecs) if vecs else np.zeros((0, self.dim), np.float32))
        ids = self.ids()
        vecs = np.vstack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else \
            np.zeros((0, self.dim), np.float32)
        return ids, vecs

    # -- search ------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, subset: np.ndarray | None = None,
               effort: int | None = None, exclude: np.ndarray | None = None) -> SearchResult:
        """Top-``k`` by inner product; ``subset`` restricts to those ids, ``exclude`` (with
        no ``subset``) leaves those out.

        ``effort`` is nprobe (IVF) or efSearch (HNSW); by default :func:`default_effort`,
        raised in proportion when ``subset`` keeps only a fraction of the index, and by
        what ``exclude`` may hide around the query, so that the search still finds its ``k``.
        """
        if subset is not None and exclude is not None and len(exclude):
            subset = np.setdiff1d(subset, exclude)
            exclude = None
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.ntotal)
        if k <= 0:
            empty = np.zeros((len(queries), 0))
            return SearchResult(empty.astype(np.float32), empty.astype(np.int64))
        params, keep = self._params(subset, effort, k, exclude)
        if params is None and self._gpu_index() is not None:
            scores, ids = self._gpu_search(queries, k)
        else:
            with _omp_threads(1 if len(queries) == 1 else None):
                scores, ids = self._index.search(queries, k, params=params)
        del keep
        return SearchResult(np.where(ids < 0, -np.inf, scores).astype(np.float32), ids)

    def _params(self, subset: np.ndarray | None, effort: int | None, k: int,
                exclude: np.ndarray | None = None) -> tuple[Any, list]:
        """FAISS search parameters and the Python objects they point to (kept alive by the caller)."""
        faiss = _faiss()
        outer = faiss.downcast_index(self._index.index) if self._has_id_map else self._index
        inner = _base(self._index)
        keep: list = []
        sel = None
        hidden = 0 if subset is not None or exclude is None else len(exclude)
        if subset is not None:
            sel, held = _selector(subset)
            keep += [held, sel]
        elif self._dead:  # removed vectors have id -1 in the id map: keep ids >= 0
            sel = faiss.IDSelectorRange(0, np.iinfo(np.int64).max)
            keep.append(sel)
        if hidden:
            out, held = _selector(exclude)
            neg = faiss.IDSelectorNot(out)
            sel = neg if sel is None else faiss.IDSelectorAnd(sel, neg)
            keep += [held, out, neg, sel]
        scale = 1.0 if subset is None else self.ntotal / max(len(subset), 1)
        params = None
        if isinstance(inner, faiss.IndexIVF):
            nprobe = effort or default_effort(inner)
            per_list = max(self.ntotal / max(inner.nlist, 1), 1.0)  # what a list holds
            nprobe = int(min(inner.nlist, math.ceil(nprobe * scale + hidden / per_list)))
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            quantizer = faiss.downcast_index(inner.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                qp = faiss.SearchParametersHNSW()
                qp.efSearch = max(64, 2 * nprobe)
                params.quantizer_params = qp
                keep.append(qp)
        elif isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()
            # (+ what ``exclude`` hides: a walk that meets only excluded nodes near the
            # query needs that much room to get past them; see test_vectors)
            params.efSearch = int(min(1 << 16, max(k, math.ceil((effort or default_effort(inner))
                                                                * scale) + hidden)))
        if params is not None and sel is not None:
            params.sel = sel
        if isinstance(outer, faiss.IndexRefine):
            refine = faiss.IndexRefineSearchParameters()
            refine.k_factor = float(max(outer.k_factor, REFINE_K_FACTOR))
            if params is None and sel is not None:
                params = faiss.SearchParameters()
                params.sel = sel
            if params is not None:
                refine.base_index_params = params
                keep.append(params)
            if sel is not None:
                refine.sel = sel
            params = refine
        if params is None and sel is not None:
            params = faiss.SearchParameters()
            params.sel = sel
        keep.append(params)
        return params, keep

    def _gpu_index(self) -> Any:
        faiss = _faiss()
        device = 0 if self.gpu == -1 else self.gpu
        if (self._gpu is None and device is not None and hasattr(faiss, "StandardGpuResources")
                and faiss.get_num_gpus() > device):
            try:
                res = faiss.StandardGpuResources()
                cpu = self._index.index if self._has_id_map else self._index
                self._gpu = (res, faiss.index_cpu_to_gpu(res, device, cpu))
            except RuntimeError:
                self._gpu = False  # this index type has no GPU version: stay on the CPU
        elif self._gpu is None and device is not None and self.is_exact:
            self._gpu = self._torch_exact()  # FAISS without GPUs: torch's matmul + top-k
        return self._gpu or None

    def _torch_exact(self) -> Any:
        """(None, :class:`~mmsearch.store.torchexact.TorchExact`) on the GPU for this exact index;
        None: decide at the next search; False: search on the CPU."""
        from mmsearch.store import torchexact as torch_search

        self._searches = getattr(self, "_searches", 0) + 1
        if torch_search.too_soon(self.gpu, self._searches - 1):
            return None
        device = torch_search.cuda_device(self.gpu)
        flat = _faiss().downcast_index(self._index.index) if self._has_id_map else None
        if device is None or not isinstance(flat, _faiss().IndexFlat) or \
                not torch_search.fits(flat.ntotal, flat.d, device):
            return False  # (decided: FAISS on the CPU until the index changes)
        n, dim = flat.ntotal, flat.d
        vectors = _faiss().rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)  # a view
        return None, torch_search.TorchExact(self.ids(), vectors, device, owner=self._index)

    def _gpu_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        _, gpu = self._gpu
        scores, pos = gpu.search(queries, k)
        if not self._has_id_map or getattr(gpu, "returns_ids", False):
            return scores, pos  # IVF lists hold the catalog ids themselves (torch's: ids too)
        id_map = self.ids()
        return scores, np.where(pos >= 0, id_map[np.clip(pos, 0, None)], -1)


BITMAP_MIN = 4096  # subsets this large are given to FAISS as a bitmap over ids, not a hash set


def _selector(subset: np.ndarray) -> tuple[Any, np.ndarray]:
    """A FAISS IDSelector for ``subset`` (and the array it points into, to keep alive).

    A large subset becomes a bitmap over the ids (one bit per id up to the largest:
    built by numpy in a few ms for a million ids, where a hash set of them takes
    tens of ms); a small one a batch (a hash set plus a Bloom filter).
    """
    faiss = _faiss()
    subset = np.ascontiguousarray(subset, np.int64)
    if len(subset) < BITMAP_MIN or subset.min() < 0:
        return faiss.IDSelectorBatch(subset), subset
    mask = np.zeros(int(subset.max()) + 1, dtype=bool)
    mask[subset] = True
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits


def faiss_error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    for line in text:
        if "Error" in line or "error" in line:
            return line.strip()
    return text[-1].strip() if text else type(exc).__name__
