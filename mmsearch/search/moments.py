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


def span(store: "Store", query: np.ndarray, hit: ImageHit) -> tuple[float, float]:
    """(start, end) in seconds of the moment around ``hit``'s frame: its neighbours in time
    whose scores are within :data:`MARGIN` of its own join it."""
    ids, starts, ends, _ = store.read.frames_of(int(hit.video_id))
    have, vectors = store.image_vectors(ids)
    if not len(have):
        return float(hit.start or 0.0), float(hit.end or 0.0)
    scores = vectors[np.searchsorted(have, ids)] @ np.asarray(query, dtype=np.float32).ravel()
    i = int(np.flatnonzero(ids == hit.id)[0]) if (ids == hit.id).any() else int(scores.argmax())
    floor = scores[i] - MARGIN
    lo, hi = i, i
    while lo > 0 and scores[lo - 1] >= floor:
        lo -= 1
    while hi < len(ids) - 1 and scores[hi + 1] >= floor:
        hi += 1
    return float(starts[lo]), float(ends[hi])
