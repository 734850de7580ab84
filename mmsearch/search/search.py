"""Searching: a query vector in, ranked hits with catalog metadata out.

Compressed indexes (SQ, PQ) rank a wider pool of candidates, re-scored exactly
from the catalog's vectors (:func:`top_images`, :func:`rerank`): one place
decides on re-ranking, for queries and for ``mmsearch eval`` alike.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmsearch.errors import CorruptIndexError, EmptyIndexError, UsageError
from mmsearch.locations import canonical, location, video_of
from mmsearch.search import moments
from mmsearch.search.duplicates import dedup_ranked
from mmsearch.search.filters import (Filters, bounding_box, extensions, period, within_km)
from mmsearch.search.hits import HIT_METADATA, ImageHit, TextHit
from mmsearch.store import ImageSelection

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store
    from mmsearch.store.vectors import SearchResult, VectorIndex

MAX_QUERY_CHARS = 10_000
RERANK_POOL, RERANK_FACTOR = 100, 10  # candidates re-scored exactly: max(100, 10 k)
BRUTE_FORCE_MAX = 20_000   # a filter keeping at most this many images (or 1/BRUTE_FORCE_SHARE
BRUTE_FORCE_SHARE = 50     # of the index) ranks them exactly from their stored vectors
DEDUP_FETCH = 4            # --dedup ranks 4 k candidates, so k remain after hiding duplicates


def empty_index(store: "Store", kind: str) -> EmptyIndexError:
    """The error for searching an index that holds no images (or no texts)."""
    if kind == "images":
        return EmptyIndexError(f"index {store.root.name!r} is empty; run `mmsearch index FOLDER`")
    return EmptyIndexError(f"index {store.root.name!r} has no texts; run `mmsearch texts add FILE`")


def check_text_query(text: str) -> str:
    """The query as it will be embedded, or :class:`UsageError` when there is none."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty query: give some words to search for")
    if len(text) > MAX_QUERY_CHARS:
        raise UsageError(f"query too long: {len(text)} characters (at most {MAX_QUERY_CHARS})")
    return " ".join(text.split())


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise UsageError(f"k must be a whole number >= 0, got {k!r}")
    return k


def search_images(store: "Store", query: np.ndarray, k: int,
                  filters: "Filters | Path | None" = None) -> list[list[ImageHit]]:
    """Top-``k`` images for each row of ``query``, among those ``filters`` keep (a bare
    path: only under that folder), shaped as ``filters`` says (min score, sort, dedup)."""
    if isinstance(filters, (str, Path)):
        filters = Filters(within=filters)
    index = store.vectors("images")
    if index.ntotal == 0:
        raise empty_index(store, "images")
    subset = selected_ids(store, filters) if filters is not None and filters.selects else None
    if subset is not None and not subset.size:
        return [[] for _ in np.atleast_2d(query)]
    fetch = k if filters is None or not filters.dedup else min(DEDUP_FETCH * k, index.ntotal)
    videos = (filters is None or filters.type != "image") and store.has_videos()
    if not videos:
        result = ranked_ids(store, index, query, fetch, subset)
        records = store.image_records(int(i) for i in np.unique(result.ids) if i >= 0)
        return [shape(store, _hits(records, row_s, row_i), k, filters)
                for row_s, row_i in zip(result.scores, result.ids)]
    several = filters is not None and filters.moments
    return [shape(store, _video_hits(store, index, q, fetch, subset, several), k, filters)
            for q in np.atleast_2d(query)]


def _hits(records: dict[int, dict], scores: np.ndarray, ids: np.ndarray) -> list[ImageHit]:
    return [_hit(s, i, records[i]) for s, i in zip(scores, ids) if i in records]


def _video_hits(store: "Store", index: "VectorIndex", query: np.ndarray, fetch: int,
                subset: np.ndarray | None, several: bool) -> list[ImageHit]:
    """The best ``fetch`` hits for one query in an index with videos, each video's moments
    collapsed (:mod:`.moments`). A video's frames crowd the nearest candidates, so a round
    that ends with fewer than ``fetch`` hits ranks more, past the candidates already seen
    and the frames of what was kept."""
    kept = moments.Collapse(store, query, several)
    seen = np.empty(0, dtype=np.int64)
    wide = min(moments.FETCH * fetch, index.ntotal)
    for _ in range(moments.ROUNDS):
        result = ranked_ids(store, index, query, wide, subset, exclude=seen)
        ids = result.ids[0][result.ids[0] >= 0]
        records = store.image_records(int(i) for i in ids)
        kept.add(_hits(records, result.scores[0], result.ids[0]))
        if len(kept.hits) >= fetch or len(ids) < wide:
            break
        seen = np.union1d(np.union1d(seen, ids), kept.covered())
    return kept.hits


def _hit(score: float, image_id: int, record: dict) -> ImageHit:
    fields = {f: record.get(f) for f in HIT_METADATA}
    if record.get("video_id") is None:
        return ImageHit(0, float(score), int(image_id), location(record["path"]), **fields)
    return ImageHit(0, float(score), int(image_id), location(video_of(record["path"]) or ""),
                    **fields, kind="video", time=record["time_s"], start=record["start_s"],
                    end=record["end_s"], video_id=record["video_id"])


def selected_ids(store: "Store", filters: Filters) -> np.ndarray:
    """The ids of the images ``filters`` keep (SQL for most conditions, then the exact
    distance for --near); ranking happens among exactly these."""
    within = None
    if filters.within is not None:
        within = canonical(filters.within)
    sel = ImageSelection(
        within=within,
        taken_from=period(filters.after)[0] if filters.after else None,
        taken_until=period(filters.before)[1] if filters.before else None,
        camera=filters.camera or None, exts=extensions(filters.ext), kind=filters.type,
        bbox=bounding_box(*filters.near, filters.km) if filters.near and filters.km else None)
    ids, lat, lon = store.select_images(sel)
    if within is not None and not ids.size and not store.read.image_ids_under(within).size:
        raise UsageError(f"no indexed images under {filters.within}")
    return within_km(ids, lat, lon, filters)


def ranked_ids(store: "Store", index: "VectorIndex", query: np.ndarray, k: int,
               subset: np.ndarray | None, exclude: np.ndarray | None = None) -> "SearchResult":
    """Top-``k`` ids among ``subset`` (None: all), but for those in ``exclude``. A small
    subset is ranked exactly from the catalog's vectors; a large one by FAISS restricted to
    it (an ``IDSelector``, with the search effort raised in proportion), so a selective
    filter still returns its ``k``."""
    if subset is not None and exclude is not None and exclude.size:
        subset, exclude = np.setdiff1d(subset, exclude), None
    if subset is None or subset.size > max(BRUTE_FORCE_MAX, index.ntotal // BRUTE_FORCE_SHARE):
        return top_images(store, index, query, k, subset, exclude)
    return exact_top(store, index, np.atleast_2d(query).astype(np.float32), k, subset)


def exact_top(store: "Store", index: "VectorIndex", query: np.ndarray, k: int,
              subset: np.ndarray) -> "SearchResult":
    """Top-``k`` of ``subset`` by exact cosine over its vectors (brute force): taken from
    the index when it holds them whole (Flat, HNSW), else read from the catalog."""
    from mmsearch.store.vectors import SearchResult

    vectors = None if index.is_compressed else index.reconstruct(subset)
    ids = subset
    if vectors is None or len(vectors) != len(subset):
        ids, vectors = store.image_vectors(subset)
    scores = query @ vectors.T
    k = min(k, len(ids))
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if 0 < k < len(ids) else \
        np.tile(np.arange(len(ids)), (len(query), 1))
    top = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((ids[part], -top), axis=1)[:, :k]
    return SearchResult(np.take_along_axis(top, order, axis=1).astype(np.float32),
                        np.take_along_axis(ids[part], order, axis=1))


def shape(store: "Store", hits: list[ImageHit], k: int,
          filters: Filters | None) -> list[ImageHit]:
    """Apply min_score, dedup and sort to ranked hits, keep ``k``, number them 1..n."""
    if filters is not None and filters.min_score is not None:
        hits = [h for h in hits if h.score >= filters.min_score]
    if filters is not None and filters.dedup and len(hits) > 1:
        ids, vectors = store.image_vectors([h.id for h in hits])
        order = np.searchsorted(ids, [h.id for h in hits])
        keep = dedup_ranked(ids[order], vectors[order], threshold=filters.dedup_threshold)
        hits = [h for h, kept in zip(hits, keep) if kept]
    hits = hits[:k]
    if filters is not None and filters.sort != "score":
        newest = filters.sort == "date"
        dated = sorted((h for h in hits if h.taken), key=lambda h: h.taken, reverse=newest)
        hits = dated + [h for h in hits if not h.taken]
    return ranked(hits)


def top_images(store: "Store", index: "VectorIndex", query: np.ndarray, k: int,
               subset: np.ndarray | None = None,
               exclude: np.ndarray | None = None) -> "SearchResult":
    """Top-``k`` image ids per query row from ``index`` (among ``subset``, but for
    ``exclude``); an index of compressed codes is asked for a wider pool, re-scored exactly
    by :func:`rerank`."""
    exclude = exclude if exclude is not None and exclude.size else None
    if not index.is_compressed:
        return index.search(query, k, subset=subset, exclude=exclude)
    pool = index.search(query, max(RERANK_POOL, RERANK_FACTOR * k), subset=subset,
                        exclude=exclude)
    return rerank(store, query, pool, k)


def rerank(store: "Store", query: np.ndarray, found: "SearchResult", k: int) -> "SearchResult":
    """The best ``k`` of ``found`` by exact cosine, from the catalog's own vectors.

    Indexes of compressed codes (IVF-SQ8, IVF-PQ) rank by approximate scores; the
    catalog keeps every vector, so re-scoring a pool of candidates costs one SQLite
    read of ~100 vectors and gives exact scores and a better top ``k``.
    """
    from mmsearch.store.vectors import SearchResult

    query = np.atleast_2d(query).astype(np.float32)
    try:
        have, vecs = store.read.image_vectors(query.shape[1], np.unique(found.ids[found.ids >= 0]))
    except CorruptIndexError:  # a damaged stored vector: keep the index's own ranking
        return SearchResult(found.scores[:, :k], found.ids[:, :k])
    col = np.clip(np.searchsorted(have, found.ids), 0, max(len(have) - 1, 0))
    known = (found.ids >= 0) & (have[col] == found.ids) if len(have) else found.ids < -1
    exact = np.einsum("qd,qkd->qk", query, vecs[col]) if len(have) else found.scores
    scores = np.where(known, exact, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    ids = np.where(np.isfinite(best), np.take_along_axis(found.ids, order, axis=1), -1)
    return SearchResult(best, ids)


def search_texts(store: "Store", query: np.ndarray, k: int) -> list[list[TextHit]]:
    index = store.vectors("texts")
    if index.ntotal == 0:
        raise empty_index(store, "texts")
    result = index.search(query, k)
    rows = store.read.texts_by_id(int(i) for i in np.unique(result.ids) if i >= 0)
    return [ranked([TextHit(0, float(s), int(i), *rows[i]) for s, i in zip(row_s, row_i) if i in rows])
            for row_s, row_i in zip(result.scores, result.ids)]


def ranked(hits: list) -> list:
    """Number hits 1..n in their order."""
    return [replace(h, rank=i) for i, h in enumerate(hits, 1)]
