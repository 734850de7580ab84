"""Near-duplicate groups and ranked de-duplication against plain brute-force references."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from mmsearch.errors import UsageError
from mmsearch.search.duplicates import (DEFAULT_THRESHOLD, SCORE_TOLERANCE, dedup_ranked,
                                        near_duplicate_groups, near_duplicates)

DIM = 64
MAX_CLUSTER = 6


def unit(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors): 40 clusters of 1-6 noisy copies of a centre, plus 500 singletons, shuffled."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(40):
        centre = unit(rng.standard_normal(DIM))
        size = int(rng.integers(1, MAX_CLUSTER + 1))
        parts.append(unit(centre + rng.normal(0, 0.02, (size, DIM))))  # cosine ~0.97-0.99 within
    parts.append(unit(rng.standard_normal((500, DIM))))
    vectors = np.vstack(parts)[rng.permutation(sum(len(p) for p in parts))]
    ids = rng.choice(10**9, len(vectors), replace=False).astype(np.int64)
    return ids, vectors


def reference_groups(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> set[frozenset[int]]:
    """Connected components (2+ members) of the full 'cosine >= threshold' graph, by BFS."""
    adjacent = (vectors @ vectors.T) >= threshold - SCORE_TOLERANCE
    np.fill_diagonal(adjacent, False)
    return components(ids, adjacent)


def components(ids: np.ndarray, adjacent: np.ndarray) -> set[frozenset[int]]:
    """The ids of each connected component (2+ members) of a boolean adjacency matrix, by BFS."""
    seen, out = set(), set()
    for start in range(len(ids)):
        if start in seen:
            continue
        seen.add(start)
        component, queue = [start], deque([start])
        while queue:
            for nxt in np.flatnonzero(adjacent[queue.popleft()]).tolist():
                if nxt not in seen:
                    seen.add(nxt)
                    component.append(nxt)
                    queue.append(nxt)
        if len(component) > 1:
            out.add(frozenset(ids[component].tolist()))
    return out


def reference_dedup(vectors: np.ndarray, threshold: float) -> list[bool]:
    keep: list[bool] = []
    for i in range(len(vectors)):
        duplicate = False
        for j in range(i):
            cosine = float(np.dot(vectors[i], vectors[j]))
            if keep[j] and cosine >= threshold - SCORE_TOLERANCE:
                duplicate = True
                break
        keep.append(not duplicate)
    return keep


def assert_ordered(groups: list[list[int]]) -> None:
    for group in groups:
        assert len(group) >= 2 and group == sorted(group)
    keys = [(-len(g), g[0]) for g in groups]
    assert keys == sorted(keys)
    flat = [i for g in groups for i in g]
    assert len(flat) == len(set(flat))  # no id in two groups


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [7, 100, 4096])
def test_groups_equal_brute_force_components(seed: int, chunk: int) -> None:
    ids, vectors = clustered(seed)
    want = reference_groups(ids, vectors, DEFAULT_THRESHOLD)
    assert len(want) >= 20 and max(map(len, want)) >= 4  # the data has clusters worth finding
    got = near_duplicate_groups(ids, vectors, neighbours=MAX_CLUSTER, chunk=chunk)
    assert {frozenset(g) for g in got} == want
    assert_ordered(got)


@pytest.mark.parametrize("threshold", [0.9, 0.98, 0.3])
def test_other_thresholds_equal_brute_force(threshold: float) -> None:
    ids, vectors = clustered(2)
    # With neighbours = n - 1 the kNN graph is the full graph, whatever the threshold.
    got = near_duplicate_groups(ids, vectors, threshold=threshold, neighbours=len(ids) - 1, chunk=50)
    assert {frozenset(g) for g in got} == reference_groups(ids, vectors, threshold)
    assert_ordered(got)


def test_ordering_largest_first_then_smallest_id() -> None:
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((4, DIM)))
    sizes, first_ids = [2, 3, 2, 3], [[50, 7], [90, 91, 92], [3, 60], [40, 41, 1]]
    vectors = np.vstack([np.repeat(c[None], s, 0) for c, s in zip(centres, sizes)])
    ids = np.array([i for part in first_ids for i in part], dtype=np.int64)
    got = near_duplicate_groups(ids, vectors)
    assert got == [[1, 40, 41], [90, 91, 92], [3, 60], [7, 50]]


def test_chain_is_one_group() -> None:
    angle = math.acos(0.96)  # adjacent pairs at cosine 0.96, ends at cos(2 * angle) ~ 0.84
    vectors = unit([[math.cos(k * angle), math.sin(k * angle)] + [0.0] * 6 for k in range(3)])
    assert (vectors[0] @ vectors[2]) < DEFAULT_THRESHOLD <= vectors[0] @ vectors[1]
    assert near_duplicate_groups(np.array([30, 10, 20]), vectors, neighbours=1) == [[10, 20, 30]]
    assert near_duplicate_groups(np.array([30, 10, 20]), vectors, threshold=0.97) == []


def test_fewer_neighbours_than_cluster_members_still_finds_true_groups() -> None:
    ids, vectors = clustered(3)
    want = reference_groups(ids, vectors, DEFAULT_THRESHOLD)
    got = near_duplicate_groups(ids, vectors, neighbours=2, chunk=13)
    assert_ordered(got)
    # Only the 2 nearest are seen: each group lies inside a true component (never joins two),
    # and chains through overlapping neighbour lists still join most of them whole.
    assert all(any(set(g) <= w for w in want) for g in got)
    assert len({frozenset(g) for g in got} & want) >= len(want) // 2


def test_identical_vectors_group_at_threshold_one() -> None:
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((5, DIM)))
    vectors = np.vstack([base, base[1], base[1], base[3]])  # rows 5, 6 copy row 1; row 7 copies row 3
    ids = np.arange(100, 108)
    assert near_duplicate_groups(ids, vectors, threshold=1.0) == [[101, 105, 106], [103, 107]]
    # More identical copies than neighbours + 1: ties, yet one group.
    many = np.repeat(base[:1], 20, 0)
    assert near_duplicate_groups(np.arange(20), many, threshold=1.0, neighbours=2, chunk=3) == [list(range(20))]


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.9", True])
def test_invalid_thresholds_raise(threshold: object) -> None:
    ids, vectors = np.arange(3), unit(np.eye(3, DIM))
    with pytest.raises(UsageError, match="threshold"):
        near_duplicate_groups(ids, vectors, threshold=threshold)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="threshold"):
        dedup_ranked(ids, vectors, threshold=threshold)  # type: ignore[arg-type]


def test_invalid_shapes_and_empty_input() -> None:
    vectors = unit(np.eye(3, DIM))
    for ids, vecs in [(np.arange(2), vectors), (np.arange(3)[:, None], vectors), (np.arange(3), vectors[0])]:
        with pytest.raises(UsageError) as err:
            near_duplicate_groups(ids, vecs)
        assert "\n" not in str(err.value)
        with pytest.raises(UsageError):
            dedup_ranked(ids, vecs)
    with pytest.raises(UsageError):
        near_duplicate_groups(np.arange(3), vectors, neighbours=0)
    with pytest.raises(UsageError):
        near_duplicate_groups(np.arange(3), vectors, chunk=0)
    empty_ids, empty_vectors = np.zeros(0, np.int64), np.zeros((0, DIM), np.float32)
    assert near_duplicate_groups(empty_ids, empty_vectors) == []
    assert dedup_ranked(empty_ids, empty_vectors).tolist() == []
    assert near_duplicate_groups(np.array([7]), vectors[:1]) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [DEFAULT_THRESHOLD, 0.5, 0.2])
def test_dedup_ranked_equals_double_loop(seed: int, threshold: float) -> None:
    ids, vectors = clustered(seed)
    vectors = vectors[:300]
    got = dedup_ranked(ids[:300], vectors, threshold=threshold)
    assert got.dtype == bool and got.shape == (300,)
    assert got.tolist() == reference_dedup(vectors, threshold)
    assert got[0]
    assert 0 < got.sum() < 300


def test_dedup_ranked_keeps_only_the_best_ranked_of_identical_vectors() -> None:
    rng = np.random.default_rng(6)
    a, b = unit(rng.standard_normal((2, DIM)))
    vectors = np.vstack([b, a, a, b, a])
    got = dedup_ranked(np.arange(5), vectors, threshold=1.0)
    assert got.tolist() == [True, True, False, False, False]
    assert dedup_ranked(np.array([9]), vectors[:1]).tolist() == [True]



# -- items of several vectors (a video's frames share one id) ----------------------

VIDEO, STILL = 2 * 10**9, 3 * 10**9  # ids of the "videos" below (VIDEO + v) and of the still


def with_videos(seed: int, photos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors): :func:`clustered` (unless not ``photos``), plus 12 "videos": one id
    for 5-40 frames on a slow walk, so that a frame's nearest are its own; videos 10 and 11
    copies of videos 0 and 1 (their walks shifted as a whole, further than a frame's own
    neighbours are); and a still of a frame of video 3."""
    rng = np.random.default_rng(100 + seed)
    ids, vectors = clustered(seed) if photos else (np.zeros(0, np.int64), np.zeros((0, DIM)))
    walks: list[np.ndarray] = []
    for v in range(12):
        if v >= 10:
            walks.append(unit(walks[v - 10] + rng.normal(0, 0.02, DIM)))  # one shift for all
        else:
            steps = rng.normal(0, 0.004, (int(rng.integers(5, 41)), DIM))
            walks.append(unit(rng.standard_normal(DIM) + np.cumsum(steps, axis=0)))
    owners = [VIDEO + v for v, w in enumerate(walks) for _ in w] + [STILL]
    frames = np.vstack(walks + [unit(walks[3][2] + rng.normal(0, 0.01, DIM))])
    order = rng.permutation(len(owners))
    return (np.concatenate([ids, np.asarray(owners, np.int64)[order]]),
            np.vstack([vectors, frames[order]]))


def reference_items(ids: np.ndarray, vectors: np.ndarray,
                    threshold: float) -> tuple[set[frozenset[int]], np.ndarray]:
    """Components (2+ items) of the graph over items 'some vector of one has cosine >=
    threshold with some vector of the other', and each vector's best cosine with a vector
    of another item where it reaches the threshold (-inf elsewhere)."""
    items, where = np.unique(ids, return_inverse=True)
    sims = vectors @ vectors.T
    sims[where[:, None] == where[None, :]] = -np.inf  # an item's own vectors are no match
    adjacent = np.zeros((len(items), len(items)), dtype=bool)
    rows, cols = np.nonzero(sims >= threshold - SCORE_TOLERANCE)
    adjacent[where[rows], where[cols]] = True
    best = sims.max(axis=1)
    return components(items, adjacent), np.where(best >= threshold - SCORE_TOLERANCE, best, -np.inf)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("neighbours", [1, 3, MAX_CLUSTER])
def test_items_of_several_vectors_equal_brute_force(seed: int, neighbours: int) -> None:
    """However few neighbours, a video's own frames (its nearest) hide no other item; the
    photos' clusters of up to MAX_CLUSTER need that many to come out whole."""
    ids, vectors = with_videos(seed, photos=neighbours >= MAX_CLUSTER)
    want, best = reference_items(ids, vectors, DEFAULT_THRESHOLD)
    # the data: a video's own frames reach the threshold; copies and the still join their videos
    sims = vectors @ vectors.T
    own = [(sims[np.ix_(ids == v, ids == v)] >= DEFAULT_THRESHOLD).sum() - (ids == v).sum()
           for v in range(VIDEO, VIDEO + 12)]
    assert min(own) > 0
    assert {VIDEO, VIDEO + 10} in want and {VIDEO + 1, VIDEO + 11} in want
    assert {VIDEO + 3, STILL} in want
    got = near_duplicates(ids, vectors, neighbours=neighbours, chunk=100)
    assert {frozenset(g) for g in got.groups} == want
    assert_ordered(got.groups)
    np.testing.assert_allclose(got.best, best, atol=1e-5)
    assert near_duplicate_groups(ids, vectors, neighbours=neighbours, chunk=100) == got.groups


def test_a_video_alone_is_no_group_however_alike_its_frames() -> None:
    ids, vectors = with_videos(0)
    alone = ids == VIDEO + 4
    assert (vectors[alone] @ vectors[alone].T).min() >= DEFAULT_THRESHOLD
    for extra in [np.zeros((0, DIM)), unit(-vectors[alone].mean(axis=0))]:  # and a photo far off
        got = near_duplicates(np.r_[ids[alone], [7] * len(extra)], np.vstack([vectors[alone], extra]),
                              neighbours=2)
        assert got.groups == [] and np.isneginf(got.best).all()


def test_identical_frames_of_two_videos_group_at_threshold_one() -> None:
    rng = np.random.default_rng(7)
    frames = unit(rng.standard_normal((30, DIM)))
    frames[10:] = frames[:1]  # 21 identical frames in video 1: its own ties fill any list
    vectors = np.vstack([frames, frames[5], unit(rng.standard_normal(DIM))])
    ids = np.r_[np.full(30, 1), 2, 3]
    got = near_duplicates(ids, vectors, threshold=1.0, neighbours=1, chunk=4)
    assert got.groups == [[1, 2]]
    assert got.best[5] == pytest.approx(1.0, abs=1e-6) and got.best[30] == pytest.approx(1.0, abs=1e-6)
