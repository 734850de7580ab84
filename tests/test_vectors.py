"""FAISS paths against a plain numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import CorruptIndexError, UsageError
from mmsearch.vectors import VectorIndex, factory_string


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    scores = q @ vecs.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_search_equals_numpy(seed: int) -> None:
    vecs, q = unit(500, 32, seed), unit(7, 32, seed + 100)
    ids = np.random.default_rng(seed).choice(10**6, 500, replace=False).astype(np.int64)
    index = VectorIndex.create(32, "flat")
    index.add(ids, vecs)
    got = index.search(q, 10)
    scores, want = brute(vecs, ids, q, 10)
    np.testing.assert_array_equal(got.ids, want)
    np.testing.assert_allclose(got.scores, scores, atol=1e-5)


def test_subset_remove_and_short_results() -> None:
    vecs, q = unit(200, 16, 3), unit(3, 16, 4)
    ids = np.arange(1000, 1200, dtype=np.int64)
    index = VectorIndex.create(16, "flat")
    index.add(ids, vecs)
    subset = ids[::7]
    got = index.search(q, 5, subset=subset)
    _, want = brute(vecs[::7], subset, q, 5)
    np.testing.assert_array_equal(got.ids, want)
    assert index.remove(ids[:100]) and index.ntotal == 100
    np.testing.assert_array_equal(np.sort(index.ids()), ids[100:])
    _, want = brute(vecs[100:], ids[100:], q, 3)
    np.testing.assert_array_equal(index.search(q, 3).ids, want)
    assert index.search(q, 500).ids.shape == (3, 100)  # k larger than the index: all of it


def test_save_load_roundtrip_and_corruption(tmp_path: Path) -> None:
    vecs = unit(50, 8, 5)
    index = VectorIndex.create(8, "flat")
    index.add(np.arange(50), vecs)
    path = tmp_path / "v.faiss"
    index.save(path)
    again = VectorIndex.load(path)
    assert again.ntotal == 50 and again.dim == 8
    np.testing.assert_array_equal(again.search(vecs[:2], 1).ids[:, 0], [0, 1])
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(path)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_exact_neighbours(kind: str) -> None:
    rng = np.random.default_rng(6)  # clustered, like real embeddings
    centres = unit(40, 32, 8)
    vecs = centres[rng.integers(0, 40, 4000)] + 0.3 * unit(4000, 32, 9)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = vecs[rng.choice(4000, 20, replace=False)] + 0.1 * unit(20, 32, 7)
    ids = np.arange(4000, dtype=np.int64)
    index = VectorIndex.create(32, kind, expected=4000, train=vecs)
    index.add(ids, vecs)
    got = index.search(q, 10).ids
    _, want = brute(vecs, ids, q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert overlap >= 0.8, overlap


def test_factory_strings_and_bad_types() -> None:
    assert factory_string("auto", 1000, 512) == "Flat"
    assert factory_string("auto", 1_000_000, 512) == "HNSW32,Flat"
    assert factory_string("auto", 10_000_000, 512).startswith("IVF")
    assert factory_string("IVF64,SQ8", 1000, 512) == "IVF64,SQ8"
    with pytest.raises(UsageError):
        VectorIndex.create(8, "NoSuchIndex")
