"""Moments of videos among ranked hits: one per video (or several), each with its span.

A video's frames are image rows (:mod:`mmsearch.store.schema`), so a search ranks them
with the photos. Left alone, one video would fill the first page with its neighbouring
frames. :class:`Collapse` keeps, by default, each video's best frame (``--moments``: every
frame that is not inside a moment already kept), and gives each kept moment its span: the
frames next to it whose scores are within :data:`MARGIN` of its own, from the first one's
start to the last one's end (:func:`span`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from mmsearch.search.hits import ImageHit

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

MARGIN = 0.02   # neighbouring frames scoring within this of the best one join its moment
FETCH = 8       # an index with videos ranks this many candidates per hit asked for...
ROUNDS = 4      # ...in at most this many rounds, each past the frames of what was kept
REACH = 32      # frames read on each side of a hit's frame to find its moment's span


class Collapse:
    """Ranked hits, taken in turn (:meth:`add`, best first), with each video's moments
    collapsed (see the module): :attr:`hits` holds those kept so far, :meth:`covered` the
    frames they stand for (a later round of ranking leaves them out)."""

    def __init__(self, store: "Store", query: np.ndarray, several: bool = False) -> None:
        self.store, self.query, self.several = store, query, several
        self.hits: list[ImageHit] = []
        self._spans: dict[int, list[tuple[float, float]]] = {}
        self._covered: list[np.ndarray] = []

    def add(self, hits: list[ImageHit]) -> None:
        for hit in hits:
            if hit.kind != "video" or hit.video_id is None:
                self.hits.append(hit)
                continue
            spans = self._spans.setdefault(hit.video_id, [])
            if spans and (not self.several or any(s <= hit.time <= e for s, e in spans)):
                continue
            start, end, frames = span(self.store, self.query, hit)
            spans.append((start, end))
            self._covered.append(frames)
            self.hits.append(replace(hit, start=start, end=end))

    def covered(self) -> np.ndarray:
        """The frames of the videos kept (``several``: of the moments kept)."""
        parts = self._covered if self.several else [self.store.read.frame_ids(self._spans)]
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def span(store: "Store", query: np.ndarray, hit: ImageHit,
         reach: int = REACH) -> tuple[float, float, np.ndarray]:
    """(start, end) in seconds of the moment around ``hit``'s frame, and its frames' ids: its
    neighbours in time whose scores are within :data:`MARGIN` of its own join it. ``reach``
    frames on each side are read; a moment that runs into the edge of what was read reads
    four times as many."""
    ids, starts, ends, _ = store.read.frames_of(int(hit.video_id), (float(hit.time or 0), reach))
    vectors = _vectors(store, ids)
    if vectors is None or hit.id not in ids:
        return float(hit.start or 0.0), float(hit.end or 0.0), np.asarray([hit.id])
    scores = vectors @ np.asarray(query, dtype=np.float32).ravel()
    i = int(np.flatnonzero(ids == hit.id)[0])
    lo, hi = _grow(scores, i, scores[i] - MARGIN)
    before, after = i, len(ids) - i  # frames read before the hit's, and from it on
    if (lo == 0 and before == reach) or (hi == len(ids) - 1 and after == reach):
        return span(store, query, hit, 4 * reach)
    return float(starts[lo]), float(ends[hi]), ids[lo:hi + 1]


def _vectors(store: "Store", ids: np.ndarray) -> np.ndarray | None:
    """The vectors of ``ids``, in their order: from the loaded index when it holds them
    whole (Flat, HNSW), else from the catalog; None when one is missing."""
    index = store.vectors("images")
    vectors = None if index.is_compressed else index.reconstruct(ids)
    if vectors is not None and len(vectors) == len(ids):
        return vectors
    have, vectors = store.image_vectors(ids)
    if len(have) != len(ids):
        return None
    return vectors[np.searchsorted(have, ids)]


def _grow(scores: np.ndarray, i: int, floor: float) -> tuple[int, int]:
    lo, hi = i, i
    while lo > 0 and scores[lo - 1] >= floor:
        lo -= 1
    while hi < len(scores) - 1 and scores[hi + 1] >= floor:
        hi += 1
    return lo, hi
