"""The plain-torch text tower: equal to open_clip's, used only where it applies, open_clip-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import draw_shapes
from mmsearch.engine import Engine
from mmsearch.errors import ModelMismatchError
from mmsearch.models import Embedder, identify, load_embedder, load_text_encoder

TEXTS = ["a red circle", "two dogs play in the snow near a wooden fence", "", "  A  Blue SQUARE!! ",
         "Ünïcödé &amp; <b>tags</b> 123", "word " * 100]


def open_clip_vectors(config: Path | str, ckpt: Path) -> np.ndarray:
    """open_clip's own ``encode_text`` over the full padded context, normalised."""
    import torch

    emb = load_embedder(identify(str(config), str(ckpt)), "cpu")
    with torch.inference_mode():
        out = emb._model.encode_text(emb._tokenizer(TEXTS))
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def lean_vectors(config: Path | str, ckpt: Path) -> np.ndarray:
    enc = load_text_encoder(identify(str(config), str(ckpt)), "cpu")
    assert not isinstance(enc, Embedder), "expected the plain-torch tower"
    first = enc.encode_texts(TEXTS)  # over views of the checkpoint's matrices
    enc._text_cache.clear()
    again = enc.encode_texts(TEXTS)  # over packed copies (from the second encoding on)
    assert np.abs(first - again).max() < 1e-6
    return again


def random_checkpoint(config: Path, out: Path) -> dict:
    """A randomly initialised model of ``config`` saved as a plain state dict at ``out``."""
    import torch

    emb = load_embedder(identify(str(config), "none"), "cpu")
    state = {k: v.detach().clone() for k, v in emb._model.state_dict().items()}
    torch.save(state, out)
    return state


def variant_config(tiny_config: Path, folder: Path, name: str, **changes: object) -> Path:
    cfg = json.loads(tiny_config.read_text())
    for key, value in changes.items():
        if key.startswith("text_"):
            cfg["text_cfg"][key[5:]] = value
        else:
            cfg[key] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_trained_tiny_model_equals_open_clip(tiny_model: tuple[Path, Path]) -> None:
    config, ckpt = tiny_model
    lean, ref = lean_vectors(config, ckpt), open_clip_vectors(config, ckpt)
    assert lean.shape == ref.shape and lean.dtype == np.float32
    assert np.abs(lean - ref).max() < 1e-5


def test_checkpoint_layouts_and_quick_gelu_equal_open_clip(tmp_path: Path, tiny_config: Path) -> None:
    import torch
    from safetensors.torch import save_file

    qg = variant_config(tiny_config, tmp_path, "tinyclip-quickgelu", quick_gelu=True)
    for config in (tiny_config, qg):
        state = random_checkpoint(config, tmp_path / "plain.pt")
        layouts = {
            "plain.pt": None,
            "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
            "half.pt": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        }
        for name, obj in layouts.items():
            if obj is not None:
                torch.save(obj, tmp_path / name)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
        for name in [*layouts, "w.safetensors"]:
            lean = lean_vectors(config, tmp_path / name)
            ref = open_clip_vectors(config, tmp_path / name)
            assert np.abs(lean - ref).max() < 1e-5, (config.name, name)


def test_other_towers_and_formats_fall_back_to_open_clip(tmp_path: Path, tiny_config: Path) -> None:
    import torch

    state = random_checkpoint(tiny_config, tmp_path / "w.pt")
    legacy = tmp_path / "legacy.pt"  # not a zip archive: cannot be memory-mapped
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    scaled = variant_config(tiny_config, tmp_path, "tinyclip-ls", text_ls_init_value=0.5)
    random_checkpoint(scaled, tmp_path / "ls.pt")
    for config, weights in [(tiny_config, legacy), (scaled, tmp_path / "ls.pt"),
                            (tiny_config, "none")]:
        enc = load_text_encoder(identify(str(config), str(weights)), "cpu")
        assert isinstance(enc, Embedder), (config.name, weights)
        if weights != "none":  # random weights need the whole model's seeded initialisation
            assert not enc.has_image_tower
            assert np.abs(enc.encode_texts(TEXTS) - open_clip_vectors(config, Path(weights))).max() < 1e-5


def test_a_checkpoint_changed_after_indexing_is_refused(tmp_path: Path, tiny_config: Path) -> None:
    ckpt = tmp_path / "w.pt"
    random_checkpoint(tiny_config, ckpt)
    ident = identify(str(tiny_config), str(ckpt))
    random_checkpoint(variant_config(tiny_config, tmp_path, "other", text_layers=1), ckpt)
    with pytest.raises(ModelMismatchError, match="contents changed"):
        load_text_encoder(ident, "cpu")
    with pytest.raises(ModelMismatchError, match="contents changed"):
        load_embedder(ident, "cpu")


def test_a_text_query_process_imports_neither_open_clip_nor_torchvision(
        tmp_path: Path, home: Path, tiny_model: tuple[Path, Path]) -> None:
    config, ckpt = tiny_model
    shapes = draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("t", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([tmp_path / "photos"])
        expected = [(str(h.path), round(h.score, 5)) for h in engine.search("a red circle", k=3)]
    code = ("import json, sys\nfrom mmsearch.engine import Engine\n"
            f"e = Engine.open('t', home={str(home)!r}, create=False)\n"
            "hits = [(str(h.path), round(h.score, 5)) for h in e.search('a red circle', k=3)]\n"
            "mods = [m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules]\n"
            "print(json.dumps({'hits': hits, 'mods': mods}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mods"] == []
    assert [tuple(h) for h in result["hits"]] == expected
    assert shapes[Path(expected[0][0])] == "a red circle"


def test_a_tagged_model_records_its_cached_file_for_open_clip_free_queries(
        tmp_path: Path, home: Path, tiny_model: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pretrained tag (registered here as open_clip registers its own, with the file
    it resolves to) is indexed through open_clip; a later query process in which open_clip
    does not even know the tag embeds its text from the recorded file."""
    import open_clip
    from open_clip import pretrained

    config, ckpt = tiny_model
    open_clip.add_model_config(str(config))
    monkeypatch.setitem(pretrained._PRETRAINED, "tinyclip-test",
                        {"shapes_v1": pretrained._pcfg(file=str(ckpt))})
    draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("t", model=str(config), pretrained="shapes_v1") as engine:
        assert engine.identity.fingerprint == "tag:shapes_v1"
        engine.index([tmp_path / "photos"])
        assert engine.store.weights_file == str(ckpt)
        expected = [(str(h.path), round(h.score, 5)) for h in engine.search("a red circle", k=3)]
    code = ("import json, sys\nfrom mmsearch.engine import Engine\n"
            f"e = Engine.open('t', home={str(home)!r}, create=False)\n"
            "hits = [(str(h.path), round(h.score, 5)) for h in e.search('a red circle', k=3)]\n"
            "print(json.dumps({'hits': hits, 'open_clip': 'open_clip' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"hits": [list(h) for h in expected], "open_clip": False}


def test_text_queries_take_the_plain_torch_tower_even_with_the_full_model_loaded(
        home: Path, tiny_model: tuple[Path, Path], shapes: dict) -> None:
    """A server (or an index run) has the full model loaded; its text queries still go
    through the faster plain-torch tower, with the same results."""
    from mmsearch import Engine

    config, ckpt = tiny_model
    with Engine.open("lean", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([next(iter(shapes)).parent])
        full = engine.embedder.encode_texts(["a red circle"])
        assert type(engine.text_embedder).__name__ == "_PlainTextEncoder"
        np.testing.assert_allclose(engine.embed_texts(["a red circle"]), full, atol=1e-5)
        assert engine.search("a red circle", k=2)[0].path.name.startswith("red_circle_")
