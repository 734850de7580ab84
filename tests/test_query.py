"""Query objects (weighted, negative, image and id terms), filters, the empty-index answer,
a reader picking up another writer's commits, and the device FAISS may use."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tinyclip
from mmsearch import Engine, Filters, Query
from mmsearch.errors import EmptyIndexError, UsageError
from mmsearch.models.device import faiss_gpu
from mmsearch.search.hits import ImageHit, to_json
from mmsearch.search.query import MAX_TERMS, combine, image_id


@pytest.fixture
def engine(home: Path, tiny_model: tuple[Path, Path], shapes: dict[Path, str]):
    config, ckpt = tiny_model
    with Engine.open("shapes", model=str(config), pretrained=str(ckpt)) as e:
        e.index([next(iter(shapes)).parent])
        yield e


def _open_clip_terms(tiny_model: tuple[Path, Path], texts: list[str], images: list[Path]):
    """Term vectors computed with open_clip directly (not through the engine), L2-normalised."""
    import open_clip
    import torch

    config, ckpt = tiny_model
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=str(ckpt))
    model.eval()
    with torch.no_grad():
        t = model.encode_text(open_clip.get_tokenizer(config.stem)(texts), normalize=True)
        i = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB"))
                                            for p in images]), normalize=True)
    return t.numpy(), i.numpy()


def test_a_combined_query_equals_the_numpy_computation(engine: Engine, shapes: dict[Path, str],
                                                        tiny_model: tuple[Path, Path]) -> None:
    probe = next(p for p in shapes if p.name.startswith("green_square_"))
    query = Query.text("a red circle", 2) + Query.image(probe) - Query.text("a blue triangle")
    hits = engine.search(query, k=24)

    (red, blue), (green,) = _open_clip_terms(tiny_model, ["a red circle", "a blue triangle"], [probe])
    q = 2 * red + green - blue
    q /= np.linalg.norm(q)
    ids, vectors = engine.store.image_vectors()
    scores = vectors @ q
    order = np.argsort(-scores, kind="stable")
    assert [h.id for h in hits[:5]] == [int(i) for i in ids[order[:5]]]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-4)
    assert hits[0].path.name.startswith(("red_circle_", "green_square_"))


def test_weights_and_negation_move_the_ranking(engine: Engine) -> None:
    plain = engine.search("a red circle", k=4)
    assert all(h.path.name.startswith("red_circle_") for h in plain[:2])
    pushed = engine.search(Query.text("a red circle") - Query.text("a red circle", 0.5)
                           + Query.text("a blue square", 2), k=2)
    assert all(h.path.name.startswith("blue_square_") for h in pushed)
    with pytest.raises(UsageError, match="cancel"):
        engine.search(Query.text("a red circle") - Query.text("a red circle"))
    single = engine.search(Query.text("a red circle", 3), k=4)
    assert [(h.id, h.score) for h in single] == [(h.id, h.score) for h in plain]


def test_an_id_term_is_more_like_that_indexed_image(engine: Engine) -> None:
    first = engine.search("a yellow triangle", k=1)[0]
    again = engine.search(Query.id(first.id), k=1)[0]
    assert again.id == first.id and again.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UsageError, match="no indexed image has id 9999"):
        engine.search(Query.id(9999))
    with pytest.raises(UsageError):
        Query.id("3")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no indexed image has id 9223372036854775808"):
        engine.search(Query.id(2**63))  # beyond SQLite's integer: no such image, not damage


def test_ids_are_ascii_digits_that_sqlite_can_hold() -> None:
    from mmsearch.search.syntax import parse

    assert image_id("42") == 42 and image_id("0042") == 42
    assert image_id("9223372036854775807") == 2**63 - 1
    for bad in ("²", "１", "٣", "𝟙", "-1", "+1", "1.5", "", " 1", "1 ", "4 2", "0x10"):
        with pytest.raises(UsageError, match="id: takes"):
            image_id(bad)
    for beyond in ("9223372036854775808", "9" * 5000):
        with pytest.raises(UsageError, match="no indexed image has id"):
            image_id(beyond)
    assert parse("id:42 - fruit").terms[0].value == 42
    with pytest.raises(UsageError, match="id: takes"):
        parse("id:²")


@pytest.mark.parametrize("weight", [math.inf, -math.inf, math.nan, 1e308, 100.5, -101, 1e-9,
                                    -1e-4, 10**400])
def test_a_weight_is_finite_and_of_sane_size(weight: float) -> None:
    with pytest.raises(UsageError, match="weight"):
        Query.text("dog", weight)


def test_weights_in_the_query_language_and_their_combination() -> None:
    from mmsearch.search.syntax import parse

    assert [t.weight for t in parse("100:dog + -100:cat + 0.001:cow - 0:x").terms] == [
        100, -100, 0.001, 0]
    for text in ("1e999:dog + cat", "1e308:dog + 1e308:cat", "101:dog", "1e-9:dog"):
        with pytest.raises(UsageError, match="weight"):
            parse(text)
    with pytest.raises(UsageError, match="weight"):
        Query.text("dog", 50) * 3
    with pytest.raises(UsageError, match="too many terms"):
        parse(" + ".join(["dog"] * (MAX_TERMS + 1)))
    with pytest.raises(UsageError, match="query too long"):
        parse("dog " * 3000)
    v = np.random.default_rng(1).standard_normal((2, 8))
    np.testing.assert_allclose(combine(v, [0.001, 0.002]), combine(v, [1, 2]), atol=1e-6)
    with pytest.raises(UsageError, match="cancel"):
        combine(v, [0, 0])


def test_filters_keep_one_folder(engine: Engine, shapes: dict[Path, str], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    tinyclip.draw_shape("red", "circle", seed=60).save(other / "x.png")
    engine.index([other])
    hits = engine.search("a red circle", k=50, filters=Filters(within=other))
    assert [h.path.name for h in hits] == ["x.png"]


def test_hits_serialise_through_one_function() -> None:
    hit = ImageHit(1, 0.5, 7, Path("/a/b.jpg"), taken="2023-07-14T18:30:00", ext="jpg")
    data = to_json([hit])[0]
    assert {k: data[k] for k in ("rank", "score", "id", "path", "taken", "ext", "lens")} == {
        "rank": 1, "score": 0.5, "id": 7, "path": "/a/b.jpg", "taken": "2023-07-14T18:30:00",
        "ext": "jpg", "lens": None}
    assert to_json({"k": (np.float32(0.25), None)}) == {"k": [0.25, None]}


def test_combine_is_the_normalised_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 8))
    got = combine(v, [2.0, -1.0, 0.5])
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    want = 2 * unit[0] - unit[1] + 0.5 * unit[2]
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-6)


def test_an_empty_index_answers_at_once_without_a_model(home: Path) -> None:
    """A first `index` that failed (offline, say) leaves an empty index; a query then says
    so in one line instead of loading (or downloading) the default model."""
    with Engine.open("default"):
        pass
    with Engine.open("default", create=False) as engine:
        with pytest.raises(EmptyIndexError, match="index 'default' is empty; run `mmsearch index"):
            engine.search("red sports car")
        with pytest.raises(EmptyIndexError, match="no texts"):
            engine.search_texts("red sports car")
        assert engine._embedder is None and engine._text_embedder is None
    from typer.testing import CliRunner

    from mmsearch.cli import app

    result = CliRunner().invoke(app, ["query", "red sports car"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "mmsearch: index 'default' is empty; run `mmsearch index FOLDER`"]


def test_a_reader_sees_another_writers_commits(engine: Engine, tiny_model: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """A long-lived reader (a server) picks up what another writer committed, no restart."""
    config, ckpt = tiny_model
    with Engine.open("shapes", create=False) as reader:
        assert len(reader.search("a red circle", k=100)) == 24
        folder = tmp_path / "new"
        folder.mkdir()
        tinyclip.draw_shape("red", "circle", seed=61).save(folder / "fresh.png")
        assert engine.index([folder]).added == 1  # another Engine, as another process would
        hits = reader.search("a red circle", k=100)
        assert len(hits) == 25 and "fresh.png" in {h.path.name for h in hits}
        assert reader.store.refresh() is False  # nothing new since


def test_texts_are_added_and_replaced_without_rebuilding(engine: Engine) -> None:
    engine.add_texts([("c1", "a red circle"), ("c2", "a blue square")])
    index = engine.store.vectors("texts")
    report = engine.add_texts([("c1", "a green triangle"), ("c3", "a yellow circle")])
    assert (report.added, report.replaced, report.unchanged) == (1, 1, 0)
    assert engine.store.vectors("texts") is index and index.ntotal == 3
    probe = tinyclip.draw_shape("green", "triangle", seed=62)
    assert engine.search_texts(image=probe, k=1)[0].key == "c1"
    assert engine.check() == ([], [])


def test_the_device_governs_faiss(home: Path) -> None:
    assert (faiss_gpu("cpu"), faiss_gpu("auto"), faiss_gpu("cuda"), faiss_gpu("cuda:1")) == (
        None, -1, 0, 1)
    with pytest.raises(UsageError):
        faiss_gpu("tpu")
    with Engine.open("dev", device="cpu") as engine:
        assert engine.store.vectors("images").gpu is None


def test_a_query_in_a_script_the_model_does_not_read_gets_a_hint(engine: Engine) -> None:
    """The tiny model's text tower is CLIP's English one: a Chinese query still answers,
    with one hint naming the multilingual presets; an English one has none."""
    hits = engine.search("红色的跑车", k=3)
    assert len(hits) == 3 and "Chinese script" in hits.hint and "--model multilingual" in hits.hint
    assert engine.search("a red circle", k=3).hint is None
    from typer.testing import CliRunner

    from mmsearch.cli import app

    result = CliRunner().invoke(app, ["query", "赤いスポーツカー", "-k", "2", "--index", "shapes"])
    assert result.exit_code == 0
    assert "mmsearch: hint: tinyclip-test reads English only, and this query is in Japanese script" \
        in result.output


def test_scripts_are_detected_by_their_letters_not_guessed() -> None:
    from mmsearch.models.identity import identify
    from mmsearch.models.languages import language_hint, reads_english_only, scripts

    assert scripts("红色的跑车") == ["Chinese"] and scripts("빨간 자동차") == ["Korean"]
    assert scripts("красная машина") == ["Cyrillic"] and scripts("سيارة حمراء") == ["Arabic"]
    assert scripts("café crème, 2 dogs!") == [] and scripts("") == []
    assert reads_english_only(identify(None, None))
    assert not reads_english_only(identify("multilingual", None))
    assert language_hint(identify("multilingual", None), ["红色的跑车"]) is None
    assert language_hint(identify(None, None), ["red car"]) is None
