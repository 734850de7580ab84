"""The SQLite catalog: schema versions, migrations, transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from mmsearch.catalog import SCHEMA_VERSION, Catalog, StoredImage
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
    rows = [StoredImage(1, "/a/x.jpg", 1, 1, "h1"), StoredImage(2, "/a/b/y.jpg", 1, 1, "h2"),
            StoredImage(3, "/ab/z.jpg", 1, 1, "h1"), StoredImage(4, "/a", 1, 1, "h3")]
    cat.commit_images({"h1": v[0], "h2": v[1], "h3": v[2]}, rows)
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
