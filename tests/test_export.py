"""Export in clip-retrieval's layout: npy shards + parquet metadata, or parquet with embeddings."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pytest

import pyarrow as pa  # noqa: E402  (the `export` extra, installed by the test command)
import pyarrow.parquet as pq  # noqa: E402

from mmsearch import Engine  # noqa: E402
from mmsearch.errors import EmptyIndexError, StorageError, UsageError  # noqa: E402
from mmsearch.export import IMAGE_COLUMNS, METADATA_COLUMNS, export_index  # noqa: E402

TEXTS = [(f"t{i}", f"caption number {i}") for i in range(13)]


@pytest.fixture
def engine(home: Path, tiny_config: Path, shapes: dict[Path, str]):
    """An index of the 24 shapes and 13 texts (random tiny weights)."""
    with Engine.open("x", model=str(tiny_config), pretrained="none") as e:
        e.index([next(iter(shapes)).parent])
        e.add_texts(TEXTS)
        yield e


def _names(stem: str, n: int, ext: str) -> list[str]:
    return [f"{stem}_{i}.{ext}" for i in range(n)]


def _table(folder: Path, files: list[str]) -> "pa.Table":
    return pa.concat_tables([pq.read_table(folder / f) for f in files])


def test_npy_export_round_trips(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: list[tuple[str, int, int]] = []
    report = export_index(engine.store, out, fmt="npy", shard_size=10,
                          progress=lambda *a: seen.append(a))
    assert (report.images, report.texts, report.shards) == (24, 13, 3)
    assert report.files == sorted(
        _names("img_emb/img_emb", 3, "npy") + _names("metadata/metadata", 3, "parquet")
        + _names("text_emb/text_emb", 2, "npy") + _names("text_metadata/metadata", 2, "parquet"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == report.files
    assert seen[-1] == ("texts", 13, 13) and ("images", 24, 24) in seen

    ids, vectors = engine.store.image_vectors()
    shards = [np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in range(3)]
    assert [s.shape for s in shards] == [(10, vectors.shape[1])] * 2 + [(4, vectors.shape[1])]
    assert all(s.dtype == np.float16 for s in shards)
    np.testing.assert_allclose(np.concatenate(shards), vectors, atol=1e-3)
    mapped = np.load(out / "img_emb" / "img_emb_0.npy", mmap_mode="r")  # as autofaiss reads it
    np.testing.assert_array_equal(mapped, shards[0])

    meta = _table(out / "metadata", _names("metadata", 3, "parquet"))
    assert meta.column_names == list(IMAGE_COLUMNS)
    assert meta.schema.field("id").type == pa.int64()
    assert meta.column("id").to_pylist() == ids.tolist()
    records = engine.store.image_records(ids)
    for row in meta.to_pylist():
        rec = records[row["id"]]
        assert row["image_path"] == rec["path"] and Path(row["image_path"]).is_file()
        assert {k: row[k] for k in ("size", "mtime_ns", *METADATA_COLUMNS)} == \
            {k: rec[k] for k in ("size", "mtime_ns", *METADATA_COLUMNS)}
    assert set(meta.column("ext").to_pylist()) == {"png"}

    text_ids, text_vectors = engine.store.text_vectors()
    text_shards = [np.load(out / "text_emb" / f"text_emb_{i}.npy") for i in range(2)]
    np.testing.assert_allclose(np.concatenate(text_shards), text_vectors, atol=1e-3)
    texts = _table(out / "text_metadata", _names("metadata", 2, "parquet"))
    assert texts.column_names == ["id", "key", "caption"]
    assert texts.column("id").to_pylist() == text_ids.tolist()
    by_id = engine.store.read.texts_by_id(text_ids)
    assert [(r["key"], r["caption"]) for r in texts.to_pylist()] == [by_id[i] for i in text_ids.tolist()]
    assert sorted(by_id.values()) == sorted(TEXTS)


def test_parquet_export_carries_the_embeddings(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = export_index(engine.store, out, fmt="parquet", shard_size=10)
    assert report.files == sorted(_names("images/part", 3, "parquet") + _names("texts/part", 2, "parquet"))
    ids, vectors = engine.store.image_vectors()
    images = _table(out / "images", _names("part", 3, "parquet"))
    assert images.column_names == [*IMAGE_COLUMNS, "embedding"]
    assert images.schema.field("embedding").type == pa.list_(pa.float32(), vectors.shape[1])
    assert images.column("id").to_pylist() == ids.tolist()
    paths = engine.store.read.image_paths(ids)
    assert images.column("image_path").to_pylist() == [paths[i] for i in ids.tolist()]
    np.testing.assert_array_equal(np.array(images.column("embedding").to_pylist(), np.float32), vectors)

    text_ids, text_vectors = engine.store.text_vectors()
    texts = _table(out / "texts", _names("part", 2, "parquet"))
    assert texts.column_names == ["id", "key", "caption", "embedding"]
    assert texts.column("id").to_pylist() == text_ids.tolist()
    np.testing.assert_array_equal(np.array(texts.column("embedding").to_pylist(), np.float32),
                                  text_vectors)


def test_an_index_without_texts_writes_no_text_files(home: Path, tiny_config: Path,
                                                     shapes: dict[Path, str], tmp_path: Path) -> None:
    with Engine.open("x", model=str(tiny_config), pretrained="none") as e:
        e.index([next(iter(shapes)).parent])
        report = export_index(e.store, tmp_path / "out")  # defaults: npy, one shard
    assert (report.images, report.texts, report.shards) == (24, 0, 1)
    assert report.files == ["img_emb/img_emb_0.npy", "metadata/metadata_0.parquet"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_emb", "metadata"]


def test_refusals_are_one_clear_line(engine: Engine, tmp_path: Path, home: Path,
                                     tiny_config: Path) -> None:
    out = tmp_path / "out"
    export_index(engine.store, out)
    with pytest.raises(UsageError, match="already holds an export; choose an empty folder"):
        export_index(engine.store, out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty.*choose an empty folder"):
        export_index(engine.store, other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(UsageError, match="unknown export format 'csv'"):
        export_index(engine.store, tmp_path / "new", fmt="csv")
    assert not (tmp_path / "new").exists()

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    with Engine.open("blank", model=str(tiny_config), pretrained="none") as blank:
        with pytest.raises(EmptyIndexError, match="holds nothing to export") as info:
            export_index(blank.store, empty)
    assert "\n" not in str(info.value) and list(empty.iterdir()) == []


def test_pyarrow_missing_says_how_to_install(engine: Engine, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pyarrow(name: str, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(UsageError, match=r"pip install 'mmsearch\[export\]'"):
        export_index(engine.store, tmp_path / "out")


def test_a_failed_write_is_a_storage_error_and_leaves_nothing(engine: Engine, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_replace = os.replace
    calls = []

    def full_disk(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the second shard's vectors
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr("mmsearch.export.os.replace", full_disk)
    with pytest.raises(StorageError, match="No space left on device") as info:
        export_index(engine.store, out, shard_size=10)
    assert "\n" not in str(info.value)
    assert [p for p in out.rglob("*") if p.is_file()] == []  # neither shards nor .tmp files


def test_an_unwritable_target_is_a_storage_error(engine: Engine, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="cannot create") as info:
        export_index(engine.store, blocker / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="is a file"):
        export_index(engine.store, blocker)


def test_the_export_command(engine: Engine, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mmsearch.cli import app

    out = tmp_path / "cli-out"
    result = CliRunner().invoke(app, ["export", str(out), "--index", "x"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"exported 24 images and ")
    vectors = np.load(out / "img_emb" / "img_emb_0.npy")
    assert vectors.dtype == np.float16 and vectors.shape[0] == 24
    again = CliRunner().invoke(app, ["export", str(out), "--index", "x"])
    assert again.exit_code == 2 and "already holds an export" in again.output
    bad = CliRunner().invoke(app, ["export", str(tmp_path / "o2"), "--format", "csv", "--index", "x"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
