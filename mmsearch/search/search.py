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
from mmsearch.ingest.discover import canonical_root
from mmsearch.search.hits import ImageHit, TextHit

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store
    from mmsearch.store.vectors import SearchResult, VectorIndex

MAX_QUERY_CHARS = 10_000
RERANK_POOL, RERANK_FACTOR = 100, 10  # candidates re-scored exactly: max(100, 10 k)


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
                  within: Path | None = None) -> list[list[ImageHit]]:
    """Top-``k`` images for each row of ``query`` (optionally only under folder ``within``)."""
    index = store.vectors("images")
    if index.ntotal == 0:
        raise empty_index(store, "images")
    subset = None
    if within is not None:
        subset = store.read.image_ids_under(str(canonical_root(within.expanduser())))
        if not subset.size:
            raise UsageError(f"no indexed images under {within}")
    result = top_images(store, index, query, k, subset)
    paths = store.read.image_paths(int(i) for i in np.unique(result.ids) if i >= 0)
    return [ranked([ImageHit(0, float(s), int(i), Path(paths[i]))
                    for s, i in zip(row_s, row_i) if i in paths])
            for row_s, row_i in zip(result.scores, result.ids)]


def top_images(store: "Store", index: "VectorIndex", query: np.ndarray, k: int,
               subset: np.ndarray | None = None) -> "SearchResult":
    """Top-``k`` image ids per query row from ``index``; an index of compressed codes
    is asked for a wider pool, re-scored exactly by :func:`rerank`."""
    if not index.is_compressed:
        return index.search(query, k, subset=subset)
    pool = index.search(query, max(RERANK_POOL, RERANK_FACTOR * k), subset=subset)
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
