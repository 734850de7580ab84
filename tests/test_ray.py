"""`mmsearch index --runner ray` on a local Ray: the local runner's index, shards, resumes.

One Ray for the module (4 logical CPUs, no dashboard, a small object store), the tiny
test model and a few dozen real Flickr photos. The Ray run (an index stored as shards:
vectors in the npy files, rows in the catalog) is killed, as a driver dies, once its
first shard is stored and its second shard's files are written but not committed, and
run again, losing one embedding worker on the way; what it ends with is compared with
the local runner's index of the same photos. The photos read from a file:// URL go into
an index stored in the catalog, whose vectors are the local runner's to 1e-5.
Skipped only when Ray Data (or pyarrow) is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mmsearch[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'mmsearch[ray]')")
pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'mmsearch[ray]')")

from mmsearch import Engine, Query  # noqa: E402
from mmsearch.distributed import run as ray_run  # noqa: E402
from mmsearch.distributed.ray_runner import FAULT_ENV  # noqa: E402
from mmsearch.distributed.shards import FOLDER, ShardLayout, read_table  # noqa: E402
from mmsearch.ingest.run import IndexReport  # noqa: E402
from mmsearch.store.shardvectors import as_stored  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own
N_PHOTOS = 24
SHARD_SIZE = 8   # 24 photos + 3 hostile files: shards of 8, 8, 8 and 3 rows
HOSTILE = {"zz_empty.jpg": b"", "zz_garbage.jpg": b"this is not a picture"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray; yields the fault file that, when it exists, kills one embed worker."""
    fault = tmp_path_factory.mktemp("fault") / "kill-one-worker"
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20,
             logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {FAULT_ENV: str(fault)}})
    yield fault
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, flickr_images: list[Path]) -> Path:
    """Real photos, then (sorting last) an empty, a garbage and a truncated file."""
    folder = tmp_path_factory.mktemp("photos")
    for src in flickr_images[:N_PHOTOS]:
        shutil.copy(src, folder / src.name)
    for name, data in HOSTILE.items():
        (folder / name).write_bytes(data)
    (folder / "zz_truncated.jpg").write_bytes(flickr_images[N_PHOTOS].read_bytes()[:4000])
    return folder


def _open(home: Path, name: str, model: tuple[Path, Path]) -> Engine:
    return Engine.open(name, home=home, model=str(model[0]), pretrained=str(model[1]))


class _DriverKilled(BaseException):
    """Stands for the driver dying: nothing of the run is cleaned up or finished."""


def _die_committing(shard: int):
    """``_Work._commit`` that kills the driver before committing ``shard`` (its files are
    written: an index stored as shards writes them first)."""
    commit = ray_run._Work._commit

    def dying(self, k, rows, stored=None):
        if k == shard:
            raise _DriverKilled
        return commit(self, k, rows, stored)
    return dying


@dataclass
class Built:
    local: Engine
    dist: Engine
    local_report: IndexReport
    report: IndexReport          # the resumed Ray run's
    killed_shards: list[int]     # with their files written when the driver died
    killed_files: dict[int, int]  # their npy files' mtimes then
    committed_then: int          # image rows in the catalog then
    embed_total: int             # rows the resumed run sent to the cluster
    worker_killed: bool


@pytest.fixture(scope="module")
def built(cluster: Path, photos: Path, tiny_model: tuple[Path, Path],
          tmp_path_factory: pytest.TempPathFactory):
    """The photos indexed locally, and by Ray: killed committing shard 1, then resumed."""
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    patch.setattr(ray_run, "SHARD_SIZE", SHARD_SIZE)
    with _open(home, "local", tiny_model) as local, _open(home, "ray", tiny_model) as dist:
        local_report = local.index([photos])
        with pytest.MonkeyPatch.context() as dying:
            dying.setattr(ray_run._Work, "_commit", _die_committing(1))
            with pytest.raises(_DriverKilled):
                dist.index([photos], runner="ray")
        layout = ShardLayout(dist.store.root / FOLDER)
        done = layout.numbers("status")
        assert layout.run_file.exists()
        mtimes = {k: layout.npy(k).stat().st_mtime_ns for k in done}
        committed = dist.store.read.image_count()
        seen: list[tuple[str, int, int]] = []
        cluster.touch()  # armed: the first embed call removes it and kills its worker
        report = dist.index([photos], runner="ray", progress=lambda *a: seen.append(a))
        total = max(t for s, _, t in seen if s == "embed")
        yield Built(local, dist, local_report, report, done, mtimes, committed, total,
                    not cluster.exists())
    patch.undo()


def _by_path(engine: Engine) -> dict[str, tuple[int, np.ndarray]]:
    ids, vectors = engine.store.image_vectors()
    paths = engine.store.read.image_paths(ids)
    return {paths[int(i)]: (int(i), v) for i, v in zip(ids, vectors)}


def _same_ranking(local: Engine, other: Engine, query, atol: float) -> None:
    """Every photo scores the same to ``atol``, and the order agrees wherever the local
    scores of neighbours differ by more than twice that."""
    a, b = local.search(query, k=N_PHOTOS), other.search(query, k=N_PHOTOS)
    scores = {h.path: h.score for h in b}
    assert set(scores) == {h.path for h in a}
    np.testing.assert_allclose([scores[h.path] for h in a], [h.score for h in a], atol=atol)
    for i in range(1, len(a)):
        if a[i - 1].score - a[i].score > 2 * atol:
            assert scores[a[i - 1].path] > scores[a[i].path]


def test_same_ids_vectors_and_top_k_as_the_local_runner(built: Built) -> None:
    """Stored as shards: the vectors are the local runner's through float16."""
    want, got = _by_path(built.local), _by_path(built.dist)
    assert len(want) == N_PHOTOS and sorted(got) == sorted(want)
    assert {p: i for p, (i, _) in got.items()} == {p: i for p, (i, _) in want.items()}
    for path, (_, vector) in want.items():
        np.testing.assert_allclose(got[path][1], as_stored(vector[None])[0], atol=1e-7)
        assert abs(np.linalg.norm(got[path][1]) - 1) < 1e-6
        np.testing.assert_allclose(got[path][1], vector, atol=1e-3)
    photo = next(iter(want))
    for query in ("a red circle", "a dog running on grass", Query.image(photo)):
        _same_ranking(built.local, built.dist, query, atol=2e-3)


def test_the_catalog_keeps_rows_and_the_shards_keep_the_vectors(built: Built) -> None:
    import sqlite3
    from contextlib import closing

    store = built.dist.store
    assert store.storage == "shards" and built.dist.info().storage == "shards"
    with closing(sqlite3.connect(store.root / "catalog.sqlite")) as db:
        rows = db.execute("SELECT length(vector), shard, shard_row FROM embeddings").fetchall()
    assert len(rows) == N_PHOTOS and all(n == 0 and k in (0, 1, 2) for n, k, _ in rows)
    layout = ShardLayout(store.root / FOLDER)
    for k in (0, 1, 2):
        meta = read_table(layout.metadata(k))
        ids, stored = store.image_vectors([m["id"] for m in meta])
        np.testing.assert_array_equal(stored, as_stored(np.load(layout.npy(k))))
    assert "shards/img_emb" in built.dist.info().files
    assert built.dist.check() == ([], [])
    assert built.local.info().storage == "catalog"


def test_the_storage_is_kept_and_the_local_runner_refused(built: Built, photos: Path,
                                                         tiny_model) -> None:
    from mmsearch.errors import UsageError

    with pytest.raises(UsageError, match=r"made by --runner ray\): index it with --runner ray"):
        built.dist.index([photos])
    with pytest.raises(UsageError, match="keeps its vectors in its shards, and always will"):
        built.dist.index([photos], runner="ray", storage="catalog")
    with pytest.raises(UsageError, match="keeps its vectors in its catalog, and always will"):
        built.local.index([photos], storage="shards")
    with pytest.raises(UsageError, match="unknown storage 'disk'"):
        built.local.index([photos], storage="disk")
    with _open(built.local.store.root.parent, "new", tiny_model) as fresh:
        with pytest.raises(UsageError, match="--storage shards needs --runner ray"):
            fresh.index([photos], storage="shards")
        assert fresh.store.model is None  # nothing was recorded


def test_an_index_stored_as_shards_is_rebuilt_reranked_checked_and_repaired(
        built: Built, tiny_model, tmp_path: Path) -> None:
    """On a copy: FAISS built from the shards (in one process and on the cluster), a
    compressed index re-ranked with the shards' vectors, a lost npy file found and repaired."""
    from mmsearch.distributed.build import build_store_index
    from mmsearch.search import search_images

    shutil.copytree(built.dist.store.root, tmp_path / "copy")
    with _open(tmp_path, "copy", tiny_model) as engine:
        store = engine.store
        ids, vectors = store.image_vectors()
        single = store.build_index("images", "IVF4,Flat")
        store.lock()
        try:
            assert build_store_index(store, "IVF4,Flat", lambda: ray)
            a, b = single.search(vectors[:6], 5), store.vectors("images").search(vectors[:6], 5)
            assert (a.ids == b.ids).all() and store.image_index == "IVF4,Flat"
            store.rebuild("images", index_type="IVF4,SQ4")  # compressed: hits are re-ranked
            hits = search_images(store, vectors[:1], 5)[0]
            exact = dict(zip(ids.tolist(), (vectors @ vectors[0]).tolist()))
            np.testing.assert_allclose([h.score for h in hits], [exact[h.id] for h in hits],
                                       atol=1e-6)
            assert hits[0].id == ids[0]
        finally:
            store.unlock()
        ShardLayout(store.root / FOLDER).npy(1).unlink()
        problems, _ = engine.check()
        assert problems == [f"{SHARD_SIZE} image vectors cannot be read from their npy shards "
                            "(shards/img_emb: a missing, short or damaged file)"]
        _, done = engine.check(repair=True)
        assert any("--runner ray" in d for d in done)
        assert engine.info().images == N_PHOTOS - SHARD_SIZE and engine.check() == ([], [])


def test_a_killed_driver_resumes_only_the_missing_shards(built: Built) -> None:
    """Shard 0 was stored, shard 1's files written but not committed: the re-run commits
    shard 1 from its files (nothing embedded again) and sends only shards 2 and 3."""
    layout = ShardLayout(built.dist.store.root / FOLDER)
    assert built.killed_shards == [0, 1] and built.committed_then == SHARD_SIZE
    assert built.embed_total == N_PHOTOS + len(HOSTILE) + 1 - 2 * SHARD_SIZE
    r = built.report
    assert (r.added, r.embedded, r.unchanged, r.updated, r.removed) == (16, 16, 8, 0, 0)
    assert {k: layout.npy(k).stat().st_mtime_ns for k in (0, 1)} == built.killed_files
    assert layout.numbers("status") == [0, 1, 2, 3] and not layout.run_file.exists()
    ids = built.dist.store.read.all_image_ids()
    assert sorted(ids.tolist()) == list(range(1, N_PHOTOS + 1))


def test_a_killed_worker_was_retried_with_nothing_lost(built: Built) -> None:
    assert built.worker_killed, "the armed fault file was not used: no worker was killed"
    assert built.dist.store.read.image_count() == N_PHOTOS  # and the vectors are the local ones


def test_hostile_files_are_reported_as_the_local_runner_reports_them(built: Built) -> None:
    assert sorted((s.path, s.reason) for s in built.report.skipped) == \
        sorted((s.path, s.reason) for s in built.local_report.skipped)
    assert len(built.report.skipped) == len(HOSTILE) + 1


def test_shards_are_in_clip_retrievals_layout(built: Built) -> None:
    layout = ShardLayout(built.dist.store.root / FOLDER)
    for k in (0, 1, 2):
        vectors, meta = np.load(layout.npy(k)), read_table(layout.metadata(k))
        assert vectors.dtype == np.float16 and vectors.shape == (SHARD_SIZE, built.dist.store.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1,
                                   atol=2e-3)
        ids, stored = built.local.store.image_vectors([m["id"] for m in meta])
        assert [m["id"] for m in meta] == ids.tolist()
        np.testing.assert_allclose(vectors, stored, atol=2e-3)
        assert {"image_path", "id", "size", "mtime_ns", "content_hash", "width"} <= set(meta[0])
    assert np.load(layout.npy(3)).shape == (0, built.dist.store.dim)
    assert [r["status"] for r in read_table(layout.status(3))] == ["failed"] * 3
    assert not layout.numbers("manifest")


def test_the_index_serves_queries_like_a_local_one(built: Built, tiny_model, photos: Path) -> None:
    with _open(built.dist.store.root.parent, "ray", tiny_model) as engine:
        hits = engine.search("a photo of a dog", k=5)
        assert len(hits) == 5 and all(Path(h.path).parent == photos for h in hits)
        photo = str(sorted(photos.glob("*.jpg"))[3].resolve())
        assert str(engine.search(image=photo, k=1)[0].path) == photo
        assert engine.search(Query.id(hits[0].id), k=1)[0].id == hits[0].id
        assert engine.info().images == N_PHOTOS


def test_a_rerun_handles_touched_changed_and_deleted_files(built: Built, photos: Path) -> None:
    """Last: it changes the photos folder."""
    names = sorted(p.name for p in photos.glob("*.jpg") if not p.name.startswith("zz_"))
    touched, changed, gone = (photos / names[i] for i in (0, 1, 2))
    before = _by_path(built.dist)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    changed.write_bytes((photos / names[-1]).read_bytes())
    gone.unlink()
    report = built.dist.index([photos], runner="ray")
    assert (report.added, report.updated, report.removed, report.unchanged) == \
        (0, 1, 1, N_PHOTOS - 3 + 1)
    after = _by_path(built.dist)
    assert len(after) == N_PHOTOS - 1 and str(gone) not in after
    assert after[str(touched)][0] == before[str(touched)][0]
    assert after[str(changed)][0] > max(i for i, _ in before.values())
    np.testing.assert_allclose(after[str(changed)][1], after[str(photos / names[-1])][1],
                               atol=1e-3)  # (both through float16)
    assert len(report.skipped) == len(HOSTILE) + 1  # tried again, as locally


def test_an_ivf_index_built_on_the_cluster_is_the_one_process_build(built: Built) -> None:
    """Trained on the driver, filled in Ray tasks, merged: the same search results."""
    from mmsearch.distributed.build import CHUNK, build_store_index

    store = built.local.store
    single = store.build_index("images", "IVF4,Flat")
    queries = store.image_vectors()[1][:6]
    store.lock()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("mmsearch.distributed.build.CHUNK", 7)  # four parts
            assert build_store_index(store, "IVF4,Flat", lambda: ray)
        assert CHUNK > 7 and not build_store_index(store, "IVF4,Flat", lambda: ray)  # built
    finally:
        store.unlock()
    served = store.vectors("images")
    assert served.description == "IVF4,Flat" and store.image_index == "IVF4,Flat"
    a, b = single.search(queries, 5), served.search(queries, 5)
    assert (a.ids == b.ids).all()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_the_cli_runs_the_ray_runner_and_refuses_an_unknown_one(built: Built, photos: Path,
                                                                 tiny_model) -> None:
    from typer.testing import CliRunner

    from mmsearch.cli.main import app

    home = str(built.dist.store.root.parent)
    flags = ["--home", home, "-m", str(tiny_model[0]), "-p", str(tiny_model[1])]
    bad = CliRunner().invoke(app, ["index", str(photos), "--runner", "spark", *flags])
    assert bad.exit_code == 2 and "unknown runner 'spark'" in bad.output
    photo = sorted(photos.glob("1*.jpg"))[5]  # indexed and unchanged: no work for the cluster
    ok = CliRunner().invoke(app, ["index", str(photo), "--runner", "ray", "--index", "ray",
                                  "--json", *flags])
    assert ok.exit_code == 0, ok.output
    assert '"unchanged": 1' in ok.output and '"embedded": 0' in ok.output
    info = CliRunner().invoke(app, ["info", "--index", "ray", "--home", home])
    assert info.exit_code == 0 and "storage    shards: image vectors in shards/img_emb" in info.output
    other = CliRunner().invoke(app, ["index", str(photo), "--runner", "ray", "--index", "ray",
                                     "--storage", "catalog", *flags])
    assert other.exit_code == 2 and len(other.output.strip().splitlines()) == 1
    assert "keeps its vectors in its shards, and always will" in other.output


N_URL = 12


@dataclass
class ByUrl:
    plain: Engine         # the photos indexed from their local path (the local runner)
    remote: Engine        # the same photos indexed from a file:// URL with Ray
    url: str
    folder: Path
    first: IndexReport
    second: IndexReport


@pytest.fixture(scope="module")
def by_url(cluster: Path, flickr_images: list[Path], tiny_model: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("url_photos").resolve()
    for src in flickr_images[:N_URL]:
        shutil.copy(src, folder / src.name)
    (folder / ".hidden.jpg").write_bytes(flickr_images[0].read_bytes())  # skipped, as locally
    home = tmp_path_factory.mktemp("url_home")
    url = folder.as_uri() + "/"
    with _open(home, "plain", tiny_model) as plain, _open(home, "url", tiny_model) as remote:
        plain.index([folder])
        first = remote.index([url], runner="ray", storage="catalog")
        second = remote.index([url], runner="ray")
        yield ByUrl(plain, remote, url, folder, first, second)


def test_a_file_url_is_indexed_with_full_urls_and_the_local_vectors(by_url: ByUrl) -> None:
    want, got = _by_path(by_url.plain), _by_path(by_url.remote)
    assert len(want) == N_URL and by_url.first.added == N_URL
    assert sorted(got) == sorted(Path(p).as_uri() for p in want)
    assert all(p.startswith(by_url.url) for p in got)
    for path, (_, vector) in want.items():
        np.testing.assert_allclose(got[Path(path).as_uri()][1], vector, atol=1e-5)
    assert by_url.remote.store.storage == "catalog"
    for query in ("a red circle", "a dog running on grass"):
        a, b = by_url.plain.search(query, k=8), by_url.remote.search(query, k=8)
        assert [Path(h.path).as_uri() for h in a] == [h.path for h in b]  # URLs, as str
        np.testing.assert_allclose([h.score for h in b], [h.score for h in a], atol=1e-5)
    meta = {Path(h.path).name: (h.width, h.height, h.size, h.ext)
            for h in by_url.plain.search("a dog", k=N_URL)}
    assert {str(h.path).rsplit("/", 1)[-1]: (h.width, h.height, h.size, h.ext)
            for h in by_url.remote.search("a dog", k=N_URL)} == meta
    assert by_url.folder.as_uri() in (by_url.remote.store.roots or [])
    assert not [p for p in by_url.remote.check()[0] if "no longer exist" in p]  # not on disk


def test_photos_indexed_from_a_url_are_served(by_url: ByUrl) -> None:
    from fastapi.testclient import TestClient

    from mmsearch.serve.app import create_app
    from mmsearch.serve.security import Access
    from mmsearch.serve.service import SearchService
    from mmsearch.settings import resolve

    service = SearchService(resolve(home=by_url.remote.store.root.parent, index="url"))
    try:
        client = TestClient(create_app(service, Access("127.0.0.1", None)),
                            base_url="http://127.0.0.1:8000")
        hit = client.get("/api/search", params={"q": "a dog", "k": 1}).json()["hits"][0]
        assert hit["path"].startswith(by_url.url)  # the URL as indexed (not file:/...)
        thumb = client.get(hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        original = client.get(f"/original/{hit['id']}")
        assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
        name = hit["path"].rsplit("/", 1)[-1]
        assert original.content == (by_url.folder / name).read_bytes()
    finally:
        service.close()


def test_a_second_run_of_a_url_embeds_nothing(by_url: ByUrl) -> None:
    r = by_url.second
    assert (r.added, r.embedded, r.updated, r.removed, r.unchanged) == (0, 0, 0, 0, N_URL)


def test_urls_refused_with_one_line(by_url: ByUrl, tiny_model) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from mmsearch.cli.main import app
    from mmsearch.errors import UsageError

    with pytest.raises(UsageError, match="add --runner ray"):
        by_url.remote.index([by_url.url])
    home = str(by_url.remote.store.root.parent)
    flags = ["--home", home, "--index", "url", "-m", str(tiny_model[0]), "-p", str(tiny_model[1])]
    local = CliRunner().invoke(app, ["index", by_url.url, *flags])
    assert local.exit_code == 2 and "--runner ray" in local.output
    assert len(local.output.strip().splitlines()) == 1
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed: no missing package to report")
    missing = CliRunner().invoke(app, ["index", "gcs://bucket/photos/", "--runner", "ray", *flags])
    assert missing.exit_code == 2 and "pip install gcsfs" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
