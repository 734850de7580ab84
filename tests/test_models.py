"""The model registry: identities, offline errors, and text-context trimming."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmsearch.errors import ModelError, ModelMismatchError, UsageError
from mmsearch.models import DEFAULT_MODEL, DEFAULT_PRETRAINED, identify, load_embedder


def test_defaults_and_identities(tmp_path: Path, tiny_config: Path) -> None:
    ident = identify(None, None)
    assert (ident.arch, ident.pretrained) == (DEFAULT_MODEL, DEFAULT_PRETRAINED)
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x" * 1000)
    a = identify(str(tiny_config), str(ckpt))
    moved = tmp_path / "moved.pt"
    ckpt.rename(moved)
    b = identify(str(tiny_config), str(moved))
    assert a.arch == "tinyclip-test" and a.fingerprint == b.fingerprint
    a.check_same(b)
    with pytest.raises(ModelMismatchError):
        a.check_same(identify(str(tiny_config), "none"))
    with pytest.raises(UsageError):
        identify("ViT-B-16", None)
    with pytest.raises(ModelError, match="checkpoint file not found"):
        identify("ViT-B-32", "/nope/weights.pt")
    with pytest.raises(ModelError, match="model config not found"):
        identify("/nope/cfg.json", "none")


def test_offline_download_gives_the_offline_alternative(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from huggingface_hub import constants  # read the variable at import: earlier tests imported it

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelError, match="--pretrained /path/to/checkpoint"):
        load_embedder(identify("RN50", "openai"))
    with pytest.raises(ModelError, match="no pretrained tag"):
        load_embedder(identify("ViT-B-32", "no-such-tag"))


def test_trimmed_text_encoding_equals_full_context() -> None:
    import torch

    from mmsearch.models.openclip import encode_text_trimmed

    emb = load_embedder(identify("ViT-B-32", "none"))
    texts = ["red sports car", "a dog running on the beach with a ball in its mouth", "",
             "x " * 100]
    tokens = emb._tokenizer(texts)
    with torch.inference_mode():
        full = emb._model.encode_text(tokens)
        trimmed = encode_text_trimmed(emb._model, tokens)
    assert torch.allclose(full, trimmed, atol=1e-5), (full - trimmed).abs().max()
    again = emb.encode_texts(["red sports car", "red sports car"])
    assert again.shape == (2, 512)
    assert abs(float((again[0] ** 2).sum()) - 1) < 1e-5


def test_presets_name_what_they_resolve_to(tmp_path: Path) -> None:
    """--model multilingual / chinese resolve without torch; a local folder works offline."""
    ml = identify("multilingual", None)
    assert (ml.backend, ml.arch, ml.pretrained) == ("open_clip", "xlm-roberta-base-ViT-B-32",
                                                    "laion5b_s13b_b90k")
    zh = identify("Chinese", None)
    assert (zh.backend, zh.pretrained, zh.fingerprint) == (
        "chinese_clip", "OFA-Sys/chinese-clip-vit-base-patch16", "hub:OFA-Sys/chinese-clip-vit-base-patch16")
    folder = tmp_path / "cn-clip"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    local = identify("chinese", str(folder))
    assert local.fingerprint.startswith("dir:file:") and local.backend == "chinese_clip"
    with pytest.raises(ModelError, match="model folder not found"):
        identify("chinese", str(tmp_path / "missing" / "cn"))
    with pytest.raises(ModelError, match="open_clip_config.json"):
        identify(f"local-dir:{tmp_path}", None)
    assert ml.key != identify("multilingual", str(folder / "model.safetensors")).key


def test_more_distinct_texts_than_the_cache_holds_in_one_call(tiny_model) -> None:
    """One call with 1,500 distinct texts (the cache keeps 1,024) gives every vector, the
    same as calls small enough for the cache."""
    import numpy as np

    config, ckpt = tiny_model
    emb = load_embedder(identify(str(config), str(ckpt)))
    texts = [f"a photo number {n}" for n in range(1500)]
    many = emb.encode_texts(texts + texts[:3])
    fresh = load_embedder(identify(str(config), str(ckpt)))
    few = np.concatenate([fresh.encode_texts(texts[i:i + 500]) for i in range(0, 1500, 500)])
    assert many.shape == (1503, few.shape[1])
    np.testing.assert_allclose(many[:1500], few, atol=1e-5)
    np.testing.assert_array_equal(many[1500:], many[:3])
