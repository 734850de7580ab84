"""Filters before ranking, result shaping, metadata in hits and info, and the back-fill of
metadata into an index made before schema v3 -- on real Flickr photos given EXIF here."""

from __future__ import annotations

import re
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational
from typer.testing import CliRunner

from mmsearch import Engine, Filters
from mmsearch.cli import app
from mmsearch.errors import UsageError
from mmsearch.models.identity import ModelIdentity
from mmsearch.search import search_images
from mmsearch.search.filters import OPTIONS, from_options, period
from mmsearch.store import ImageFile, Store
from mmsearch.store.catalog import METADATA_COLUMNS

CAMERAS = [("Canon", "Canon EOS 5D Mark IV"), ("FUJIFILM", "X-T4"), ("Apple", "iPhone 12")]
PLACES = {"lisbon": (38.7139, -9.1393), "porto": (41.1496, -8.6110)}


def _dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    value = abs(value)
    d, m = int(value), int((value % 1) * 60)
    return IFDRational(d), IFDRational(m), IFDRational(round(((value * 60) % 1) * 60 * 100), 100)


def _exif(taken: str, camera: tuple[str, str], place: str | None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = camera
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    if place:
        lat, lon = PLACES[place]
        exif.get_ifd(ExifTags.IFD.GPSInfo).update({
            ExifTags.GPS.GPSLatitudeRef: "N" if lat >= 0 else "S", ExifTags.GPS.GPSLatitude: _dms(lat),
            ExifTags.GPS.GPSLongitudeRef: "E" if lon >= 0 else "W", ExifTags.GPS.GPSLongitude: _dms(lon)})
    return exif


@pytest.fixture
def library(flickr_images: list[Path], tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """24 real photos: dated 2021-2024 (month = index), three cameras, Lisbon/Porto/no GPS,
    four saved as PNG; plus an exact copy of the first photo."""
    folder = tmp_path / "library"
    folder.mkdir()
    truth: dict[str, dict] = {}
    for i, src in enumerate(flickr_images[:24]):
        year, month = 2021 + i % 4, 1 + i % 12
        taken = f"{year}:{month:02d}:15 12:00:00"
        place = ["lisbon", "porto", None][i % 3]
        name = f"p{i:02d}.{'png' if i % 6 == 5 else 'jpg'}"
        with Image.open(src) as img:
            img.save(folder / name, exif=_exif(taken, CAMERAS[i % 3], place))
        truth[name] = {"year": year, "month": month, "camera": CAMERAS[i % 3][1], "place": place}
    shutil.copy(folder / "p00.jpg", folder / "p00-copy.jpg")
    truth["p00-copy.jpg"] = truth["p00.jpg"]
    return folder, truth


@pytest.fixture
def engine(home: Path, tiny_config: Path, library: tuple[Path, dict]):
    with Engine.open("lib", model=str(tiny_config), pretrained="none") as e:
        e.index([library[0]])
        yield e


def _names(hits: list) -> set[str]:
    return {h.path.name for h in hits}


def _brute_force(engine: Engine, query: str, names: set[str]) -> list[tuple[str, float]]:
    """Every selected image ranked by exact cosine from the catalog's vectors."""
    q = engine.embed_texts([query])[0]
    paths = dict(engine.store.read.all_image_paths())
    ids, vecs = engine.store.image_vectors([i for i, p in paths.items() if Path(p).name in names])
    ranked = sorted(zip(ids, vecs @ q), key=lambda t: -t[1])
    return [(Path(paths[int(i)]).name, float(s)) for i, s in ranked]


@pytest.mark.parametrize("filters, keep", [
    (Filters(after="2023", before="2023"), lambda t: t["year"] == 2023),
    (Filters(after="2022-06"), lambda t: (t["year"], t["month"]) >= (2022, 6)),
    (Filters(before="2021-03-15"), lambda t: (t["year"], t["month"]) <= (2021, 3)),
    (Filters(camera="fuji"), lambda t: t["camera"] == "X-T4"),
    (Filters(camera="EOS"), lambda t: t["camera"].startswith("Canon")),
    (Filters(ext=("png",)), None),
    (Filters(near=PLACES["lisbon"], km=10), lambda t: t["place"] == "lisbon"),
    (Filters(near=(41.0, -8.6), km=20), lambda t: t["place"] == "porto"),
    (Filters(camera="iphone", after="2022"), lambda t: t["camera"] == "iPhone 12" and t["year"] >= 2022),
    (Filters(after="2024-06", before="9999-12-31"), lambda t: (t["year"], t["month"]) >= (2024, 6)),
    (Filters(after="2023", before="9999"), lambda t: t["year"] >= 2023),
])
def test_filters_rank_exactly_the_selected_photos(engine: Engine, library: tuple[Path, dict],
                                                  filters: Filters, keep) -> None:
    folder, truth = library
    want = {n for n, t in truth.items() if keep(t)} if keep else {
        p.name for p in folder.iterdir() if p.suffix == ".png"}
    assert want  # each case selects something, and not everything
    hits = engine.search("a dog on the grass", k=100, filters=filters)
    assert _names(hits) == want
    expected = _brute_force(engine, "a dog on the grass", want)
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)


def test_periods_reach_the_end_of_the_calendar_and_read_ascii_digits_only() -> None:
    assert period("2023-07") == ("2023-07-01T00:00:00", "2023-08-01T00:00:00")
    assert period("2023-12-31T23:59") == ("2023-12-31T23:59:00", "2024-01-01T00:00:00")
    for text in ("9999", "9999-12", "9999-12-31", "9999-12-31T23:59", "9999-12-31T23:59:59"):
        assert period(text)[1] is None  # no upper bound past the calendar's last second
    for text in ("２０２３", "2023-0７", "١٩٩٩", "0000", "2023-02-29", "2023-07-14T24:00", "10000"):
        with pytest.raises(UsageError, match="cannot read the date"):
            period(text)


@pytest.mark.parametrize("kwargs, words", [
    ({"camera": "x" * 100_000}, "camera: too long (100000 characters, at most 200)"),
    ({"ext": "jpg," * 60}, "ext: too long"),
    ({"within": "/" + "a" * 5000}, "in: too long"),
    ({"within": "a\0b"}, "NUL"),
    ({"after": "2" * 40}, "after: too long"),
    ({"sort": "s" * 100}, "sort: too long"),
    ({"near": "1" * 100, "km": 1.0}, "near: too long"),
    ({"type": "v" * 100}, "type: too long"),
    ({"type": "movie"}, "--type 'movie': use image or video"),
])
def test_every_free_text_filter_is_bounded(kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        from_options(**kwargs)
    assert all(o.help for o in OPTIONS.values())
    free_text = {n for n, o in OPTIONS.items() if o.max_chars}
    assert free_text == {"in", "after", "before", "camera", "ext", "near", "sort", "type"}


def test_metadata_is_in_hits_info_and_json(engine: Engine, library: tuple[Path, dict]) -> None:
    hit = next(h for h in engine.search("a photo", k=30) if h.path.name == "p01.jpg")
    assert (hit.taken, hit.taken_source, hit.camera_model, hit.ext) == (
        "2022-02-15T12:00:00", "exif", "X-T4", "jpg")
    assert hit.gps_lat == pytest.approx(41.1496, abs=1e-3) and hit.width and hit.size
    meta = engine.info().metadata
    assert (meta.first_taken, meta.last_taken) == ("2021-01-15T12:00:00", "2024-12-15T12:00:00")
    assert meta.dates_from_exif == 25 and meta.cameras["FUJIFILM X-T4"] == 8
    out = CliRunner().invoke(app, ["info", "--index", "lib"]).output
    assert "taken      2021-01-15 .. 2024-12-15 (25 dated by EXIF, 0 by file time)" in out
    assert "cameras    Canon EOS 5D Mark IV 9, " in out


def test_result_shaping_min_score_sort_and_dedup(engine: Engine) -> None:
    hits = engine.search("a photo", k=25)
    cut = hits[5].score
    assert all(h.score >= cut for h in engine.search("a photo", k=25, filters=Filters(min_score=cut)))
    dated = engine.search("a photo", k=10, filters=Filters(sort="date"))
    assert _names(dated) == _names(hits[:10])  # the same 10 best, newest first
    assert [h.taken for h in dated] == sorted((h.taken for h in dated), reverse=True)
    assert [h.rank for h in dated] == list(range(1, 11))


def test_dedup_hides_near_duplicates_of_better_hits(home: Path, tiny_model: tuple[Path, Path],
                                                    shapes: dict[Path, str]) -> None:
    folder = next(iter(shapes)).parent
    shutil.copy(folder / "red_circle_0.png", folder / "red_circle_0-copy.png")
    config, ckpt = tiny_model
    with Engine.open("dd", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([folder])
        every = engine.search("a red circle", k=25)
        assert len(every) == 25
        exact = engine.search("a red circle", k=25, filters=Filters(dedup=True, dedup_threshold=0.9999))
        assert len(exact) == 24 and len(_names(exact) & {"red_circle_0.png", "red_circle_0-copy.png"}) == 1
        near = engine.search("a red circle", k=25, filters=Filters(dedup=True))
        ids, vecs = engine.store.image_vectors([h.id for h in near])
        sims = vecs @ vecs.T
        assert (sims[np.triu_indices(len(ids), 1)] < 0.95).all()  # no two kept are near-duplicates
        assert near[0].id == every[0].id and len(near) < 24


def test_empty_selection_is_an_empty_result(engine: Engine) -> None:
    assert engine.search("a photo", filters=Filters(after="2030")) == []
    out = CliRunner().invoke(app, ["query", "a photo", "--index", "lib", "--camera", "leica"])
    assert out.exit_code == 0 and out.output.strip() == "no results (nothing indexed matches the filters)"


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_filtered_search_against_brute_force_per_index_type(
        tmp_path: Path, index_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Selective filters (ranked exactly among the selected vectors) equal numpy; broad ones
    go through FAISS restricted to the selection (an IDSelector bitmap here): never a vector
    outside it, exact scores, and the top 10 of Flat equal numpy's."""
    from mmsearch.search import search as engine_search

    monkeypatch.setattr(engine_search, "BRUTE_FORCE_MAX", 100)  # 3,000 vectors stand for millions
    monkeypatch.setattr(engine_search, "BRUTE_FORCE_SHARE", 1 << 30)
    rng = np.random.default_rng(3)
    n, dim = 3000, 16
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = Store.open(tmp_path / "idx", create=True)
    store.lock()
    store.set_model(ModelIdentity("x", "none", "none"), dim)
    days = [f"2023-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00" for i in range(n)]
    files = [ImageFile(f"/p/{i}.jpg", 1, 1, f"h{i}", {"taken": d, "taken_source": "exif"})
             for i, d in enumerate(days)]
    store.put_images(files, vecs)
    store.retype(index_type)
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for filters in (Filters(after="2023-03-07", before="2023-03-07"),  # ~1%: 9 of 3000, k=10
                    Filters(after="2023-01", before="2023-06")):       # 50%
        selected = np.asarray([i + 1 for i, d in enumerate(days)
                               if filters.after <= d[:len(filters.after)] <= filters.before])
        truth = np.argsort(-(queries @ vecs[selected - 1].T), axis=1, kind="stable")[:, :10]
        for q, hits, want in zip(queries, search_images(store, queries, 10, filters), truth):
            got = np.asarray([h.id for h in hits])
            assert len(got) == min(10, len(selected)) and np.isin(got, selected).all()
            np.testing.assert_allclose([h.score for h in hits], vecs[got - 1] @ q, atol=1e-5)
            if len(selected) < 100 or index_type == "flat":
                np.testing.assert_array_equal(got, selected[want])
            else:
                assert len(set(got) & set(selected[want])) >= 8  # approximate, within reach
    store.close()


def test_an_older_index_is_back_filled_without_loading_a_model(
        home: Path, tiny_config: Path, library: tuple[Path, dict]) -> None:
    folder, _ = library
    with Engine.open("old", model=str(tiny_config), pretrained="none") as e:
        e.index([folder])
    root = home / "old"
    with closing(sqlite3.connect(root / "catalog.sqlite")) as db, db:  # as schema v2 left it
        db.execute("DROP INDEX ix_images_taken")
        db.execute("DROP INDEX ix_images_video_time")
        db.execute("DROP TABLE videos")
        for column in METADATA_COLUMNS:
            db.execute(f"ALTER TABLE images DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    with Engine.open("old", create=False) as e:
        assert e.info().schema_version == 5 and e.info().metadata.not_read == 25
        assert "25 images have no metadata yet" in " ".join(e.check()[0])
        assert e.search("a photo", k=5, filters=Filters(camera="fuji")) == []  # not read yet
        report = e.index([folder])
        assert (report.metadata_read, report.embedded, report.unchanged) == (25, 0, 25)
        assert e._embedder is None  # the back-fill loaded no model
        assert len(e.search("a photo", k=30, filters=Filters(camera="fuji"))) == 8
        assert e.check() == ([], [])


def test_duplicates_groups_identical_files_and_near_copies(
        home: Path, tiny_model: tuple[Path, Path], shapes: dict[Path, str]) -> None:
    """An identical copy is reported as such; a re-encoded, slightly resized copy as similar."""
    folder = next(iter(shapes)).parent
    shutil.copy(folder / "blue_square_0.png", folder / "blue_square_0-copy.png")
    with Image.open(folder / "green_triangle_1.png") as img:
        img.resize((62, 62)).save(folder / "green_triangle_1-small.jpg", quality=95)
    config, ckpt = tiny_model
    with Engine.open("dups", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([folder])
    with Engine.open("dups", create=False) as engine:
        exact = engine.duplicates(threshold=0.9999)  # only identical contents are this close
        assert [(sorted(p.name for p in g.paths), g.exact) for g in exact] == [
            (["blue_square_0-copy.png", "blue_square_0.png"], True)]
        groups = engine.duplicates()
        near = next(g for g in groups if any(p.name == "green_triangle_1-small.jpg" for p in g.paths))
        assert "green_triangle_1.png" in {p.name for p in near.paths} and not near.exact
        assert [len(g.ids) for g in groups] == sorted((len(g.ids) for g in groups), reverse=True)
        assert engine._embedder is None and engine._text_embedder is None
    out = CliRunner().invoke(app, ["duplicates", "--index", "dups", "--threshold", "0.9999"]).output
    assert out.splitlines()[0] == "group 1: 2 identical files" and "1 groups, 2 photos" in out
    out = CliRunner().invoke(app, ["duplicates", "--index", "dups"]).output
    assert "similar photos (cosine >= 0.95)" in out
    assert CliRunner().invoke(app, ["duplicates", "--threshold", "2", "--index", "dups"]).exit_code == 2
