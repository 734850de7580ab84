"""Near-duplicate photos at the vector level: groups over a collection, and de-duplication of a ranking.

Vectors are float32 and L2-normalised, so cosine similarity is their inner
product; each comes with an int64 id. Two photos are near-duplicates when their
cosine is at least ``threshold`` (:data:`DEFAULT_THRESHOLD` unless told).
Scores are compared with :data:`SCORE_TOLERANCE` of slack, so that identical
vectors (whose float32 inner product can come out as 1 - 6e-8) still count at
``threshold=1.0``.

Pure numpy; the exact FAISS index behind :func:`near_duplicate_groups` comes
from :mod:`mmsearch.store.vectors` (the one module that knows FAISS), imported
when the function runs, so importing this module loads no heavy library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.locations import location
from mmsearch.settings import DEDUP_THRESHOLD

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

# Cosine at or above which two photos count as near-duplicates. A tunable starting
# point, measured on nothing yet: re-encodes, resizes and light crops of one photo
# usually score above it with CLIP, distinct shots of one scene usually below.
DEFAULT_THRESHOLD = DEDUP_THRESHOLD
SCORE_TOLERANCE = 1e-6  # float32 rounding slack on inner products of unit vectors


def _checked(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids as int64, vectors as contiguous float32 2-D), or UsageError with one line."""
    ids, vectors = np.asarray(ids), np.asarray(vectors)
    if ids.ndim != 1 or vectors.ndim != 2 or len(ids) != len(vectors) or not vectors.shape[1]:
        raise UsageError(f"ids and vectors do not agree: ids of shape {ids.shape}, "
                         f"vectors of shape {vectors.shape} (want (n,) and (n, dim), dim >= 1)")
    number = isinstance(threshold, (int, float, np.integer, np.floating)) and not isinstance(threshold, bool)
    if not (number and 0 < threshold <= 1):
        raise UsageError(f"duplicate threshold must be a cosine in (0, 1], not {threshold!r}")
    return ids.astype(np.int64, copy=False), np.ascontiguousarray(vectors, dtype=np.float32)


def near_duplicate_groups(ids: np.ndarray, vectors: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                          neighbours: int = 16, chunk: int = 4096) -> list[list[int]]:
    """Connected components of the graph 'cosine >= threshold' over the k nearest neighbours of each vector.

    Returns groups of 2 or more ids, each group's ids ascending, largest groups
    first, ties broken by the smallest id. An exact inner-product index is searched
    for the ``neighbours`` + 1 nearest of every vector, ``chunk`` queries at a time
    (memory stays bounded for a million vectors); pairs scoring at least
    ``threshold`` (self excluded) are joined with union-find.

    Only the ``neighbours`` nearest of each vector are looked at, so the groups are
    exact connected components of that kNN graph, not of the full threshold graph:
    a dense cluster of more than ``neighbours`` + 1 near-copies is still joined, but
    through chains of overlapping neighbour lists (transitively), and in rare
    geometries such a cluster could come out split.
    """
    ids, vectors = _checked(ids, vectors, threshold)
    if neighbours < 1 or chunk < 1:
        raise UsageError(f"neighbours and chunk must be at least 1, not {neighbours} and {chunk}")
    if not len(ids):
        return []
    from mmsearch.store.vectors import VectorIndex

    index = VectorIndex.create(vectors.shape[1], "flat")  # exact: IndexFlatIP (in an id map)
    rows = np.arange(len(ids), dtype=np.int64)
    index.add(rows, vectors)  # the index's ids are row numbers
    forest = _Forest()
    for start in range(0, len(rows), chunk):
        found = index.search(vectors[start:start + chunk], neighbours + 1)
        mine = rows[start:start + chunk, None]
        hit = (found.ids >= 0) & (found.ids != mine) & (found.scores >= threshold - SCORE_TOLERANCE)
        for a, b in zip(np.broadcast_to(mine, hit.shape)[hit].tolist(), found.ids[hit].tolist()):
            forest.union(a, b)
    groups = [sorted(ids[members].tolist()) for members in forest.components()]
    return sorted(groups, key=lambda group: (-len(group), group[0]))


class _Forest:
    """Union-find over the row numbers met so far (path compression, union by size).

    Dicts rather than arrays: only rows that have a near-duplicate ever enter,
    so memory follows the number of duplicates, not the collection size.
    """

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size.get(a, 1) < self.size.get(b, 1):
            a, b = b, a
        self.parent[b] = a
        self.size[a] = self.size.get(a, 1) + self.size.get(b, 1)

    def components(self) -> list[np.ndarray]:
        """The rows of each component (every row here has at least one partner)."""
        by_root: dict[int, list[int]] = {}
        for x in list(self.parent):
            by_root.setdefault(self.find(x), []).append(x)
        return [np.asarray(members, dtype=np.int64) for members in by_root.values()]


def dedup_ranked(ids: np.ndarray, vectors: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Given ids in rank order and their vectors, a boolean mask keeping an item unless its
    cosine with an already kept, better-ranked item is >= threshold (greedy, in rank order).

    The best-ranked item is always kept. O(n * kept) inner products: meant for
    result lists of up to a few thousand items.
    """
    ids, vectors = _checked(ids, vectors, threshold)
    keep = np.zeros(len(ids), dtype=bool)
    kept = np.empty_like(vectors)
    count = 0
    for i, vector in enumerate(vectors):
        if count and float(np.max(kept[:count] @ vector)) >= threshold - SCORE_TOLERANCE:
            continue
        keep[i] = True
        kept[count] = vector
        count += 1
    return keep


@dataclass(frozen=True)
class DuplicateGroup:
    """Photos that are near-duplicates of each other; ``exact``: they are identical files
    (one content). ``contents`` counts the distinct file contents in the group."""

    ids: list[int]
    paths: list[Path | str]  # URLs stay str
    exact: bool
    contents: int


def find_duplicates(store: "Store", *, threshold: float = DEFAULT_THRESHOLD,
                    neighbours: int = 16) -> list[DuplicateGroup]:
    """Groups of near-duplicate images of the store, largest first.

    Identical files (one content hash) share one vector; the near-duplicate graph
    (:func:`near_duplicate_groups`) is built over distinct contents and each content
    stands for all its files. Every stored vector is held in memory meanwhile.
    """
    ids, vectors = store.image_vectors()
    records = store.image_records(ids)
    files: dict[str, list[int]] = {}
    for i in ids:
        files.setdefault(records[int(i)]["content_hash"], []).append(int(i))
    first = np.searchsorted(ids, [members[0] for members in files.values()])
    grouped = near_duplicate_groups(ids[first], vectors[first], threshold=threshold,
                                    neighbours=neighbours)
    content = {members[0]: members for members in files.values()}
    groups = [sorted(i for rep in g for i in content[rep]) for g in grouped]
    near = {i for g in groups for i in g}
    groups += [m for m in files.values() if len(m) > 1 and m[0] not in near]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return [_group(g, records) for g in groups]


def _group(ids: list[int], records: dict[int, dict]) -> DuplicateGroup:
    contents = len({records[i]["content_hash"] for i in ids})
    return DuplicateGroup(ids, [location(records[i]["path"]) for i in ids], contents == 1, contents)
