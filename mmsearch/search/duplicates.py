"""Near-duplicates at the vector level: groups over a collection, and de-duplication of a ranking.

Vectors are float32 and L2-normalised, so cosine similarity is their inner
product; each comes with an int64 id. Two photos are near-duplicates when their
cosine is at least ``threshold`` (:data:`DEFAULT_THRESHOLD` unless told).
Scores are compared with :data:`SCORE_TOLERANCE` of slack, so that identical
vectors (whose float32 inner product can come out as 1 - 6e-8) still count at
``threshold=1.0``.

A video is one item with many vectors, its frames: :func:`near_duplicate_groups`
takes vectors that share an id as one item, never joins an item's vectors with
each other, and joins two items when any vector of one reaches ``threshold``
with any vector of the other. So a video's neighbouring frames (alike by nature)
are no group, a photo exported from a video groups with the video, and two
encodings of one video group together. :func:`find_duplicates` builds the items
of a store and says which moment of a video matched best.

Pure numpy; the exact FAISS index behind :func:`near_duplicate_groups` comes
from :mod:`mmsearch.store.vectors` (the one module that knows FAISS), imported
when the function runs, so importing this module loads no heavy library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.locations import location
from mmsearch.settings import DEDUP_THRESHOLD

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store
    from mmsearch.store.vectors import SearchResult, VectorIndex

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

    Vectors that share an id are one item (a video's frames): they are never
    joined with each other, and an item joins another when any of its vectors
    joins one of the other's. Each vector still looks at the ``neighbours``
    nearest vectors of *other* items: one whose list its own item's vectors
    crowd (fewer than ``neighbours`` of other items, the last one still at
    ``threshold``) is searched again for 4 times as many, and so on up to
    ``neighbours`` + its item's size (fewer queries at a time then: at most
    ``chunk`` * (``neighbours`` + 1) results). With distinct ids nothing is
    searched again and the graph is the one above.

    Only the ``neighbours`` nearest of each vector are looked at, so the groups are
    exact connected components of that kNN graph, not of the full threshold graph:
    a dense cluster of more than ``neighbours`` + 1 near-copies is still joined, but
    through chains of overlapping neighbour lists (transitively), and in rare
    geometries such a cluster could come out split.
    """
    return near_duplicates(ids, vectors, threshold=threshold, neighbours=neighbours,
                           chunk=chunk).groups


@dataclass(frozen=True)
class NearDuplicates:
    """:func:`near_duplicate_groups`, and ``best``: per vector (in the order given), its
    highest cosine with a vector of another item where that reaches the threshold, -inf
    elsewhere (exact: such a nearest vector is always among those searched)."""

    groups: list[list[int]]
    best: np.ndarray  # (n,) float32


def near_duplicates(ids: np.ndarray, vectors: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                    neighbours: int = 16, chunk: int = 4096) -> NearDuplicates:
    """The groups of :func:`near_duplicate_groups` and each vector's best match (:class:`NearDuplicates`)."""
    ids, vectors = _checked(ids, vectors, threshold)
    if neighbours < 1 or chunk < 1:
        raise UsageError(f"neighbours and chunk must be at least 1, not {neighbours} and {chunk}")
    best = np.full(len(ids), -np.inf, dtype=np.float32)
    if not len(ids):
        return NearDuplicates([], best)
    from mmsearch.store.vectors import VectorIndex

    items, item = np.unique(ids, return_inverse=True)
    index = VectorIndex.create(vectors.shape[1], "flat")  # exact: IndexFlatIP (in an id map)
    index.add(np.arange(len(ids), dtype=np.int64), vectors)  # the index's ids are row numbers
    forest = _Forest()  # over item numbers (positions in ``items``)
    for rows, found, other in _neighbour_lists(index, vectors, item, threshold, neighbours, chunk):
        hit = other & (found.scores >= threshold - SCORE_TOLERANCE)
        at = np.arange(len(rows)), np.argmax(hit, axis=1)  # the first hit: lists are best first
        seen = hit[at]
        best[rows[seen]] = np.maximum(best[rows[seen]], found.scores[at][seen])
        mine = np.broadcast_to(item[rows, None], hit.shape)
        for a, b in zip(mine[hit].tolist(), item[found.ids[hit]].tolist()):
            forest.union(a, b)
    groups = [sorted(items[members].tolist()) for members in forest.components()]
    return NearDuplicates(sorted(groups, key=lambda group: (-len(group), group[0])), best)


def _neighbour_lists(index: "VectorIndex", vectors: np.ndarray, item: np.ndarray, threshold: float,
                     neighbours: int, chunk: int) -> Iterator[tuple[np.ndarray, "SearchResult", np.ndarray]]:
    """(rows, what the index found for them, which of it is another item's), a batch at a
    time, until each row's list holds its ``neighbours`` nearest of other items or all
    those at ``threshold`` (see :func:`near_duplicate_groups`); a row may come more than once."""
    n, sizes = len(item), np.bincount(item)
    rows, k = np.arange(n), min(n, neighbours + 1)
    while len(rows):
        crowded = []
        step = max(1, min(chunk, chunk * (neighbours + 1) // k))
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            found = index.search(vectors[batch], k)
            other = (found.ids >= 0) & (item[np.maximum(found.ids, 0)] != item[batch, None])
            yield batch, found, other
            crowded.append(batch[(other.sum(axis=1) < neighbours)
                                 & (found.scores[:, -1] >= threshold - SCORE_TOLERANCE)])
        rows = np.concatenate(crowded)
        if k >= n or not len(rows):
            return
        # (a crowded row's item has more than k - neighbours vectors: k grows)
        k = min(n, 4 * k, neighbours + int(sizes[item[rows]].max()))


class _Forest:
    """Union-find over the item numbers met so far (path compression, union by size).

    Dicts rather than arrays: only items that have a near-duplicate ever enter,
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
        """The items of each component (every item here has at least one partner)."""
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
class DuplicateMember:
    """One file of a group: a photo (``kind`` "image"), or a video ("video") and ``time``,
    the moment of it that matched best (seconds; None in a group of identical copies, where
    every moment matches). ``id`` is the photo's image id, or the image id of the video's
    frame at ``time`` (its first frame when ``time`` is None), which ``id:N`` queries take."""

    id: int
    path: Path | str  # URLs stay str; a video's own path, not a moment's
    kind: str = "image"
    time: float | None = None


@dataclass(frozen=True)
class DuplicateGroup:
    """Photos and videos that are near-duplicates of each other, each file once (see
    :func:`find_duplicates`); ``exact``: they are identical files (one content).
    ``contents`` counts the distinct file contents in the group."""

    members: list[DuplicateMember]
    exact: bool
    contents: int

    __json_extra__ = ("ids", "paths")

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self.members]

    @property
    def paths(self) -> list[Path | str]:
        return [m.path for m in self.members]


def find_duplicates(store: "Store", *, threshold: float = DEFAULT_THRESHOLD,
                    neighbours: int = 16) -> list[DuplicateGroup]:
    """Groups of near-duplicate photos and videos of the store, largest first (ties: the
    smallest member id first; members in id order).

    What is compared are items: a photo's content (its identical files share one vector)
    or a video's content (its identical files; their frames are its vectors). Two items
    are joined as :func:`near_duplicate_groups` joins them: when some vector of one has
    a cosine of at least ``threshold`` with some vector of the other; two frames of one
    video never join anything. A group lists each file once, a video with the time of
    its frame that best matches a vector of another item (:attr:`NearDuplicates.best`).
    Identical files that match nothing else are a group of their own (``exact``).
    Every stored vector is held in memory meanwhile.
    """
    ids, vectors = store.image_vectors()
    items = _Items(store, ids)
    found = near_duplicates(items.owners, vectors[np.searchsorted(ids, items.vectors)],
                            threshold=threshold, neighbours=neighbours)
    groups = [items.group(g, found.best) for g in found.groups]
    near = {item for g in found.groups for item in g}
    groups += [items.group([item], None) for item, files in items.files.items()
               if len(files) > 1 and item not in near]
    return sorted(groups, key=lambda g: (-len(g.members), g.members[0].id))


class _Items:
    """A store's images as the items :func:`find_duplicates` compares, each named by the
    image id of its first vector: ``vectors`` (one image id per distinct content hash,
    ascending; a frame's hash is its video's with its time) and ``owners`` (their items);
    ``files``: item -> its photos' image ids, or its videos' ids."""

    def __init__(self, store: "Store", ids: np.ndarray) -> None:
        self.records = records = store.image_records(ids)
        self.videos = store.read.videos_by_id({r["video_id"] for r in records.values()
                                               if r["video_id"] is not None})
        self.frames: dict[int, list[int]] = {}  # video id -> its frames' image ids
        contents: dict[str, list[int]] = {}  # content hash -> image ids
        for i in ids.tolist():
            contents.setdefault(records[i]["content_hash"], []).append(i)
            if records[i]["video_id"] is not None:
                self.frames.setdefault(records[i]["video_id"], []).append(i)
        self.vectors = np.asarray([files[0] for files in contents.values()], dtype=np.int64)
        keys = [self._key(files[0]) for files in contents.values()]
        names: dict[tuple[str, str], int] = {}
        self.owners = np.asarray([names.setdefault(key, files[0]) for key, files
                                  in zip(keys, contents.values())], dtype=np.int64)
        self.files: dict[int, list[int]] = {}
        self.rows: dict[int, list[int]] = {}  # a video's item -> positions of its vectors
        for row, (key, item, files) in enumerate(zip(keys, self.owners.tolist(), contents.values())):
            if key[0] == "image":
                self.files[item] = files
            else:
                self.rows.setdefault(item, []).append(row)
                videos = {records[i]["video_id"] for i in files}  # (identical copies: several)
                self.files[item] = sorted(videos.union(self.files.get(item, ())))

    def _key(self, image_id: int) -> tuple[str, str]:
        """What an image row is a vector of: ("image", its content hash) for a photo,
        ("video", the video's content hash) for a frame."""
        video = self.records[image_id]["video_id"]
        if video is None:
            return "image", self.records[image_id]["content_hash"]
        return "video", self.videos[video]["content_hash"]

    def group(self, items: list[int], best: np.ndarray | None) -> DuplicateGroup:
        """The group of these items; ``best``: per vector, its best match (None: a group of
        one item's identical files)."""
        members = sorted((m for item in items for m in self._members(item, best)),
                         key=lambda m: m.id)
        return DuplicateGroup(members, len(items) == 1, len(items))

    def _members(self, item: int, best: np.ndarray | None) -> list[DuplicateMember]:
        if item not in self.rows:
            return [DuplicateMember(i, location(self.records[i]["path"])) for i in self.files[item]]
        time = None
        if best is not None:
            rows = self.rows[item]
            time = self.records[int(self.vectors[rows[int(np.argmax(best[rows]))]])]["time_s"]
        return [self._video(video, time) for video in self.files[item]]

    def _video(self, video: int, time: float | None) -> DuplicateMember:
        """A video as a member: its frame nearest ``time`` (None: its first frame)."""
        def distance(i: int) -> tuple[float, int]:
            return abs(self.records[i]["time_s"] - (time or 0.0)), i

        frame = min(self.frames[video], key=distance)
        at = None if time is None else self.records[frame]["time_s"]
        return DuplicateMember(frame, location(self.videos[video]["path"]), "video", at)
