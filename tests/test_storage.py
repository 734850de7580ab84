"""An index stored as shards, at the store's level (no model, no Ray): vectors read from npy
files through the catalog's locations, the same answers as the catalog storage, damage found.

``tests/test_ray.py`` covers the storage end to end (a distributed run, killed and resumed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import CorruptIndexError, StorageError
from mmsearch.models.identity import ModelIdentity
from mmsearch.search import search_images
from mmsearch.store import ImageFile, InShards, Store
from mmsearch.store.shardvectors import FOLDER, as_stored, npy_path, write_npy

DIM, SHARD = 16, 10
IDENTITY = ModelIdentity("test", "synthetic", "test:synthetic")


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


PHOTOS: list[Path] = []  # the folder the rows' paths are in (made by the fixture)


def _files(k: int, n: int = SHARD) -> list[ImageFile]:
    return [ImageFile(str(PHOTOS[0] / f"{k}-{j}.jpg"), 100 + j, 10**18 + j, f"hash-{k}-{j}",
                      {"taken_source": "mtime"}) for j in range(n)]


def _store(root: Path, storage: str) -> Store:
    store = Store.open(root, create=True)
    store.lock()
    store.set_model(IDENTITY, DIM, storage)
    return store


def _put_shard(store: Store, k: int, vectors: np.ndarray, files: list[ImageFile] | None = None) -> np.ndarray:
    files = files or _files(k, len(vectors))
    write_npy(npy_path(store.root / FOLDER, k), vectors)
    return store.put_images(files, store.vector_source.rows(k, range(len(vectors)), as_stored(vectors)))


@pytest.fixture
def pair(tmp_path: Path):
    """The same 30 rows stored in the catalog and as shards (3 npy files)."""
    PHOTOS[:] = [tmp_path / "photos"]
    PHOTOS[0].mkdir()
    for k in range(10):
        for j in range(SHARD):
            (PHOTOS[0] / f"{k}-{j}.jpg").touch()  # the paths exist (check looks)
    plain, sharded = _store(tmp_path / "plain", "catalog"), _store(tmp_path / "sharded", "shards")
    for k in range(3):
        v = _vectors(SHARD, k)
        plain.put_images(_files(k), as_stored(v))
        _put_shard(sharded, k, v)
    for s in (plain, sharded):
        s.flush()
    yield plain, sharded
    plain.close()
    sharded.close()


def test_the_shards_give_the_catalogs_vectors_and_answers(pair) -> None:
    plain, sharded = pair
    assert (plain.storage, sharded.storage) == ("catalog", "shards")
    a, b = plain.image_vectors(), sharded.image_vectors()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(sharded.image_vectors([3, 27, 14])[1], a[1][[2, 13, 26]])
    assert list(sharded.read.vector_chunks("images", DIM, 7))[-1][0].tolist() == [29, 30]
    known = sharded.known_vectors(["hash-1-4", "nope"])
    assert list(known) == ["hash-1-4"] and np.array_equal(known["hash-1-4"], a[1][14])
    query = _vectors(2, 99)
    for x, y in zip(search_images(plain, query, 5), search_images(sharded, query, 5)):
        assert [(h.id, h.score) for h in x] == [(h.id, h.score) for h in y]
    sharded.rebuild("images", index_type="IVF2,SQ4")  # compressed: re-ranked from the shards
    plain.rebuild("images", index_type="IVF2,SQ4")
    for x, y in zip(search_images(plain, query, 5), search_images(sharded, query, 5)):
        assert [h.id for h in x] == [h.id for h in y]
        np.testing.assert_allclose([h.score for h in x], [h.score for h in y], atol=1e-6)
    assert sharded.check() == [] and plain.check() == []


def test_the_catalog_holds_no_vector_and_the_storage_is_enforced(pair) -> None:
    plain, sharded = pair
    with sharded.read.connect() as conn:
        rows = conn.exec_driver_sql("SELECT length(vector), shard, shard_row FROM embeddings").all()
    assert len(rows) == 3 * SHARD and {r[0] for r in rows} == {0} and {r[1] for r in rows} == {0, 1, 2}
    with pytest.raises(StorageError, match="keeps its vectors in its shards"):
        sharded.put_images(_files(9), _vectors(SHARD, 9))
    with pytest.raises(StorageError, match="keeps its vectors in its catalog"):
        plain.put_images(_files(9), InShards(_vectors(SHARD, 9), [(9, j) for j in range(SHARD)]))
    parts = list(sharded.read.shard_locations())
    assert [(k, ids.tolist()[:2], rows.tolist()[:2]) for k, ids, rows in parts] == \
        [(0, [1, 2], [0, 1]), (1, [11, 12], [0, 1]), (2, [21, 22], [0, 1])]
    assert sharded.read.shard_count() == 3 and list(plain.read.shard_locations()) == []


def test_a_known_content_keeps_its_location_and_prune_drops_orphans(pair) -> None:
    _, sharded = pair
    copy = ImageFile(str(PHOTOS[0] / "9-0.jpg"), 100, 1, "hash-0-3", {"taken_source": "mtime"})  # the content of id 4
    new = _put_shard(sharded, 3, _vectors(1, 3) * 0 + sharded.image_vectors([4])[1],
                     files=[copy])
    with sharded.read.connect() as conn:
        where = conn.exec_driver_sql("SELECT shard, shard_row FROM embeddings "
                                     "WHERE content_hash = 'hash-0-3'").all()
    assert where == [(0, 3)]  # the first location stands
    np.testing.assert_array_equal(sharded.image_vectors(new)[1], sharded.image_vectors([4])[1])
    sharded.forget_images(np.arange(11, 21))
    assert sharded.prune() == SHARD and sharded.read.shard_count() == 2


def test_writes_inside_a_deferred_index_touch_the_catalog_only(pair) -> None:
    _, sharded = pair
    sharded.vectors("images")  # loaded
    with sharded.image_index_deferred():
        _put_shard(sharded, 3, _vectors(SHARD, 3))
        sharded.forget_images(np.asarray([1, 2]))
        assert "images" not in sharded._files._loaded  # the driver holds no vectors
    index = sharded.vectors("images")
    assert index.ntotal == 3 * SHARD + SHARD - 2 and sharded.repairs == []
    assert sorted(index.ids().tolist()) == sorted(sharded.read.all_image_ids().tolist())
    assert sharded.check() == []


def test_a_lost_or_damaged_shard_is_found(pair, tmp_path: Path) -> None:
    _, sharded = pair
    path = npy_path(sharded.root / FOLDER, 1)
    bad = np.load(path).astype(np.float32)
    bad[4] = np.nan
    write_npy(path, bad)
    assert sharded.check() == ["1 image vectors cannot be read from their npy shards "
                               "(shards/img_emb: a missing, short or damaged file)"]
    npy_path(sharded.root / FOLDER, 2).unlink()
    with pytest.raises(CorruptIndexError, match="img_emb_2.npy is missing: run `mmsearch check`"):
        sharded.image_vectors([25])
    assert sharded.check()[0].startswith(f"{1 + SHARD} image vectors cannot be read")
    redo, _ = sharded.repair()
    assert len(redo) == 1 + SHARD  # forgotten, for the caller to embed again
    assert sharded.read.image_count() == 3 * SHARD - 1 - SHARD and sharded.check() == []


def test_reading_shards_by_pread_and_by_map_agree_and_damage_is_typed(tmp_path: Path) -> None:
    from mmsearch.store.shardvectors import MAPPED_ROWS, ShardVectors

    reader = ShardVectors(tmp_path)
    v = _vectors(3 * MAPPED_ROWS, 5)
    write_npy(reader.path(0), v)
    write_npy(reader.path(1), v[:0])  # every file of a shard failed: no vectors
    rows = np.random.default_rng(0).permutation(len(v))
    want = as_stored(v)[rows]
    np.testing.assert_array_equal(reader.gather(np.zeros(len(rows)), rows, DIM), want)  # mapped
    few = rows[:5]
    np.testing.assert_array_equal(reader.gather(np.zeros(5), few, DIM), want[:5])  # pread
    assert reader.gather(np.ones(0), np.ones(0), DIM).shape == (0, DIM)
    with pytest.raises(CorruptIndexError, match="holds 768 vectors; the catalog points to row 900"):
        reader.gather(np.zeros(1), np.asarray([900]), DIM)
    with pytest.raises(CorruptIndexError, match=r"not \(n, 32\) vectors"):
        reader.gather(np.zeros(1), np.asarray([1]), 32)
    data = reader.path(0).read_bytes()
    reader.path(0).write_bytes(data[:-100])
    with pytest.raises(CorruptIndexError, match="img_emb_0.npy is truncated"):
        reader.gather(np.zeros(1), np.asarray([0]), DIM)
    assert reader.damaged(np.asarray([0, 1, 2]), np.asarray([0, 0, 0]), DIM).tolist() == [True] * 3


def test_a_shard_read_whole_gives_the_stores_unit_vectors(tmp_path: Path) -> None:
    """read_npy (commits from files, builds from shard folders) reads rows as the store does."""
    from mmsearch.distributed.shards import read_npy
    from mmsearch.store.shardvectors import ShardVectors

    reader = ShardVectors(tmp_path)
    v = _vectors(40, 6) * np.linspace(0.5, 2.0, 40, dtype=np.float32)[:, None]
    write_npy(reader.path(0), v)  # float16 rows of lengths 0.5 to 2
    assert np.abs(np.linalg.norm(np.load(reader.path(0)).astype(np.float32), axis=1) - 1).max() > 0.4
    got = read_npy(reader.path(0))
    assert got.dtype == np.float32 and got.shape == (40, DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(got, reader.gather(np.zeros(40), np.arange(40), DIM))


def test_a_deferred_write_cut_short_is_caught_up_on_the_next_load(pair) -> None:
    _, sharded = pair
    with pytest.raises(KeyboardInterrupt):
        with sharded.image_index_deferred():
            _put_shard(sharded, 3, _vectors(SHARD, 3))
            raise KeyboardInterrupt
    assert sharded.vectors("images").ntotal == 4 * SHARD  # synced from the catalog on load
    assert sharded.repairs and sharded.check() == []


def test_a_cluster_builds_parts_read_the_stores_vectors(pair) -> None:
    """The parts a cluster build adds (read where they are built) hold the store's vectors:
    chunks sent along from the catalog, or a shard's rows read from its npy file."""
    plain, sharded = pair
    want = plain.image_vectors()
    for store, size, count in ((plain, 7, 5), (sharded, 7, 3)):
        total, parts = store.read.image_parts(DIM, size)
        read = [part.read() for part in parts]
        assert total == len(read) == count
        ids = np.concatenate([i for i, _ in read])
        np.testing.assert_array_equal(np.sort(ids), want[0])
        np.testing.assert_array_equal(np.concatenate([v for _, v in read])[np.argsort(ids)], want[1])
    assert [n for n, _, _ in sharded.files()][-1] == "shards/img_emb"
    assert "shards/img_emb" not in [n for n, _, _ in plain.files()]


def test_the_image_index_plan_says_whether_it_is_built(pair) -> None:
    plain, _ = pair
    plan, built = plain.image_index_plan()
    assert (plan.factory, plan.n, plan.is_exact, built) == ("Flat", 3 * SHARD, True, True)
    assert plain.training_sample(plan) is None
    ivf, built = plain.image_index_plan("IVF2,SQ4")
    assert not built and not ivf.is_exact
    sample = plain.training_sample(ivf)
    assert sample.shape == (3 * SHARD, DIM)  # all of them: fewer than the plan's train size
    plain.rebuild("images", index_type="IVF2,SQ4")
    assert plain.image_index_plan("IVF2,SQ4")[1] and not plain.image_index_plan()[1]
    plain.retype()  # auto: exact again
    assert plain.image_index == "Flat" and plain.image_index_plan()[1]


def test_the_storage_of_a_run_is_chosen_in_one_place() -> None:
    from mmsearch.errors import UsageError
    from mmsearch.store import storage_for_run, storage_summary

    assert storage_for_run(None, "local", "auto", "new") == "catalog"
    assert storage_for_run(None, "ray", "auto", "new") == "shards"
    assert storage_for_run(None, "ray", "catalog", "new") == "catalog"
    assert storage_for_run("catalog", "ray", "auto", "old") == "catalog"
    assert storage_for_run("shards", "ray", "shards", "old") == "shards"
    with pytest.raises(UsageError, match="--storage shards needs --runner ray"):
        storage_for_run(None, "local", "shards", "new")
    with pytest.raises(UsageError, match="index 'old' keeps its vectors in its catalog, and always will"):
        storage_for_run("catalog", "ray", "shards", "old")
    with pytest.raises(UsageError, match="index 'old' keeps its vectors in npy shards"):
        storage_for_run("shards", "local", "auto", "old")
    with pytest.raises(UsageError, match="unknown storage 'disk'"):
        storage_for_run(None, "local", "disk", "new")
    assert storage_summary("catalog") is None and "shards/img_emb" in storage_summary("shards")


def test_a_reader_opened_before_the_storage_was_recorded_sees_it_after_refresh(tmp_path: Path) -> None:
    writer = Store.open(tmp_path / "new", create=True)
    reader = Store.open(tmp_path / "new", create=False)
    try:
        assert reader.storage == "catalog" and writer.storage == "catalog"  # nothing recorded yet
        writer.lock()
        writer.set_model(IDENTITY, DIM, "shards")
        assert writer.storage == "shards" and writer.read.storage == "shards"
        assert reader.refresh() and reader.storage == "shards"
        assert [name for name, _, _ in reader.files()] == ["catalog.sqlite"]  # no shard yet
    finally:
        writer.close()
        reader.close()


def test_a_root_under_a_recorded_root_is_not_recorded_again(tmp_path: Path) -> None:
    """A watcher's batches index subfolders of a root time after time: the recorded roots
    do not grow with them."""
    store = Store.open(tmp_path / "idx", create=True)
    try:
        store.lock()
        store.add_roots(["/photos", "/other/a.jpg"])
        store.add_roots(["/photos/2024", "/photos", "/other/a.jpg", "/photos 2", "/other/b.jpg"])
        assert store.roots == ["/other/a.jpg", "/other/b.jpg", "/photos", "/photos 2"]
    finally:
        store.close()
