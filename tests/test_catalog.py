"""The SQLite catalog: schema versions, migrations, transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mmsearch.store.catalog import SCHEMA_VERSION, Catalog, ImageFile, StoredImage
from mmsearch.errors import CorruptIndexError


def test_new_catalog_is_at_the_current_schema(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", create=True)
    assert cat.schema_version == SCHEMA_VERSION
    cat.close()
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"meta", "images", "embeddings", "texts"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_empty_file_is_migrated_and_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    sqlite3.connect(path).close()  # version 0: an empty database
    Catalog(path, create=False).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(CorruptIndexError, match="upgrade mmsearch"):
        Catalog(path, create=False)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptIndexError, match="not a readable SQLite"):
        Catalog(path, create=False)


def test_rows_vectors_and_subtrees(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite", create=True)
    v = np.eye(4, dtype=np.float32)
    rows = [ImageFile("/a/x.jpg", 1, 1, "h1"), ImageFile("/a/b/y.jpg", 1, 1, "h2"),
            ImageFile("/ab/z.jpg", 1, 1, "h1"), ImageFile("/a", 1, 1, "h3")]
    ids = cat.commit_images({"h1": v[0], "h2": v[1], "h3": v[2]}, rows)
    assert list(ids) == [1, 2, 3, 4]  # fresh ids, given inside the transaction
    assert set(cat.images_under("/a")) == {"/a/x.jpg", "/a/b/y.jpg", "/a"}
    assert set(cat.images_under("/a/")) == {"/a/x.jpg", "/a/b/y.jpg", "/a"}
    ids, vecs = cat.image_vectors(4)
    assert list(ids) == [1, 2, 3, 4]
    np.testing.assert_array_equal(vecs[2], v[0])  # the duplicate shares its vector
    cat.commit_images({}, [], delete_ids=np.array([1, 3]))
    assert cat.drop_orphan_embeddings() == 1 and cat.embedding_count() == 2
    cat.touch_images([StoredImage(2, "/a/b/y.jpg", 9, 9, "h2")])
    assert cat.images_under("/a/b")["/a/b/y.jpg"].size == 9
    assert cat.images_under("/a")["/a"].size == 1  # the update touched only its row
    cat.close()


def test_rebuild_reads_the_catalog_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked reads cover every vector once, in id order, across gaps; the rebuilt
    indexes (exact, and IVF trained on a sample) hold exactly the catalog's vectors."""
    from mmsearch.store import vectorfiles as store_module
    from mmsearch.models import ModelIdentity
    from mmsearch.store import Store

    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((2_500, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = Store.open(tmp_path / "idx", create=True)
    store.lock()
    store.set_model(ModelIdentity("x", "none", "none"), 16)
    rows = [ImageFile(f"/p/{i}.jpg", 1, 1, f"h{i}") for i in range(len(vecs))]
    np.testing.assert_array_equal(store.put_images(rows, vecs), np.arange(1, len(vecs) + 1))
    store.forget_images(np.arange(100, 400))  # a gap in the ids
    store.put_texts([(f"k{i}", f"text {i}", vecs[i]) for i in range(150)])
    want_ids, want = store.image_vectors()

    chunks = list(store.read.vector_chunks("images", 16, size=97))
    assert max(len(i) for i, _ in chunks) == 97
    np.testing.assert_array_equal(np.concatenate([i for i, _ in chunks]), want_ids)
    np.testing.assert_array_equal(np.vstack([v for _, v in chunks]), want)
    assert sum(len(i) for i, _ in store.read.vector_chunks("texts", 16, size=40)) == 150

    monkeypatch.setattr(store_module, "REBUILD_CHUNK", 97)
    flat = store.rebuild("images", index_type="flat")
    got_ids, got = flat.vectors()
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got, want)
    ivf = store.rebuild("images", index_type="ivf")
    assert not ivf.is_exact
    np.testing.assert_array_equal(np.sort(ivf.ids()), want_ids)
    hits = ivf.search(want[:50], 1, effort=1 << 20)  # every list probed: exact
    np.testing.assert_array_equal(hits.ids[:, 0], want_ids[:50])
    assert store.rebuild("texts").ntotal == 150
    store.close()


def test_compressed_indexes_are_reranked_with_the_catalogs_exact_vectors(tmp_path: Path) -> None:
    """IVF-PQ with tiny codes ranks poorly by itself; the engine re-scores a pool of its
    candidates from the catalog, so hits carry exact cosines and the top 10 matches a
    numpy brute-force search far more often."""
    from mmsearch.models import ModelIdentity
    from mmsearch.search import search_images
    from mmsearch.store import Store

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((30, 16))
    vecs = (centres[rng.integers(0, 30, 3_000)] + 0.4 * rng.standard_normal((3_000, 16)))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    store = Store.open(tmp_path / "idx", create=True)
    store.lock()
    store.set_model(ModelIdentity("x", "none", "none"), 16)
    store.put_images([ImageFile(f"/p/{i}.jpg", 1, 1, f"h{i}") for i in range(len(vecs))], vecs)
    index = store.rebuild("images", index_type="IVF16,PQ4x4fs")
    assert index.is_compressed and not store.rebuild("images", index_type="flat").is_compressed
    store.rebuild("images", index_type="IVF16,PQ4x4fs")

    queries = vecs[rng.choice(len(vecs), 40, replace=False)] + 0.05 * rng.standard_normal((40, 16))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    truth = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :10] + 1  # ids start at 1
    raw = index.search(queries, 10, effort=16)
    hits = search_images(store, queries, 10)

    def recall(found: np.ndarray) -> float:
        return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))

    got = np.array([[h.id for h in row] for row in hits])
    assert recall(got) >= 0.95 > recall(raw.ids) + 0.2
    for q, row in zip(queries, hits):  # exact cosines, best first
        scores = [h.score for h in row]
        np.testing.assert_allclose(scores, [float(q @ vecs[h.id - 1]) for h in row], atol=1e-5)
        assert scores == sorted(scores, reverse=True)
    with sqlite3.connect(store.read.path) as db:  # damage a stored vector the pool holds
        db.execute("UPDATE embeddings SET vector = x'00' WHERE content_hash = ?",
                   (f"h{hits[0][0].id - 1}",))
    again = search_images(store, queries[:1], 10)[0]  # the index's own ranking, not an error
    assert len(again) == 10 and [h.rank for h in again] == list(range(1, 11))
    store.close()
