"""Near-duplicate groups and ranked de-duplication against plain brute-force references."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from mmsearch.errors import UsageError
from mmsearch.search.duplicates import (DEFAULT_THRESHOLD, SCORE_TOLERANCE, dedup_ranked,
                                        near_duplicate_groups)

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
