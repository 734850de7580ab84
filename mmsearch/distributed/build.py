"""Building a FAISS index on a Ray cluster: train on the driver, add parts in tasks, merge.

The index type is decided as for a local build (the store's plan,
:meth:`~mmsearch.store.Store.image_index_plan`: the automatic choice, a named type or a
factory string) and trained on the driver on the sample a local rebuild draws
(:meth:`~mmsearch.store.Store.training_sample`). The rows are then added in parallel Ray tasks,
a part each, and the parts merged in order (:mod:`mmsearch.store.sharded`): in memory
(``merge_from``), or on disk (``merge_ondisk``) for an IVF index too big for memory.
Adding in parts gives the index a single process builds, so the same search results.

:func:`build_store_index` does this for a store after a distributed run, on the parts its
storage gives (:meth:`~mmsearch.store.storage.VectorSource.parts`): in an index stored in
the catalog, chunks of the catalog's float32 vectors sent from the driver, so the index is
the one a local run builds; in an index stored as shards, each shard's rows, which its
task reads from the npy file itself (the driver sends ids and row numbers only);
:func:`build_from_shards` for clip-retrieval shards (``img_emb/*.npy`` with their
``metadata/*.parquet`` ids) read by the tasks themselves.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from mmsearch.progress import Progress, no_progress
from mmsearch.store import sharded
from mmsearch.store.vectors import IndexPlan, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

CHUNK = 65_536  # catalog vectors per part
IN_FLIGHT = 2   # parts submitted per cluster CPU before the first is merged


def _fill(blob: np.ndarray, part: Any) -> np.ndarray:
    """``blob`` filled with a part of a store's vectors (read here: ``part.read()``)."""
    return sharded.filled(blob, *part.read())


def _fill_shard(blob: np.ndarray, npy: str, metadata: str) -> np.ndarray:
    from mmsearch.distributed.shards import read_vectors

    return sharded.filled(blob, *read_vectors(Path(npy), Path(metadata)))


def _fill_to_file(blob: np.ndarray, npy: str, metadata: str, out: str) -> str:
    return str(sharded.write_part(_fill_shard(blob, npy, metadata), Path(out)))


def store_needs_build(store: "Store", index_type: str | None) -> IndexPlan | None:
    """The plan to build on the cluster, or None: the type is exact or a graph (the store
    builds those), or the index already has it."""
    if not store.dim:
        return None
    plan, built = store.image_index_plan(index_type)
    if not plan.n or not plan.needs_training or not sharded.mergeable(plan.factory) or built:
        return None
    return plan


def build_store_index(store: "Store", index_type: str | None, ray: Callable[[], Any],
                      progress: Progress = no_progress) -> bool:
    """Build the store's image index on the cluster when :func:`store_needs_build` says so,
    and install it; returns whether it did."""
    plan = store_needs_build(store, index_type)
    if plan is None:
        return False
    blob = sharded.trained(plan, store.training_sample(plan), fall_back=True)
    r = ray()
    ref = r.put(blob)
    task = r.remote(num_cpus=1)(_fill)
    total, parts = store.read.image_parts(plan.dim, CHUNK)
    calls = ((task, (ref, part)) for part in parts)  # streamed: read as they are sent
    index = sharded.merged(blob, _in_order(r, calls, total, progress))
    store.install_index(index, plan.factory)
    return True


def _in_order(ray: Any, calls: Iterable[tuple[Any, tuple]], total: int,
              progress: Progress) -> Iterator[Any]:
    """The results of ``task.remote(*args)`` for each call, in order, with at most
    :data:`IN_FLIGHT` per CPU of the cluster submitted and not yet taken."""
    window = max(2, IN_FLIGHT * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque[Any] = deque()
    done = 0
    for task, args in calls:
        pending.append(task.remote(*args))
        if len(pending) >= window:
            done += 1
            yield ray.get(pending.popleft())
            progress("build", done, total)
    while pending:
        done += 1
        yield ray.get(pending.popleft())
        progress("build", done, total)


def build_from_shards(ray: Any, shards: list[tuple[Path, Path]], blob: np.ndarray, *,
                      on_disk: Path | None = None,
                      progress: Progress = no_progress) -> VectorIndex:
    """The trained index ``blob`` (:func:`mmsearch.store.sharded.trained`) filled with
    clip-retrieval shards ((npy, metadata parquet) pairs, read by the tasks), one part per
    shard; ``on_disk``: merge IVF parts into that file (and its ``.ivfdata``) instead of
    memory (the parts are written beside it, then removed)."""
    ref = ray.put(blob)
    if on_disk is None:
        task = ray.remote(num_cpus=1)(_fill_shard)
        calls = ((task, (ref, str(n), str(m))) for n, m in shards)
        return sharded.merged(blob, _in_order(ray, calls, len(shards), progress))
    task = ray.remote(num_cpus=1)(_fill_to_file)
    outs = [task.remote(ref, str(n), str(m), f"{on_disk}.part{k}") for k, (n, m) in enumerate(shards)]
    files = [Path(p) for p in ray.get(outs)]
    try:
        sharded.merged_on_disk(blob, files, on_disk)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    return sharded.load_on_disk(on_disk)
