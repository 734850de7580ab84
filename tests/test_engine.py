"""End-to-end tests of the library: a trained tiny CLIP, real files, real FAISS and SQLite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_shapes
from PIL import Image

import tinyclip
from mmsearch import Engine
from mmsearch.ingest import embed
from mmsearch.ingest.decode import content_hash
from mmsearch.errors import (EmptyIndexError, IndexNotFoundError, ModelMismatchError,
                             UsageError)


@pytest.fixture
def engine(home: Path, tiny_model: tuple[Path, Path]):
    config, ckpt = tiny_model
    with Engine.open("shapes", model=str(config), pretrained=str(ckpt)) as e:
        yield e


def test_text_query_ranks_the_right_shapes_first(engine: Engine, shapes: dict[Path, str]) -> None:
    report = engine.index([next(iter(shapes)).parent])
    assert (report.added, report.embedded, report.skipped) == (len(shapes), len(shapes), [])
    for color, shape in [("red", "circle"), ("blue", "square"), ("yellow", "triangle")]:
        hits = engine.search(f"a {color} {shape}", k=2)
        assert [h.rank for h in hits] == [1, 2]
        assert all(h.path.name.startswith(f"{color}_{shape}_") for h in hits), hits
        assert hits[0].score >= hits[1].score


def test_image_to_text_finds_the_caption(engine: Engine, shapes: dict[Path, str], tmp_path: Path) -> None:
    engine.index([next(iter(shapes)).parent])
    report = engine.add_texts([tinyclip.caption(c, s) for c, s in tinyclip.combos()])
    assert (report.added, report.unchanged) == (12, 0)
    probe = tmp_path / "probe.png"
    tinyclip.draw_shape("green", "triangle", seed=77).save(probe)
    assert engine.search_texts(image=probe, k=1)[0].text == "a green triangle"
    pil = tinyclip.draw_shape("red", "square", seed=78)
    assert engine.search_texts(image=pil, k=3)[0].text == "a red square"
    # image -> image: the same kind of picture comes first
    assert engine.search(image=probe, k=1)[0].path.name.startswith("green_triangle_")
    assert engine.add_texts(["a red square"]).unchanged == 1


def test_scores_equal_open_clip_computed_directly(engine: Engine, shapes: dict[Path, str],
                                                  tiny_model: tuple[Path, Path]) -> None:
    import open_clip
    import torch

    engine.index([next(iter(shapes)).parent])
    config, ckpt = tiny_model
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer(config.stem)
    model.eval()
    hits = engine.search("a blue circle", k=len(shapes))
    assert len(hits) == len(shapes)
    with torch.no_grad():
        t = model.encode_text(tokenizer(["a blue circle"]), normalize=True)
        for hit in hits:
            img = preprocess(Image.open(hit.path).convert("RGB"))[None]
            expected = float(model.encode_image(img, normalize=True) @ t.T)
            assert hit.score == pytest.approx(expected, abs=1e-4)


def test_scores_on_real_photos_match_open_clip(home: Path, tiny_config: Path,
                                               flickr_images: list[Path], tmp_path: Path) -> None:
    import open_clip
    import torch

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in flickr_images[:6]:
        shutil.copy(p, folder / p.name)
    with Engine.open("real", model=str(tiny_config), pretrained="none", draft=False) as e:
        e.index([folder])
        hits = e.search("a dog runs on the grass", k=6)
        model = e.embedder._model
        _, _, preprocess = open_clip.create_model_and_transforms(tiny_config.stem)
        tokenizer = open_clip.get_tokenizer(tiny_config.stem)
        with torch.no_grad():
            t = model.encode_text(tokenizer(["a dog runs on the grass"]), normalize=True)
            for hit in hits:
                img = preprocess(Image.open(hit.path).convert("RGB"))[None]
                assert hit.score == pytest.approx(float(model.encode_image(img, normalize=True) @ t.T),
                                                  abs=1e-4)


def test_incremental_reindex(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    draw_shapes(folder, per_combo=1)
    assert engine.index([folder]).embedded == 12
    again = engine.index([folder])
    assert (again.added, again.unchanged, again.embedded, again.removed) == (0, 12, 0, 0)

    moved_id = next(i for i, p in engine.store.read.all_image_paths()
                    if p.endswith("blue_square_0.png"))
    (folder / "red_circle_0.png").unlink()                                   # deleted
    os.rename(folder / "blue_square_0.png", folder / "renamed.png")         # moved
    shutil.copy(folder / "green_circle_0.png", folder / "copy.png")         # duplicate
    tinyclip.draw_shape("yellow", "circle", seed=50).save(folder / "yellow_square_0.png")  # changed
    os.utime(folder / "green_square_0.png", ns=(1, 1))                       # touched only
    tinyclip.draw_shape("red", "triangle", seed=51).save(folder / "new.png")  # new
    report = engine.index([folder])
    assert report.removed == 1          # the deleted file
    assert report.moved == 1            # the renamed one keeps its row
    assert report.added == 2            # copy + new
    assert report.updated == 1          # changed content, same path
    assert report.embedded == 2         # only the changed and the new file went through the model
    assert report.unchanged == 9        # 8 untouched + the touched one
    paths = {h.path.name for h in engine.search("a red circle", k=100)}
    assert "red_circle_0.png" not in paths and {"renamed.png", "copy.png", "new.png"} <= paths
    assert engine.search("a yellow circle", k=1)[0].path.name == "yellow_square_0.png"
    info = engine.info()
    assert (info.images, info.distinct_images) == (13, 12)
    assert dict(engine.store.read.all_image_paths())[moved_id] == str(folder / "renamed.png")
    assert engine.search("a blue square", k=1)[0].id == moved_id


def stored_vector(engine: Engine, path: Path) -> np.ndarray:
    ids = [i for i, p in engine.store.read.all_image_paths() if p == str(path)]
    assert len(ids) == 1, f"{path} is not indexed once"
    return engine.store.read.image_vectors(engine.store.dim, ids)[1][0]


def test_a_file_rewritten_between_hash_and_decode_is_not_stored(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "lib"
    draw_shapes(folder, per_combo=1)
    victim = folder / "red_circle_0.png"
    old_bytes, old_hash = victim.read_bytes(), content_hash(victim)
    real_load = embed.load_image

    def rewrite_then_load(path: Path, **kwargs: object) -> Image.Image:
        if path == victim and content_hash(victim) == old_hash:  # hashed already: rewrite once
            tinyclip.draw_shape("yellow", "triangle", seed=60).save(victim)
        return real_load(path, **kwargs)

    monkeypatch.setattr(embed, "load_image", rewrite_then_load)
    report = engine.index([folder])
    monkeypatch.undo()
    assert [(Path(s.path), s.reason) for s in report.skipped] == [(victim, embed.CHANGED)]
    assert (report.added, report.embedded) == (11, 11)
    assert victim not in {Path(p) for _, p in engine.store.read.all_image_paths()}
    assert engine.store.read.known_vectors([old_hash], engine.store.dim) == {}

    twin = folder / "twin.png"  # the old content again: it must get the old content's vector
    twin.write_bytes(old_bytes)
    again = engine.index([folder])
    assert (again.added, again.unchanged, again.embedded, again.skipped) == (2, 11, 2, [])
    np.testing.assert_allclose(stored_vector(engine, victim), engine.embed_image(victim)[0],
                               atol=1e-5)
    np.testing.assert_allclose(stored_vector(engine, twin), engine.embed_image(twin)[0],
                               atol=1e-5)
    assert engine.index([folder]).unchanged == 13


def test_hostile_files_are_skipped_and_the_rest_indexed(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    draw_shapes(folder, per_combo=1)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    good = folder / "red_circle_0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:100])
    odd = folder / "naïve\nname.png"
    tinyclip.draw_shape("blue", "circle", seed=9).save(odd)
    report = engine.index([folder])
    assert report.added == 13
    assert {Path(s.path).name for s in report.skipped} == {"empty.jpg", "notes.jpg", "truncated.png"}
    assert all(s.reason for s in report.skipped)
    assert odd in {h.path for h in engine.search("a blue circle", k=3)}
    # a second run reports the same broken files again and keeps everything stored
    again = engine.index([folder])
    assert (again.unchanged, len(again.skipped)) == (13, 3)


def test_search_within_a_subtree(engine: Engine, tmp_path: Path) -> None:
    draw_shapes(tmp_path / "lib" / "a", per_combo=1)
    draw_shapes(tmp_path / "lib" / "b", per_combo=1)
    (tmp_path / "lib" / "ab").mkdir()
    tinyclip.draw_shape("red", "circle", seed=3).save(tmp_path / "lib" / "ab" / "x.png")
    engine.index([tmp_path / "lib"])
    hits = engine.search("a red circle", k=50, within=tmp_path / "lib" / "a")
    assert len(hits) == 12 and all(h.path.parent.name == "a" for h in hits)
    assert [h.rank for h in hits] == list(range(1, 13))
    with pytest.raises(UsageError):
        engine.search("a red circle", within=tmp_path / "nowhere")


def test_remove_forgets_a_folder(engine: Engine, tmp_path: Path) -> None:
    draw_shapes(tmp_path / "lib" / "keep", per_combo=1)
    draw_shapes(tmp_path / "lib" / "old", per_combo=1)
    engine.index([tmp_path / "lib"])
    assert engine.remove(tmp_path / "lib" / "old") == 12
    assert {h.path.parent.name for h in engine.search("a red circle", k=100)} == {"keep"}
    assert engine.info().images == 12


def test_query_edge_cases(engine: Engine, shapes: dict[Path, str]) -> None:
    with pytest.raises(EmptyIndexError):
        engine.search("a red circle")
    engine.index([next(iter(shapes)).parent])
    for bad in ["", "   \n\t"]:
        with pytest.raises(UsageError):
            engine.search(bad)
    with pytest.raises(UsageError):
        engine.search("x", k=-1)
    with pytest.raises(UsageError):
        engine.search()
    assert engine.search("a red circle", k=0) == []
    assert len(engine.search("a red circle", k=10_000)) == len(shapes)
    assert len(engine.search("☃ " * 2000, k=1)) == 1
    with pytest.raises(UsageError):
        engine.search("x" * 10_001)


def test_unknown_index_and_model_mismatch(home: Path, tiny_model: tuple[Path, Path],
                                          tiny_config: Path, shapes: dict[Path, str]) -> None:
    with pytest.raises(IndexNotFoundError):
        Engine.open("missing", create=False)
    config, ckpt = tiny_model
    with Engine.open("m", model=str(config), pretrained=str(ckpt)) as e:
        e.index([next(iter(shapes)).parent])
    with pytest.raises(ModelMismatchError):
        Engine.open("m", model=str(tiny_config), pretrained="none")
    with Engine.open("m") as e:  # no flags: the index's own model
        assert e.search("a red circle", k=1)[0].path.name.startswith("red_circle")


def test_stale_or_damaged_vector_file_is_rebuilt_from_the_catalog(
        home: Path, tiny_model: tuple[Path, Path], shapes: dict[Path, str]) -> None:
    config, ckpt = tiny_model
    with Engine.open("r", model=str(config), pretrained=str(ckpt)) as e:
        e.index([next(iter(shapes)).parent])
        expected = [h.path for h in e.search("a red circle", k=5)]
    faiss_file = home / "r" / "images.faiss"
    for damage in (lambda: faiss_file.write_bytes(faiss_file.read_bytes()[:200]),
                   lambda: faiss_file.unlink()):
        damage()
        with Engine.open("r") as e:
            assert [h.path for h in e.search("a red circle", k=5)] == expected
            assert e.info().repairs


def test_search_vectors_match_numpy_brute_force(engine: Engine, shapes: dict[Path, str]) -> None:
    engine.index([next(iter(shapes)).parent])
    ids, vecs = engine.store.read.image_vectors(engine.store.dim)
    q = engine.embed_texts(["a green square"])[0]
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:5]
    hits = engine.search("a green square", k=5)
    assert [h.id for h in hits] == list(ids[order])
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
