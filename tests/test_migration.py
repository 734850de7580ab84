"""An index written by the schema-v1 release opens, migrates (v2, v3, v4, v5) and answers as it did.

``fixtures/v1_index`` was made by ``fixtures/make_v1_index.py`` with the code of
commit 60fd259 (schema v1): 24 drawn shapes and 12 captions embedded with the tiny
test model's config and seeded random weights, plus what that code answered to
a few text queries and fixed query vectors.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

import tinyclip
from mmsearch import Engine
from mmsearch.models.identity import ModelIdentity
from mmsearch.search import search_images, search_texts
from mmsearch.store.catalog import SCHEMA_VERSION

FIXTURE = Path(__file__).parent / "fixtures" / "v1_index"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def v1_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(FIXTURE, home / "v1", ignore=shutil.ignore_patterns("expected.json"))
    return home


def _meta(root: Path) -> dict[str, str]:
    with closing(sqlite3.connect(root / "catalog.sqlite")) as db:
        return dict(db.execute("SELECT key, value FROM meta"))


def _by_id(hits: list) -> dict[int, float]:
    return {int(h[0]): float(h[-1]) for h in hits}


def test_the_fixture_is_schema_v1() -> None:
    meta = _meta(FIXTURE)
    assert meta["schema_version"] == "1" and "backend" not in json.loads(meta["model"])
    assert SCHEMA_VERSION == 5


def test_a_v1_index_migrates_and_answers_the_same(v1_home: Path, tmp_path: Path) -> None:
    config = tinyclip.write_config(tmp_path / f"{tinyclip.MODEL_NAME}.json")
    with Engine.open("v1", home=v1_home, model=str(config), pretrained="none",
                     create=False) as engine:
        assert engine.info().schema_version == 5 and engine.info().images == 24
        assert engine.info().storage == "catalog"  # v4: recorded; its vectors stay where they are
        assert len(engine.store.missing_metadata()) == 24  # read by the next index run
        assert engine.store.model.backend == "open_clip"
        assert engine.store.repairs == []  # the FAISS files were trusted as they are
        for text, want in EXPECTED["text_queries"].items():
            got = {h.id: h.score for h in engine.search(text, k=24)}
            assert got.keys() == _by_id(want).keys()
            np.testing.assert_allclose([got[i] for i in sorted(got)],
                                       [_by_id(want)[i] for i in sorted(got)], atol=1e-5)
        vectors = np.asarray(EXPECTED["vectors"], dtype=np.float32)
        for hits, want in zip(search_images(engine.store, vectors, 10), EXPECTED["vector_queries"]):
            assert [(h.id, h.path.name) for h in hits] == [(i, name) for i, name, _ in want]
            np.testing.assert_allclose([h.score for h in hits], [s for *_, s in want], atol=1e-6)
        for hits, want in zip(search_texts(engine.store, vectors, 5), EXPECTED["texts_for_vectors"]):
            assert [(h.id, h.key) for h in hits] == [(i, key) for i, key, _ in want]
    model = json.loads(_meta(v1_home / "v1")["model"])
    assert _meta(v1_home / "v1")["schema_version"] == "5"
    assert _meta(v1_home / "v1")["storage"] == "catalog"
    with closing(sqlite3.connect(v1_home / "v1" / "catalog.sqlite")) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(embeddings)")}
        assert {"shard", "shard_row"} <= columns
        assert db.execute("SELECT count(*) FROM embeddings WHERE shard IS NOT NULL "
                          "OR length(vector) != 4 * 64").fetchone() == (0,)
        # v5: every row of an older index is a photo; the videos table is there, empty
        types = {row[1]: row[2] for row in db.execute("PRAGMA table_info(images)")}
        assert (types["video_id"], types["start_s"], types["time_s"]) == ("INTEGER", "FLOAT", "FLOAT")
        assert types["width"] == "INTEGER" and types["gps_lat"] == "FLOAT"
        assert db.execute("SELECT count(*) FROM images WHERE video_id IS NOT NULL").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM videos").fetchone() == (0,)
    assert (model["backend"], model["text_pretrained"], model["text_fingerprint"]) == (
        "open_clip", None, None)


def test_a_migrated_index_keeps_growing(v1_home: Path, tmp_path: Path) -> None:
    config = tinyclip.write_config(tmp_path / f"{tinyclip.MODEL_NAME}.json")
    folder = tmp_path / "more"
    folder.mkdir()
    tinyclip.draw_shape("red", "circle", seed=50).save(folder / "new.png")
    with Engine.open("v1", home=v1_home, model=str(config), pretrained="none") as engine:
        report = engine.index([folder])
        assert (report.added, report.removed) == (1, 0)
        assert engine.info().images == 25
        assert engine.check()[0] == [  # the v1 photos are not on this machine
            "24 indexed files no longer exist on disk",
            "24 images have no metadata yet (an index made before schema v3; the next `index` "
            "of their folders reads it)"]
        paths = {Path(p).name: i for i, p in engine.store.read.all_image_paths()}
        assert paths["new.png"] == 25  # ids go on after v1's last
        assert len(engine.search("a red circle", k=30)) == 25


def test_v1_and_v2_model_records_read_alike() -> None:
    v1 = ModelIdentity.from_json('{"arch": "a", "config_path": null, "fingerprint": "tag:x", '
                                 '"pretrained": "x"}')
    assert v1 == ModelIdentity("a", "x", "tag:x") and v1.backend == "open_clip"
    assert ModelIdentity.from_json(v1.to_json()) == v1
    other = ModelIdentity("a", "x", "tag:x", text_pretrained="/t.pt", text_fingerprint="file:1:ab")
    with pytest.raises(Exception, match="built with"):
        v1.check_same(other)
