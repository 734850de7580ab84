"""The image tower through ONNX Runtime -- open_clip's ModifiedResNet (the tiny test model)
and ViT, Chinese-CLIP's ViT: fp32 equal to torch, int8 recorded in the index's identity
(never mixed with fp32 vectors), a failed export falls back to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmsearch.engine import Engine
from mmsearch.errors import ModelMismatchError, UsageError
from mmsearch.models import identify
from mmsearch.models.backends import load_embedder
from mmsearch.models.onnxtower import FOLDER
from mmsearch.settings import resolve

pytest.importorskip("onnxruntime")


def embed(emb, photos: list[Path]) -> np.ndarray:
    from mmsearch.ingest.decode import load_image

    return emb.encode_images(emb.collate([emb.prepare(load_image(p)) for p in photos]))


def test_onnx_fp32_equals_torch_and_is_exported_once(
        tmp_path: Path, tiny_model: tuple[Path, Path], flickr_images: list[Path]) -> None:
    """The tiny test model's image tower is a ModifiedResNet (RN50's family, shrunk)."""
    from open_clip.modified_resnet import ModifiedResNet

    ident = identify(*map(str, tiny_model))
    photos = flickr_images[:24]
    torch_embedder = load_embedder(ident, "cpu", runtime="torch")
    assert isinstance(torch_embedder.torch_model.visual, ModifiedResNet)
    ref = embed(torch_embedder, photos)
    first = load_embedder(ident, "cpu", runtime="onnx", home=tmp_path)
    assert first.runtime.runtime == "onnx" and first.runtime.export_seconds is not None
    fp32 = embed(first, photos)
    assert fp32.dtype == np.float32 and (fp32 * ref).sum(1).min() >= 0.9999
    (exported,) = (tmp_path / FOLDER).iterdir()
    again = load_embedder(ident, "cpu", runtime="onnx", home=tmp_path)
    assert again.runtime.export_seconds is None and list((tmp_path / FOLDER).iterdir()) == [exported]
    np.testing.assert_allclose(embed(again, photos), fp32, atol=1e-6)
    int8 = embed(load_embedder(ident, "cpu", runtime="onnx-int8", home=tmp_path), photos)
    assert 0.95 < (int8 * fp32).sum(1).min() < 0.99999  # close, but not the same vectors


def test_a_failed_export_falls_back_to_torch_with_one_line(
        tmp_path: Path, tiny_model: tuple[Path, Path], flickr_images: list[Path],
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".models").mkdir()
    (tmp_path / FOLDER).write_text("not a folder")  # the export cannot be written
    ident = identify(*map(str, tiny_model))
    emb = load_embedder(ident, "cpu", runtime="onnx-int8", home=tmp_path)
    assert emb.runtime.runtime == "torch" and emb.image_precision == "fp32"
    notes = [r.getMessage() for r in caplog.records if r.name == "mmsearch.models"]
    assert len(notes) == 1 and "\n" not in notes[0] and "using torch" in notes[0]
    ref = load_embedder(ident, "cpu", runtime="torch")
    np.testing.assert_array_equal(embed(emb, flickr_images[:4]), embed(ref, flickr_images[:4]))


def test_int8_vectors_are_part_of_the_index_identity(
        home: Path, tiny_model: tuple[Path, Path], flickr_images: list[Path]) -> None:
    import shutil

    config, ckpt = tiny_model
    for i, p in enumerate(flickr_images[:6]):
        (home.parent / ("a" if i < 3 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, home.parent / ("a" if i < 3 else "b") / p.name)
    opts = {"model": str(config), "pretrained": str(ckpt), "device": "cpu"}
    with Engine.open("q", runtime="onnx-int8", **opts) as engine:
        assert engine.index([home.parent / "a"]).embedded == 3
        assert engine.store.model.image_precision == "int8"
    for runtime in ("torch", "onnx"):  # fp32 vectors into an int8 index: refused
        with Engine.open("q", runtime=runtime, **opts) as engine, \
                pytest.raises(ModelMismatchError, match="holds int8 image vectors"):
            engine.index([home.parent / "b"])
    with Engine.open("q", create=False) as engine:  # auto: the index's own runtime
        assert engine.index([home.parent / "b"]).embedded == 3
        assert engine.embedder.runtime.runtime == "onnx-int8"
        assert len(engine.search("a dog", k=6)) == 6
    with Engine.open("f", runtime="onnx", **opts) as engine:  # fp32 ONNX mixes with torch's
        engine.index([home.parent / "a"])
        assert engine.store.model.image_precision == "fp32"
    with Engine.open("f", runtime="onnx-int8", **opts) as engine, \
            pytest.raises(ModelMismatchError, match="holds fp32 image vectors"):
        engine.index([home.parent / "b"])
    with Engine.open("f", runtime="torch", **opts) as engine:
        assert engine.index([home.parent / "b"]).embedded == 3


def test_an_unknown_runtime_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--runtime"):
        resolve(runtime="tensorrt")


def test_vit_b_32_exports_and_equals_torch(tmp_path: Path, flickr_images: list[Path]) -> None:
    """The default architecture (random weights): its attention must not take torch's
    inference fast path while exporting, which has no ONNX form."""
    ident = identify("ViT-B-32", "none")
    emb = load_embedder(ident, "cpu", runtime="onnx", home=tmp_path)
    assert emb.runtime.runtime == "onnx", emb.runtime.note
    onnx = embed(emb, flickr_images[:4])
    emb.runtime = None  # the same model, through torch
    assert (onnx * embed(emb, flickr_images[:4])).sum(1).min() >= 0.9999


def test_execution_providers_follow_the_device() -> None:
    """CPU by default; CUDA only where the installed build has its provider (not here:
    onnxruntime from PyPI is CPU-only), refused in one line otherwise."""
    import onnxruntime as ort

    from mmsearch.models.onnxtower import providers, resolve_runtime

    assert providers("cpu") == ["CPUExecutionProvider"]
    assert providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert resolve_runtime("onnx", "cpu", "fp32") == "onnx"
    assert resolve_runtime("auto", "cpu", "int8") == "onnx-int8"
    assert resolve_runtime("auto", "cuda", "fp32") == "torch"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="no CUDAExecutionProvider"):
            resolve_runtime("onnx", "cuda", "fp32")


def write_tiny_chinese_clip(folder: Path) -> Path:
    """A random tiny Chinese-CLIP in Hugging Face layout, its tokenizer as OFA-Sys ship it:
    ``vocab.txt`` only (no ``tokenizer.json``)."""
    from test_chineseclip import SIZE, _tiny_model, _write_tokenizer
    from transformers import BertTokenizer, ChineseCLIPImageProcessorPil

    _write_tokenizer(folder)
    _tiny_model(len(BertTokenizer.from_pretrained(str(folder)))).save_pretrained(str(folder))
    processor = ChineseCLIPImageProcessorPil(size={"shortest_edge": SIZE},
                                             crop_size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(str(folder))
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def zh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_chinese_clip(tmp_path_factory.mktemp("zh") / "tiny-chinese-clip")


def test_chinese_clip_vision_tower_exports_and_equals_torch(
        tmp_path: Path, zh_dir: Path, flickr_images: list[Path]) -> None:
    ident = identify("chinese", str(zh_dir))
    photos = flickr_images[:8]
    ref = embed(load_embedder(ident, "cpu", runtime="torch"), photos)
    emb = load_embedder(ident, "cpu", runtime="onnx", home=tmp_path)
    assert emb.runtime.runtime == "onnx", emb.runtime.note
    assert emb.runtime.export_seconds is not None
    fp32 = embed(emb, photos)
    assert fp32.dtype == np.float32 and (fp32 * ref).sum(1).min() >= 0.9999
    int8 = load_embedder(ident, "cpu", runtime="onnx-int8", home=tmp_path)
    assert int8.image_precision == "int8" and emb.image_precision == "fp32"
    assert 0.9 < (embed(int8, photos) * fp32).sum(1).min() < 0.99999


def test_chinese_clip_falls_back_to_torch_with_one_line(
        tmp_path: Path, zh_dir: Path, flickr_images: list[Path],
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".models").mkdir()
    (tmp_path / FOLDER).write_text("not a folder")  # the export cannot be written
    ident = identify("chinese", str(zh_dir))
    emb = load_embedder(ident, "cpu", runtime="onnx", home=tmp_path)
    assert emb.runtime.runtime == "torch"
    notes = [r.getMessage() for r in caplog.records if r.name == "mmsearch.models"]
    assert len(notes) == 1 and "\n" not in notes[0] and "using torch" in notes[0]
    ref = load_embedder(ident, "cpu", runtime="torch")
    np.testing.assert_array_equal(embed(emb, flickr_images[:4]), embed(ref, flickr_images[:4]))


def test_the_cli_says_a_first_export_in_one_plain_line(
        tmp_path: Path, tiny_model: tuple[Path, Path], flickr_images: list[Path]) -> None:
    """open_clip logs at the root, which installs Python's default handler: the CLI's notes
    must still read as plain lines, not 'WARNING:mmsearch.models:...'."""
    import os
    import shutil
    import subprocess
    import sys

    config, ckpt = tiny_model
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in flickr_images[:3]:
        shutil.copy(p, photos / p.name)
    run = subprocess.run([sys.executable, "-m", "mmsearch", "index", str(photos), "--model",
                          str(config), "--pretrained", str(ckpt), "--runtime", "onnx"],
                         env={**os.environ, "MMSEARCH_HOME": str(tmp_path / "home")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert any(line.startswith("--runtime onnx: exported the image tower in ") for line in lines)
    assert not any("WARNING:" in line for line in lines), lines
