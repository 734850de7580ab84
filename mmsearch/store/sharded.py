"""A FAISS index built in parts: trained once, filled part by part (anywhere), merged.

The FAISS half of a distributed build (:mod:`mmsearch.distributed.build` runs the
parts as Ray tasks). A trained, empty index is serialised and sent to every part;
each part adds its (id, vector) rows and is serialised back; the parts are merged
into the trained index with FAISS's ``merge_from`` (in memory), or, for IVF types
too big for memory, with ``faiss.contrib.ondisk.merge_ondisk`` into one file of
inverted lists beside the index. Adding the same rows in parts or all at once gives
the same index (the same codes in the same lists), so the same search results.

An index merged on disk is read with :func:`load_on_disk` (a plain read: FAISS 1.15
maps its inverted lists itself; reading it with ``IO_FLAG_MMAP`` crashes on search,
and with ``IO_FLAG_MMAP_IFC`` its lists are misread), so it is not served as a
store's ``images.faiss``, which is always opened mapped.

HNSW graphs cannot be merged: :func:`mergeable` says so, and callers build them in
one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mmsearch.errors import StorageError, UsageError
from mmsearch.store.vectors import IndexPlan, VectorIndex, describe_index, faiss_error_line

Blob = np.ndarray  # a serialised FAISS index (uint8)


def _faiss() -> Any:
    import faiss

    return faiss


def serialize(index: VectorIndex) -> Blob:
    return _faiss().serialize_index(index._index)


def deserialize(blob: Blob) -> VectorIndex:
    faiss = _faiss()
    index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
    return VectorIndex(index, describe_index(index))


def mergeable(factory: str) -> bool:
    """Whether an index of this factory string can be built in parts (not an HNSW graph)."""
    return not factory.upper().startswith("HNSW") and ",HNSW" not in factory.upper()


def trained(plan: IndexPlan, sample: np.ndarray | None, *, fall_back: bool = False) -> Blob:
    """The empty index of ``plan``, trained on ``sample`` when it needs training, serialised
    (``fall_back``: exact search when it cannot be trained, as :meth:`VectorIndex.from_plan`)."""
    if not mergeable(plan.factory):
        raise UsageError(f"index type {plan.factory} cannot be built in parts (an HNSW graph "
                         "does not merge): build it in one process")
    return serialize(VectorIndex.from_plan(plan, sample, fall_back=fall_back))


def filled(blob: Blob, ids: np.ndarray, vectors: np.ndarray) -> Blob:
    """A copy of the trained index ``blob`` holding these rows, serialised."""
    index = deserialize(blob)
    index.add(np.asarray(ids, np.int64), np.asarray(vectors, np.float32))
    return serialize(index)


def merged(blob: Blob, parts: Iterable[Blob]) -> VectorIndex:
    """The trained index ``blob`` with every part's rows moved in (``merge_from``)."""
    index = deserialize(blob)
    for part in parts:
        other = deserialize(part)
        try:
            index._index.merge_from(other._index, 0)
        except RuntimeError as exc:
            raise UsageError(f"cannot merge index parts: {faiss_error_line(exc)}") from exc
    return index


def write_part(blob: Blob, path: Path) -> Path:
    """Write one filled part to ``path`` (for :func:`merged_on_disk`); returns the path."""
    faiss = _faiss()
    try:
        faiss.write_index(faiss.deserialize_index(np.asarray(blob, dtype=np.uint8)), str(path))
    except RuntimeError as exc:
        raise StorageError(f"cannot write {path}: {faiss_error_line(exc)}") from exc
    return path


def merged_on_disk(blob: Blob, parts: list[Path], index_path: Path) -> Path:
    """Merge IVF parts written by :func:`write_part` into ``index_path`` and its inverted
    lists ``index_path`` + ``.ivfdata`` without holding them in memory; returns the path."""
    faiss = _faiss()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        raise UsageError("only IVF indexes can be merged on disk")
    try:
        merge_ondisk(index, [str(p) for p in parts], str(index_path) + ".ivfdata")
        faiss.write_index(index, str(index_path))
    except RuntimeError as exc:
        raise StorageError(f"cannot merge on disk into {index_path}: {faiss_error_line(exc)}") from exc
    return index_path


def load_on_disk(index_path: Path) -> VectorIndex:
    """An index merged by :func:`merged_on_disk` (its lists stay in the ``.ivfdata`` file)."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise StorageError(f"cannot read {index_path}: {faiss_error_line(exc)}") from exc
    return VectorIndex(index, describe_index(index))
