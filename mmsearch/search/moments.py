"""Moments of videos among ranked hits: one per video (or several), each with its span.

A video's frames are image rows (:mod:`mmsearch.store.schema`), so a search ranks them
with the photos. Left alone, one video would fill the first page with its neighbouring
frames. :func:`collapse` keeps, by default, each video's best frame (``--moments``: every
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
FETCH = 8       # an index with videos ranks this many candidates per hit asked for
REACH = 32      # frames read on each side of a hit's frame to find its moment's span


def collapse(store: "Store", query: np.ndarray, hits: list[ImageHit],
             several: bool = False) -> list[ImageHit]:
    """``hits`` (best first) with each video's moments collapsed (see the module)."""
    out: list[ImageHit] = []
    kept: dict[int, list[tuple[float, float]]] = {}
    for hit in hits:
        if hit.kind != "video" or hit.video_id is None:
            out.append(hit)
            continue
        spans = kept.setdefault(hit.video_id, [])
        if spans and (not several or any(s <= hit.time <= e for s, e in spans)):
            continue
        start, end = span(store, query, hit)
        spans.append((start, end))
        out.append(replace(hit, start=start, end=end))
    return out


def span(store: "Store", query: np.ndarray, hit: ImageHit,
         reach: int = REACH) -> tuple[float, float]:
    """(start, end) in seconds of the moment around ``hit``'s frame: its neighbours in time
    whose scores are within :data:`MARGIN` of its own join it. ``reach`` frames on each
    side are read; a moment that runs into the edge of what was read reads twice as many."""
    ids, starts, ends, _ = store.read.frames_of(int(hit.video_id), (float(hit.time or 0), reach))
    have, vectors = store.image_vectors(ids)
    if not len(have) or hit.id not in have:
        return float(hit.start or 0.0), float(hit.end or 0.0)
    scores = vectors[np.searchsorted(have, ids)] @ np.asarray(query, dtype=np.float32).ravel()
    i = int(np.flatnonzero(ids == hit.id)[0])
    lo, hi = _grow(scores, i, scores[i] - MARGIN)
    before, after = i, len(ids) - i  # frames read before the hit's, and from it on
    if (lo == 0 and before == reach) or (hi == len(ids) - 1 and after == reach):
        return span(store, query, hit, 4 * reach)
    return float(starts[lo]), float(ends[hi])


def _grow(scores: np.ndarray, i: int, floor: float) -> tuple[int, int]:
    lo, hi = i, i
    while lo > 0 and scores[lo - 1] >= floor:
        lo -= 1
    while hi < len(scores) - 1 and scores[hi + 1] >= floor:
        hi += 1
    return lo, hi
