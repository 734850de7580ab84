"""Reference checks for evaluation: the vectors an eval index stored, read back in dataset
order, and which Recall@K hits near-ties could flip (shared by the eval tests)."""

from __future__ import annotations

import numpy as np

from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.eval.metrics import DEFAULT_KS, recalls_from_similarity
from mmsearch.settings import Settings


def stored_embeddings(settings: Settings, index_name: str,
                       dataset: RetrievalDataset) -> tuple[np.ndarray, np.ndarray]:
    """(caption vectors, image vectors) the engine stored in ``index_name``, in dataset order."""
    from mmsearch.engine import Engine

    with Engine(settings.with_(index=index_name)) as engine:
        catalog = engine.store.read
        ids = {path: i for i, path in catalog.all_image_paths()}
        order = [ids[str(p.resolve())] for p in dataset.image_paths]
        got_ids, got = catalog.image_vectors(engine.store.dim, order)
        images = got[np.searchsorted(got_ids, order)]
        keys = {key: i for i, (key, _) in catalog.texts_by_id(
            int(i) for i in catalog.all_text_ids()).items()}
        order = [keys[str(c)] for c in range(dataset.n_captions)]
        got_ids, got = catalog.text_vectors(engine.store.dim, order)
        texts = got[np.searchsorted(got_ids, order)]
    return texts, images


def better_counts(sim: np.ndarray, owners: np.ndarray, tol: float):
    """Per query and direction: foreign items surely better (> own + tol), possibly (>= own - tol).

    A query is a hit at K exactly when fewer than K foreign items score above its
    relevant one; with both counts below K (or both not) the hit cannot flip
    when any score moves by ``tol``.
    """
    rows = np.arange(len(owners))
    own = sim[rows, owners]
    other = sim.copy()
    other[rows, owners] = -np.inf
    t2i = ((other > own[:, None] + tol).sum(1), (other >= own[:, None] - tol).sum(1))
    mine = owners[None, :] == np.arange(sim.shape[1])[:, None]  # (images, captions)
    best = np.where(mine, sim.T, -np.inf).max(1)
    foreign = np.where(mine, -np.inf, sim.T)
    i2t = ((foreign > best[:, None] + tol).sum(1), (foreign >= best[:, None] - tol).sum(1))
    return t2i, i2t


def assert_recalls_match(sim: np.ndarray, owners: np.ndarray, t2i: dict, i2t: dict,
                         tol: float) -> int:
    """The engine's recalls ``t2i``/``i2t`` equal numpy's on ``sim`` wherever no score within
    ``tol`` decides them, and lie within the bounds elsewhere; returns how many recalls
    near-ties left undecided."""
    ref_t2i, ref_i2t = recalls_from_similarity(sim, owners)
    t2i_counts, i2t_counts = better_counts(sim, owners, tol)
    undecided = 0
    for (sure, maybe), got, ref in ((t2i_counts, t2i, ref_t2i), (i2t_counts, i2t, ref_i2t)):
        for k in DEFAULT_KS:
            low, high = 100 * np.mean(maybe < k), 100 * np.mean(sure < k)
            assert low - 1e-9 <= ref[k] <= high + 1e-9
            if np.isclose(low, high):
                assert got[k] == ref[k], k
            else:
                assert low - 1e-9 <= got[k] <= high + 1e-9, k
                undecided += 1
    return undecided


# --------------------------------------------------------------------------- #
# Videos: mean-pooled frames
# --------------------------------------------------------------------------- #


def stored_video_frames(settings: Settings, index_name: str, dataset: RetrievalDataset
                        ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(caption vectors, per video (its stored frame vectors, each frame's span in seconds))
    as the engine stored them in ``index_name``, in dataset order."""
    from mmsearch.engine import Engine

    with Engine(settings.with_(index=index_name)) as engine:
        read, dim = engine.store.read, engine.store.dim
        rows = read.videos_under([str(p.resolve()) for p in dataset.image_paths])
        frames = []
        for path in dataset.image_paths:
            ids, start, end, _ = read.frames_of(rows[str(path.resolve())].id)
            got_ids, got = read.image_vectors(dim, ids)
            frames.append((got[np.searchsorted(got_ids, ids)], end - start))
        keys = {key: i for i, (key, _) in read.texts_by_id(
            int(i) for i in read.all_text_ids()).items()}
        order = [keys[str(c)] for c in range(dataset.n_captions)]
        got_ids, got = read.text_vectors(dim, order)
    return got[np.searchsorted(got_ids, order)], frames


def video_ranks(texts: np.ndarray, frames: list[tuple[np.ndarray, np.ndarray]],
                owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(text -> video ranks, video -> text ranks), 1-based, the plain way: each video the
    span-weighted mean of its frames, normalised; every query's items sorted by score
    (stable: ties to the lower index); the position of the first relevant one."""
    pooled = np.stack([np.average(v.astype(np.float64), axis=0, weights=w) for v, w in frames])
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    sim = texts.astype(np.float64) @ pooled.T
    t2v = np.array([1 + np.flatnonzero(np.argsort(-row, kind="stable") == owners[c])[0]
                    for c, row in enumerate(sim)])
    v2t = np.array([1 + np.flatnonzero(owners[np.argsort(-sim[:, v], kind="stable")] == v)[0]
                    for v in range(len(frames))])
    return t2v, v2t
