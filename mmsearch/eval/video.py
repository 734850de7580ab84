"""Video-text retrieval by mean-pooled frames: the vectors and the ranks ``mmsearch eval``
reports for a :class:`~mmsearch.eval.datasets.VideoRetrievalDataset`.

The protocol is the zero-shot one of Portillo-Quintero et al. 2021 ("A Straightforward
Framework For Video Retrieval Using CLIP") and CLIP4Clip's parameter-free "meanP": a
video's vector is the mean of its frames' image vectors, L2-normalised, and captions and
videos are ranked by cosine against each other.

The frames are the ones ``mmsearch index`` stores: the same decoding and sampling (about
one frame a second plus the first frame of each shot, ``settings.video_fps``). The index
keeps a run of near-identical consecutive frames once, as a span standing for all of them
(:func:`mmsearch.ingest.video.collapse`, cosine to the span's first frame above 0.97). A
plain mean over the stored frames would then weigh a ten-second still shot like a
one-second glimpse; instead each stored frame is weighted by its span's length
(``end_s - start_s``). The frames a span merged are near-identical to the one it keeps, so
this time-weighted mean is, to within their differences, the mean over the frames sampled
at the fixed rate before collapsing, which is what the published protocol averages (the
extra frames taken at shot starts count for their span's time, not once more each). A
video whose spans all have zero length (one frame, no known duration) takes the plain mean.

Ranking is exact, in numpy (every query against every item, in blocks). A query's rank is
the position of its first relevant item (1 is best): Recall@K is the share of queries
ranked K or better, MdR and MnR the median and mean rank. Items with exactly equal scores
are ranked lower index first, the tie rule of :func:`mmsearch.eval.metrics.rank_by_similarity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from mmsearch.errors import DatasetError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.store import Store

__all__ = ["first_hit_ranks", "mean_pool", "pooled_vectors", "rank_summary"]

#: Scores computed at once while ranking (rows per block = this / items).
BLOCK_SCORES = 1 << 22


def pooled_vectors(store: "Store", video_ids: Sequence[int],
                   fetch: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
    """(one mean-pooled, L2-normalised float32 vector per video, frames pooled in all).

    ``store``: the index the videos were indexed into (their frames); ``fetch(ids)``: the
    stored vectors of these image ids, in their order.

    Raises:
        DatasetError: a video has no stored frame.
    """
    frames = [store.read.frames_of(int(v)) for v in video_ids]
    empty = [i for i, (ids, *_) in enumerate(frames) if not ids.size]
    if empty:
        raise DatasetError(f"{len(empty)} of {len(frames)} videos have no stored frames "
                           f"(video id {int(video_ids[empty[0]])}); index them again")
    vectors = fetch(np.concatenate([ids for ids, *_ in frames]))
    out = np.empty((len(frames), vectors.shape[1]), dtype=np.float32)
    at = 0
    for i, (ids, start, end, _) in enumerate(frames):
        out[i] = mean_pool(vectors[at:at + len(ids)], start, end)
        at += len(ids)
    return out, at


def mean_pool(vectors: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The L2-normalised mean of one video's frame ``vectors``, each weighted by its span
    ``end - start`` (seconds); equal weights when no span has a length."""
    weights = np.nan_to_num(np.asarray(end, np.float64) - np.asarray(start, np.float64))
    weights = np.maximum(weights, 0.0)
    if not weights.sum() > 0:
        weights = np.ones(len(vectors))
    mean = weights @ np.asarray(vectors, dtype=np.float64)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def first_hit_ranks(queries: np.ndarray, items: np.ndarray, query_labels: np.ndarray,
                    item_labels: np.ndarray) -> np.ndarray:
    """Per query, the 1-based rank of its best relevant item among all ``items`` by cosine
    (dot product of the rows); item ``j`` is relevant to query ``i`` when
    ``item_labels[j] == query_labels[i]``. Ties: lower item index first.

    Raises:
        UsageError: shapes do not fit, or a query has no relevant item.
    """
    query_labels, item_labels = np.asarray(query_labels), np.asarray(item_labels)
    if len(queries) != len(query_labels) or len(items) != len(item_labels) or \
            queries.shape[1:] != items.shape[1:]:
        raise UsageError(f"{queries.shape} queries and {items.shape} items do not fit "
                         f"{query_labels.shape} and {item_labels.shape} labels")
    ranks = np.empty(len(queries), dtype=np.int64)
    rows = max(1, BLOCK_SCORES // max(1, len(items)))
    for lo in range(0, len(queries), rows):
        hi = min(lo + rows, len(queries))
        relevant = query_labels[lo:hi, None] == item_labels[None, :]
        ranks[lo:hi] = _block_ranks(queries[lo:hi] @ items.T, relevant, lo)
    return ranks


def _block_ranks(scores: np.ndarray, relevant: np.ndarray, first_row: int) -> np.ndarray:
    """Ranks of one block: 1 + the items scoring above the best relevant one, + those
    scoring the same at a lower index."""
    none = np.flatnonzero(~relevant.any(axis=1))
    if none.size:
        raise UsageError(f"query {first_row + int(none[0])} has no relevant item to rank")
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    first = np.argmax(relevant & (scores == best), axis=1)[:, None]
    before = np.arange(scores.shape[1])[None, :] < first
    return 1 + np.count_nonzero((scores > best) | ((scores == best) & before), axis=1)


def rank_summary(ranks: np.ndarray, ks: Sequence[int]) -> tuple[dict[int, float], dict[str, float]]:
    """({k: Recall@k in percent}, {"MdR": median rank, "MnR": mean rank}) of 1-based ranks."""
    ranks = np.asarray(ranks)
    if not ranks.size:
        raise UsageError("no ranks to summarise")
    recalls = {int(k): 100.0 * float(np.count_nonzero(ranks <= k)) / ranks.size for k in ks}
    return recalls, {"MdR": float(np.median(ranks)), "MnR": float(np.mean(ranks))}
