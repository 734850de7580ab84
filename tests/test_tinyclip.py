"""The tiny test CLIP (tests/tinyclip.py) is a real open_clip model that ranks well."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from tinyclip import (  # noqa: E402
    COLORS,
    SHAPES,
    TRAIN_SEED_BASE,
    caption,
    draw_shape,
    train_tiny_clip,
    write_config,
)

HELDOUT_SEEDS = range(4)  # never used in training (training seeds are >= TRAIN_SEED_BASE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyclip")
    config_path, ckpt_path = train_tiny_clip(out, seed=0)
    return out, config_path, ckpt_path


def test_caption_and_images():
    assert caption("red", "circle") == "a red circle"
    img = draw_shape("blue", "triangle", size=64, seed=3)
    assert img.mode == "RGB" and img.size == (64, 64)
    same = draw_shape("blue", "triangle", size=64, seed=3)
    other = draw_shape("blue", "triangle", size=64, seed=4)
    assert np.array_equal(np.asarray(img), np.asarray(same))
    assert not np.array_equal(np.asarray(img), np.asarray(other))
    assert max(HELDOUT_SEEDS) < TRAIN_SEED_BASE


def test_config_is_an_open_clip_config(tmp_path):
    path = write_config(tmp_path / "tiny-cfg.json")
    cfg = json.loads(path.read_text())
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)
    assert cfg["text_cfg"]["vocab_size"] == 49408
    open_clip.add_model_config(path)
    assert "tiny-cfg" in open_clip.list_models()
    tok = open_clip.get_tokenizer("tiny-cfg")
    assert tok(["a red circle"]).shape == (1, cfg["text_cfg"]["context_length"])


def test_checkpoint_loads_strictly_and_is_cached(tiny):
    out, config_path, ckpt_path = tiny
    assert config_path.parent == out and ckpt_path.is_file()
    # strict=True load inside open_clip's factory
    model, _, preprocess = open_clip.create_model_and_transforms(
        config_path.stem, pretrained=str(ckpt_path))
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(sd) == set(model.state_dict())
    x = preprocess(draw_shape("red", "circle"))
    assert x.shape == (3, 32, 32)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    mtime = os.stat(ckpt_path).st_mtime_ns
    assert train_tiny_clip(out, seed=0) == (config_path, ckpt_path)
    assert os.stat(ckpt_path).st_mtime_ns == mtime  # reused, not retrained


def test_rankings_are_meaningful(tiny):
    _, config_path, ckpt_path = tiny
    name = config_path.stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(ckpt_path))
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    k = len(HELDOUT_SEEDS)
    images, labels = [], []
    for i, (c, s) in enumerate(pairs):
        for seed in HELDOUT_SEEDS:
            images.append(preprocess(draw_shape(c, s, seed=seed)))
            labels.append(i)
    labels = torch.tensor(labels)
    with torch.no_grad():
        t = model.encode_text(tokenizer([caption(c, s) for c, s in pairs]))
        v = model.encode_image(torch.stack(images))
    t = t / t.norm(dim=-1, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True)

    # text -> image
    top = (t @ v.T).topk(k, dim=1).indices  # (12, k)
    hits = labels[top] == torch.arange(len(pairs))[:, None]
    wrong_top1 = [caption(*pairs[i]) for i in range(len(pairs)) if not hits[i, 0]]
    assert not wrong_top1, f"top-1 image is the wrong combo for {wrong_top1}"
    precision = hits.float().mean().item()
    assert precision >= 0.9, f"text->image precision@{k} = {precision:.3f}"

    # image -> text
    acc = ((v @ t.T).argmax(dim=1) == labels).float().mean().item()
    assert acc >= 0.9, f"image->text top-1 accuracy = {acc:.3f}"
