"""Multilingual (Chinese) search with a tiny local-dir open_clip model whose text tower is
a Hugging Face BERT (see tests/tinyml.py); everything offline."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from conftest import draw_shapes
from PIL import Image

import tinyclip
import tinyml

RED_CIRCLE_ZH = "一个红色的圆"
BLUE_SQUARE_ZH = "一个蓝色的正方形"



@pytest.fixture(scope="session")
def ml_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny multilingual model's local-dir D, in a tmp dir (trained once, cached in
    .pytest_cache and copied, so tests also prove a moved D still loads)."""
    cached = tinyml.build_tiny_multilingual(Path(request.config.cache.mkdir("tinyml")))
    d = tmp_path_factory.mktemp("ml") / "tiny-ml"
    shutil.copytree(cached, d)
    return tinyml.build_tiny_multilingual(d)  # reuses the weights, repoints hf_model_name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face hub, and no network at all: any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def ml_model(ml_dir: Path):
    """(model in eval mode, preprocess, tokenizer) loaded by open_clip from ``local-dir:D``."""
    import open_clip

    name = f"local-dir:{ml_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def _encode_images(model, preprocess, images: list[Image.Image]):
    import torch

    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)


def _encode_texts(model, tokenizer, texts: list[str]):
    import torch

    with torch.no_grad():
        return model.encode_text(tokenizer(texts), normalize=True)


# -- open_clip itself ----------------------------------------------------------------------

def test_local_dir_loads_offline(ml_dir: Path, offline: None, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import open_clip
    import torch
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer
    from safetensors.torch import load_file

    cfg = json.loads((ml_dir / "open_clip_config.json").read_text(encoding="utf-8"))
    text_cfg = cfg["model_cfg"]["text_cfg"]
    assert Path(text_cfg["hf_model_name"]) == ml_dir / "hf"  # absolute, inside this D
    assert set(cfg) == {"model_cfg", "preprocess_cfg"}

    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    name = f"local-dir:{ml_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    assert isinstance(model, open_clip.CustomTextCLIP)
    assert isinstance(model.text, HFTextEncoder)
    assert model.text.transformer.config.model_type == "bert"
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.context_length == tinyml.CONTEXT_LENGTH

    # the CLIP checkpoint in D was loaded (not a random from_config tower)
    saved = load_file(str(ml_dir / tinyml.WEIGHTS_NAME))
    state = model.state_dict()
    assert set(saved) == set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key

    ids = tokenizer([RED_CIRCLE_ZH, "a red circle"])
    assert ids.shape == (2, tinyml.CONTEXT_LENGTH)
    unk = tokenizer.tokenizer.unk_token_id
    assert not (ids == unk).any(), "the vocabulary must cover the captions"
    # one token per Chinese character, plus [CLS] and [SEP]
    assert int((ids[0] != tokenizer.tokenizer.pad_token_id).sum()) == len(RED_CIRCLE_ZH) + 2


@pytest.mark.parametrize("query", [RED_CIRCLE_ZH, "a red circle"])
def test_open_clip_ranks_red_circles_first(ml_model, query: str) -> None:
    model, preprocess, tokenizer = ml_model
    labels, images = [], []
    for color, shape in tinyclip.combos():
        for seed in range(2):  # held-out seeds
            labels.append((color, shape))
            images.append(tinyclip.draw_shape(color, shape, seed=seed))
    scores = (_encode_images(model, preprocess, images) @ _encode_texts(model, tokenizer, [query]).T)[:, 0]
    top = scores.argsort(descending=True)[:2].tolist()
    assert [labels[i] for i in top] == [("red", "circle")] * 2, [labels[i] for i in top]


def test_open_clip_blue_square_image_finds_its_caption(ml_model) -> None:
    model, preprocess, tokenizer = ml_model
    image = _encode_images(model, preprocess, [tinyclip.draw_shape("blue", "square", seed=42)])
    for captions, expected in [(tinyml.captions_zh(), BLUE_SQUARE_ZH),
                               (tinyml.captions_en(), "a blue square")]:
        scores = (image @ _encode_texts(model, tokenizer, captions).T)[0]
        assert captions[int(scores.argmax())] == expected


# -- the engine: local-dir: models through mmsearch ----------------------------------------------

@pytest.fixture
def shape_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "shapes"
    draw_shapes(folder)  # 2 held-out images per (colour, shape): seeds 0 and 1
    return folder


def test_engine_chinese_query_finds_red_circles(ml_dir: Path, home: Path, shape_folder: Path,
                                                offline: None) -> None:
    from mmsearch import Engine

    with Engine.open("ml", home=home, model=f"local-dir:{ml_dir}") as e:
        e.index([shape_folder])
        hits = e.search(RED_CIRCLE_ZH, k=2)
        assert [h.rank for h in hits] == [1, 2]
        assert all(h.path.name.startswith("red_circle_") for h in hits), hits


def test_engine_gives_no_script_hint_for_a_model_that_reads_chinese(
        ml_dir: Path, home: Path, shape_folder: Path, offline: None) -> None:
    from mmsearch import Engine

    with Engine.open("ml", home=home, model=f"local-dir:{ml_dir}") as e:
        e.index([shape_folder])
        assert e.search(RED_CIRCLE_ZH, k=2).hint is None  # its text tower reads Chinese
        assert e.search("a red circle", k=2).hint is None


def test_engine_image_finds_chinese_caption(ml_dir: Path, home: Path, shape_folder: Path,
                                            tmp_path: Path, offline: None) -> None:
    from mmsearch import Engine

    probe = tmp_path / "probe.png"
    tinyclip.draw_shape("green", "triangle", seed=77).save(probe)
    with Engine.open("ml", home=home, model=f"local-dir:{ml_dir}") as e:
        e.index([shape_folder])
        report = e.add_texts(tinyml.captions_zh())
        assert report.added == 12
        hits = e.search_texts(image=probe, k=1)
        assert hits[0].text == "一个绿色的三角形"


def test_engine_scores_equal_open_clip_for_chinese_query(ml_dir: Path, ml_model, home: Path,
                                                        shape_folder: Path, offline: None) -> None:
    model, preprocess, tokenizer = ml_model
    from mmsearch import Engine

    with Engine.open("ml", home=home, model=f"local-dir:{ml_dir}") as e:
        e.index([shape_folder])
        hits = e.search(BLUE_SQUARE_ZH, k=24)
        assert len(hits) == 24
        text = _encode_texts(model, tokenizer, [BLUE_SQUARE_ZH])
        for hit in hits:
            image = _encode_images(model, preprocess, [Image.open(hit.path).convert("RGB")])
            assert hit.score == pytest.approx(float(image @ text.T), abs=1e-4), hit.path.name
        assert hits[0].path.name.startswith("blue_square_")


def test_english_only_model_hints_at_chinese(tiny_model: tuple[Path, Path], home: Path,
                                             shape_folder: Path) -> None:
    """The contrast to the tests above: the English tiny CLIP says it does not read Chinese."""
    from mmsearch import Engine

    config, ckpt = tiny_model
    with Engine.open("en", home=home, model=str(config), pretrained=str(ckpt)) as e:
        e.index([shape_folder])
        hits = e.search(RED_CIRCLE_ZH, k=2)
        assert hits.hint and "Chinese" in hits.hint
        assert e.search("a red circle", k=2).hint is None
