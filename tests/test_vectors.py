"""FAISS paths against a plain numpy reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from mmsearch.errors import CorruptIndexError, UsageError
from mmsearch.store.vectors import (EXACT_FLOATS, FLOAT_BYTES, SQ8_BYTES, VectorIndex, auto_type,
                              default_effort, factory_string, nlist_for, train_size)


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


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_one_query_finds_what_it_finds_in_a_batch_and_leaves_the_thread_count(kind: str) -> None:
    """A single query runs on one FAISS thread (see vectors._omp_threads): the same
    neighbours and scores as within a batch, and the caller's setting afterwards."""
    vecs, q = unit(3000, 32, 10), unit(6, 32, 11)
    index = VectorIndex.create(32, kind, expected=3000, train=vecs)
    index.add(np.arange(3000, dtype=np.int64), vecs)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        batch = index.search(q, 10)
        for i, row in enumerate(q):
            one = index.search(row, 10)
            np.testing.assert_array_equal(one.ids[0], batch.ids[i])
            np.testing.assert_allclose(one.scores[0], batch.scores[i], atol=1e-6)
        assert faiss.omp_get_max_threads() == 3
    finally:
        faiss.omp_set_num_threads(before)


def test_factory_strings_and_bad_types() -> None:
    assert factory_string("auto", 1000, 512) == "Flat"
    assert factory_string("auto", 1_000_000, 512) == "HNSW32,Flat"
    assert factory_string("auto", 10_000_000, 512) == "IVF16384_HNSW32,SQ8"
    assert factory_string("ivf", 1_000_000, 512) == "IVF4096_HNSW32,Flat"
    assert factory_string("ivfpq", 100_000, 512) == "IVF1024,PQ128x4fs"
    assert factory_string("IVF64,SQ8", 1000, 512) == "IVF64,SQ8"
    assert factory_string("IDMap2,IVF64,SQ8", 1000, 512) == "IVF64,SQ8"
    with pytest.raises(UsageError):
        VectorIndex.create(8, "NoSuchIndex")


def test_auto_choice_thresholds() -> None:
    """Exact while a query scans <= EXACT_FLOATS floats, then HNSW (float32), IVF-SQ8, IVF-PQ by memory."""
    limit = EXACT_FLOATS // 512
    assert auto_type(limit, 512) == "flat" and auto_type(limit + 1, 512) == "hnsw"
    assert auto_type(2 * limit, 256) == "flat"  # the limit is in floats scanned, not vectors
    float_max = FLOAT_BYTES // (512 * 4)          # 2M vectors of 512 float32 = 4 GiB
    assert auto_type(float_max, 512) == "hnsw" and auto_type(float_max + 1, 512) == "ivfsq"
    sq_max = SQ8_BYTES // 512                     # 32M vectors of 512 bytes = 16 GiB
    assert auto_type(sq_max, 512) == "ivfsq" and auto_type(sq_max + 1, 512) == "ivfpq"
    # 10M x 512 -> 8-bit codes: ~5 GiB, comfortably inside 24 GiB
    assert auto_type(10_000_000, 512) == "ivfsq"
    assert factory_string("auto", 100_000, 512) == "HNSW32,Flat"


def test_nlist_is_a_power_of_two_so_growth_rarely_retypes() -> None:
    assert nlist_for(10) == 1 and nlist_for(4000) == 64 and nlist_for(20_000) == 512
    assert nlist_for(1_000_000) == 4096 and nlist_for(10_000_000) == 16384
    for n in (3_000, 77_777, 1_234_567, 9_999_999):
        assert nlist_for(n) & (nlist_for(n) - 1) == 0 and n // nlist_for(n) >= 39
    # adding photos to a 1M collection does not change the factory string (no rebuild)
    assert len({factory_string("ivfsq", n, 512) for n in range(900_000, 1_400_000, 10_007)}) == 1
    assert "_HNSW32" not in factory_string("ivf", 100_000, 512)   # 2048 lists from ~200k
    assert "_HNSW32" in factory_string("ivf", 300_000, 512)
    assert train_size(50_000) == 50_000 and train_size(1_000_000, "ivf") == 100_000
    assert train_size(10_000_000) == 8 * 16384


def clustered(n: int, d: int, seed: int, clusters: int = 50, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(clusters, d, seed + 1)
    x = centres[rng.integers(0, clusters, n)] + spread * unit(n, d, seed + 2) * rng.random((n, 1))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def anisotropic(n: int, d: int, seed: int, clusters: int = 100, spread: float = 0.75) -> np.ndarray:
    """Clusters whose variance falls off by direction like real embeddings' (bench_index_scale)."""
    rng = np.random.default_rng(seed)
    scale = np.sqrt(1.0 / np.arange(1, d + 1))
    scale /= np.linalg.norm(scale)
    centres = rng.standard_normal((clusters, d)) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)) * scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "ivfsq", "hnsw"])
def test_default_effort_recall_on_clustered_data(kind: str) -> None:
    """The default search effort keeps recall@10 >= 0.95 on clustered data (small and fast)."""
    both = anisotropic(20_050, 64, 10)
    vecs, q = both[:20_000], both[20_000:]  # queries from the same clusters, not in the index
    ids = np.arange(20_000, dtype=np.int64) * 3 + 7  # catalog-like ids, not positions
    index = VectorIndex.create(64, kind, expected=len(vecs), train=vecs[:train_size(len(vecs), kind, 64)])
    index.add(ids, vecs)
    assert default_effort(index._index) is not None
    got = index.search(q, 10).ids
    _, want = brute(vecs, ids, q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert overlap >= 0.95, overlap


def test_ivf_keeps_catalog_ids_itself_and_restricted_search_finds_k() -> None:
    vecs = clustered(5000, 32, 12)
    ids = np.arange(5000, dtype=np.int64) + 10**9
    index = VectorIndex.create(32, "ivf", expected=5000, train=vecs)
    index.add(ids, vecs)
    assert isinstance(index._index, faiss.IndexIVF)  # no IDMap2 around IVF
    np.testing.assert_array_equal(np.sort(index.ids()), ids)
    subset = ids[::250]  # 20 ids spread over many lists: the effort grows so all are reachable
    got = index.search(vecs[:3], 10, subset=subset)
    assert (got.ids >= 0).all() and set(got.ids.ravel()) <= set(subset)
    _, want = brute(vecs[::250], subset, vecs[:3], 10)
    np.testing.assert_array_equal(got.ids, want)
    assert index.remove(ids[:1000]) and index.ntotal == 4000
    assert not set(index.search(vecs[:1000:50], 1).ids.ravel()) & set(ids[:1000])
    got_ids, got_vecs = index.vectors()
    assert len(got_ids) == 4000 and got_vecs.shape == (4000, 32)


def test_hnsw_removal_marks_ids_dead_until_a_rebuild_is_due(tmp_path: Path) -> None:
    vecs = unit(300, 16, 13)
    ids = np.arange(300, dtype=np.int64) + 1000
    index = VectorIndex.create(16, "hnsw")
    index.add(ids, vecs)
    assert index.remove(ids[:30]) is True and index.ntotal == 270
    np.testing.assert_array_equal(np.sort(index.ids()), ids[30:])
    got = index.search(vecs[:30], 5)  # the removed vectors' own queries: never returned
    assert not set(got.ids.ravel()) & set(ids[:30]) and (got.ids >= 1030).all()
    _, want = brute(vecs[30:], ids[30:], vecs[:30], 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.ids, want)]) >= 0.95
    assert index.search(vecs[:2], 500).ids.shape == (2, 270)
    sub = index.search(vecs[:3], 3, subset=ids[:40])  # only ids 1030..1039 are left there
    assert set(sub.ids.ravel()) <= set(ids[30:40])
    index.add(np.array([5000]), vecs[:1])  # added after a removal: found again
    assert index.search(vecs[:1], 1).ids[0, 0] == 5000
    path = tmp_path / "h.faiss"
    index.save(path)
    for mmap in (False, True):
        again = VectorIndex.load(path, mmap=mmap)
        assert again.ntotal == 271 and 1000 not in set(again.ids())
        assert not set(again.search(vecs[:30], 5).ids.ravel()) & set(ids[:30])
    assert index.remove(ids[30:80]) is False and index.ntotal == 271  # > 20% dead: rebuild
    assert index.remove(np.zeros(0, np.int64)) is True
    assert index.remove(np.array([10**9])) is True  # unknown ids: nothing to do


def test_refine_factory_string_searches() -> None:
    vecs = clustered(3000, 32, 14)
    index = VectorIndex.create(32, "IVF16,SQ4,Refine(Flat)", expected=3000, train=vecs)
    index.add(np.arange(3000), vecs)
    got = index.search(vecs[:5], 3)
    np.testing.assert_array_equal(got.ids[:, 0], np.arange(5))
    sub = index.search(vecs[:2], 2, subset=np.arange(100, 200))
    assert set(sub.ids.ravel()) <= set(range(100, 200))


MAPPED_TYPES = ["flat", "hnsw", "ivf", "ivfsq", "ivfpq"]


def _saved(kind: str, tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    vecs = clustered(3000, 32, 15)
    ids = np.arange(3000, dtype=np.int64) * 2
    index = VectorIndex.create(32, kind, expected=3000, train=vecs)
    index.add(ids, vecs)
    path = tmp_path / f"{kind}.faiss"
    index.save(path)
    return path, ids, vecs


@pytest.mark.parametrize("kind", MAPPED_TYPES)
def test_mmap_load_searches_like_a_normal_load(kind: str, tmp_path: Path) -> None:
    path, ids, vecs = _saved(kind, tmp_path)
    whole, mapped = VectorIndex.load(path), VectorIndex.load(path, mmap=True)
    assert mapped.mapped and not whole.mapped
    assert mapped.description == whole.description and mapped.ntotal == 3000
    np.testing.assert_array_equal(np.sort(mapped.ids()), ids)
    a, b = whole.search(vecs[:20], 10), mapped.search(vecs[:20], 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


_CHILD = """
import sys, numpy as np
from pathlib import Path
from mmsearch.store.vectors import VectorIndex
path = Path(sys.argv[1])
before = path.read_bytes()
index = VectorIndex.load(path, mmap=True)
assert index.mapped
if sys.argv[2] == "replaced":  # another writer renamed a new file over it meanwhile
    other = VectorIndex.load(path)
    other.add(np.array([999_999]), np.ones((1, 32), np.float32) / 32 ** 0.5)
    other.save(path)
n = index.ntotal
rng = np.random.default_rng(0)
new = rng.standard_normal((2, 32)).astype(np.float32)
new /= np.linalg.norm(new, axis=1, keepdims=True)
index.add(np.array([10**7, 10**7 + 1]), new)   # a mapped FAISS index would abort here
assert not index.mapped and index.ntotal == n + 2, index.ntotal
assert list(index.search(new, 1).ids[:, 0]) == [10**7, 10**7 + 1]
assert index.remove(np.array([10**7])) and index.ntotal == n + 1
assert index.search(new[:1], 1).ids[0, 0] != 10**7
if sys.argv[2] == "same":
    assert path.read_bytes() == before  # the file itself is never written through the map
print("ok")
"""


@pytest.mark.parametrize("how", ["same", "replaced"])
@pytest.mark.parametrize("kind", MAPPED_TYPES)
def test_mmap_loaded_index_can_still_change(kind: str, how: str, tmp_path: Path) -> None:
    """add/remove on a mapped index first read it into memory (in a child: FAISS aborts otherwise)."""
    path, _, _ = _saved(kind, tmp_path)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), how], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_mmap_falls_back_and_reports_corruption(tmp_path: Path) -> None:
    path, _, _ = _saved("ivf", tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptIndexError):
        VectorIndex.load(path, mmap=True)


def test_old_idmap2_wrapped_ivf_files_still_load(tmp_path: Path) -> None:
    vecs = clustered(2000, 16, 16)
    inner = faiss.index_factory(16, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)
    inner.train(vecs)
    old = faiss.IndexIDMap2(inner)
    old.add_with_ids(vecs, np.arange(2000, dtype=np.int64) + 5)
    path = tmp_path / "old.faiss"
    faiss.write_index(old, str(path))
    for mmap in (False, True):
        index = VectorIndex.load(path, mmap=mmap)
        assert index.description == "IVF32,Flat" and not index.is_exact
        np.testing.assert_array_equal(np.sort(index.ids()), np.arange(2000) + 5)
        assert index.search(vecs[:3], 1).ids[:, 0].tolist() == [5, 6, 7]
    assert index.remove(np.array([5])) and index.ntotal == 1999


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "IVF32,Flat"])
def test_a_large_subset_is_searched_through_a_bitmap(index_type: str) -> None:
    """Subsets of BITMAP_MIN ids or more go to FAISS as a bitmap: only their ids come back,
    and for exact search they equal numpy over exactly the subset."""
    from mmsearch.store import vectors

    rng = np.random.default_rng(5)
    data = rng.standard_normal((12_000, 8)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(10, 12_010, dtype=np.int64)
    index = VectorIndex.create(8, index_type, expected=len(ids), train=data)
    index.add(ids, data)
    subset = np.sort(rng.choice(ids, vectors.BITMAP_MIN + 1000, replace=False))
    queries = data[:20] + 0.01
    got = index.search(queries, 10, subset=subset, effort=4096)
    assert np.isin(got.ids, subset).all()
    if index_type == "flat":
        rows = np.searchsorted(ids, subset)
        want = subset[np.argsort(-(queries @ data[rows].T), axis=1, kind="stable")[:, :10]]
        np.testing.assert_array_equal(got.ids, want)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "IVF32,Flat"])
def test_exclude_leaves_out_the_nearest_and_finds_k_past_them(index_type: str) -> None:
    """``exclude`` (how a search with videos ranks past the frames it has already kept):
    never returns an excluded id, still finds k when the excluded crowd the query's
    neighbourhood, and equals numpy over the rest for exact search; removed ids stay out."""
    rng = np.random.default_rng(6)
    crowd = unit(1, 16, 7) + rng.normal(0, 0.02, (3000, 16)).astype(np.float32)  # one video
    data = np.concatenate([crowd / np.linalg.norm(crowd, axis=1, keepdims=True),
                           unit(9000, 16, 8)])
    ids = np.arange(1, len(data) + 1, dtype=np.int64)
    index = VectorIndex.create(16, index_type, expected=len(ids), train=data)
    index.add(ids, data)
    index.remove(ids[-10:])
    query = data[:1]
    exclude = ids[:3000]
    got = index.search(query, 10, exclude=exclude)
    assert (got.ids >= 0).all() and not np.isin(got.ids, exclude).any()
    assert not np.isin(got.ids, ids[-10:]).any()
    rest = np.arange(3000, len(ids) - 10)
    _, want = brute(data[rest], ids[rest], query, 10)
    if index_type == "flat":
        np.testing.assert_array_equal(got.ids, want)
    else:
        assert len(set(got.ids[0]) & set(want[0])) >= 7
    sub = index.search(query, 5, subset=ids[2990:3100], exclude=exclude)
    assert set(sub.ids[0]) <= set(ids[3000:3100])
