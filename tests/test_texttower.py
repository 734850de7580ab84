"""The numpy text tower: equal to open_clip's, used only where it applies, torch- and open_clip-free.

Every test runs with a private MMSEARCH_HOME, where the towers' weights files are written."""

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

pytestmark = pytest.mark.usefixtures("home")

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
    assert not isinstance(enc, Embedder), "expected the numpy tower"
    first = enc.encode_texts(TEXTS)  # the process that wrote the tower file
    again = load_text_encoder(identify(str(config), str(ckpt)), "cpu").encode_texts(TEXTS)
    assert np.abs(first - again).max() < 1e-6  # one that only maps it
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


def test_each_text_alone_equals_open_clip(tiny_model: tuple[Path, Path], home: Path) -> None:
    """Texts of 2 to 16 tokens one at a time (the start token's keys and values reused, 1 to
    15 rows multiplied, the odd few padded), then the same start computed in full."""
    from mmsearch.models import texttower

    config, ckpt = tiny_model
    words = "a small red circle beside a big blue square on a white table near a door".split()
    texts = [" ".join(words[:n]) for n in range(len(words) + 1)]
    emb = load_embedder(identify(str(config), str(ckpt)), "cpu")
    ref = emb.encode_texts(texts)  # open_clip's modules, the text tower in torch
    tower = texttower.load(config.stem, str(config), ckpt, home, graph=False)  # numpy's path
    assert tower is not None
    alone = np.concatenate([tower.encode([t]) for t in texts])
    assert np.abs(alone - ref).max() < 1e-5
    assert tower._start is not None and len(tower._start) == tower.spec.layers
    full = texttower.TextTower(tower.spec, tower._w, tower._tokenizer)
    full._start_keys = lambda: None  # the start token's row multiplied like the others
    assert np.abs(full.encode(texts) - alone).max() < 1e-5


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
        save_file({k: (v.bfloat16() if v.is_floating_point() else v).contiguous()  # numpy has no
                   for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))  # bfloat16
        for name in [*layouts, "w.safetensors", "bf16.safetensors"]:
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
    """Nor ONNX Runtime: a one-query process answers through the numpy tower."""
    config, ckpt = tiny_model
    shapes = draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("t", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([tmp_path / "photos"])
        expected = [(str(h.path), round(h.score, 5)) for h in engine.search("a red circle", k=3)]
    code = ("import json, sys\nfrom mmsearch.engine import Engine\n"
            f"e = Engine.open('t', home={str(home)!r}, create=False)\n"
            "hits = [(str(h.path), round(h.score, 5)) for h in e.search('a red circle', k=3)]\n"
            "mods = [m for m in ('open_clip', 'torchvision', 'timm', 'onnxruntime', 'onnx')\n"
            "        if m in sys.modules]\n"
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
    through the faster numpy tower, with the same results."""
    from mmsearch import Engine

    config, ckpt = tiny_model
    with Engine.open("lean", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([next(iter(shapes)).parent])
        full = engine.embedder.encode_texts(["a red circle"])
        assert type(engine.text_embedder).__name__ == "_PlainTextEncoder"
        np.testing.assert_allclose(engine.embed_texts(["a red circle"]), full, atol=1e-5)
        assert engine.search("a red circle", k=2)[0].path.name.startswith("red_circle_")


def test_vit_b_32_random_weights_equal_open_clip(tmp_path: Path) -> None:
    """The full-size text tower (12 layers, width 512, 49408 tokens) to 1e-4, from a
    checkpoint holding only its text weights."""
    import open_clip
    import torch

    from mmsearch.models import texttower

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    ckpt = tmp_path / "vit-b-32-text.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}, ckpt)
    texts = [*TEXTS, "一只猫坐在垫子上 🐱", "a photo of " + "very " * 80 + "long text"]
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)), dim=-1).numpy()
    tower = texttower.load("ViT-B-32", None, ckpt, tmp_path / "home")
    assert tower is not None
    assert np.abs(tower.encode(texts) - ref).max() < 1e-4


def test_the_tower_file_is_written_once_and_again_when_the_weights_change(
        tmp_path: Path, tiny_config: Path) -> None:
    import torch

    from mmsearch.models import texttower, towerfile

    ckpt, home = tmp_path / "w.pt", tmp_path / "home"
    state = random_checkpoint(tiny_config, ckpt)
    spec = texttower.text_spec("tinyclip-test", str(tiny_config))
    assert spec is not None
    first = texttower.load("tinyclip-test", str(tiny_config), ckpt, home).encode(TEXTS)
    (path,) = (home / towerfile.FOLDER).iterdir()
    assert path.suffix == ".safetensors"
    written = path.stat().st_ino
    mapped = texttower.tower_weights(spec, ckpt, home)
    assert mapped is not None and not mapped["text_projection"].flags.writeable  # the mapped file
    assert path.stat().st_ino == written
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in state.items()}, ckpt)  # other weights at the same path
    second = texttower.load("tinyclip-test", str(tiny_config), ckpt, home).encode(TEXTS)
    assert list((home / towerfile.FOLDER).iterdir()) == [path] and path.stat().st_ino != written
    assert towerfile.header(path)[1]["source"] == identify(str(tiny_config), str(ckpt)).fingerprint
    assert np.abs(first - second).max() > 1e-2
    np.testing.assert_allclose(second, lean_vectors(tiny_config, ckpt), atol=1e-6)
    with path.open("r+b") as f:  # a damaged file (a full disk, say) is written again
        f.truncate(path.stat().st_size // 2)
    again = texttower.load("tinyclip-test", str(tiny_config), ckpt, home).encode(TEXTS)
    np.testing.assert_array_equal(again, second)


def test_a_safetensors_checkpoint_is_converted_without_torch(
        tmp_path: Path, tiny_config: Path) -> None:
    from safetensors.torch import save_file

    state = random_checkpoint(tiny_config, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    code = ("import json, sys\nfrom mmsearch.models import texttower\n"
            f"t = texttower.load('tinyclip-test', {str(tiny_config)!r}, "
            f"{str(tmp_path / 'w.safetensors')!r}, __import__('pathlib').Path({str(tmp_path / 'h')!r}))\n"
            f"v = t.encode({TEXTS!r})\n"
            "print(json.dumps({'v': v.tolist(), 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    ref = open_clip_vectors(tiny_config, tmp_path / "w.safetensors")
    assert np.abs(np.asarray(result["v"]) - ref).max() < 1e-5


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 31, 77])
def test_blocked_matrices_multiply_like_the_plain_ones(rows: int) -> None:
    """The tower file keeps each matrix as cache-sized blocks (an input split in parts
    where it is wider than the model); their product is the plain ``x @ W + b``."""
    from mmsearch.models.texttower import _blocked, _matmul

    rng = np.random.default_rng(rows)
    for (k, n), width in [((64, 192), 64), ((256, 64), 64), ((512, 2048), 512),
                          ((2048, 512), 512), ((40, 24), 40), ((96, 40), 48)]:
        w = rng.standard_normal((k, n), dtype=np.float32)
        b = rng.standard_normal(n, dtype=np.float32)
        x = rng.standard_normal((rows, k), dtype=np.float32)
        blocks = _blocked(w, width)
        assert blocks.ndim == 4 and blocks.flags.c_contiguous and blocks.size == w.size
        got = _matmul(x, blocks, b)
        assert got.shape == (rows, n) and got.dtype == np.float32
        np.testing.assert_allclose(got, x @ w + b, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_a_tower_file_of_the_previous_layout_is_written_again(
        tmp_path: Path, tiny_config: Path) -> None:
    """A file of format 1 (the matrices whole, ``[in, out]``) is a cache of another layout:
    it is replaced, not read."""
    from safetensors.numpy import save_file

    from mmsearch.models import texttower, towerfile

    ckpt, home = tmp_path / "w.pt", tmp_path / "home"
    state = {k: v.numpy() for k, v in random_checkpoint(tiny_config, ckpt).items()
             if not k.startswith("visual.") and v.is_floating_point()}
    spec = texttower.text_spec("tinyclip-test", str(tiny_config))
    path = towerfile.tower_path(home, ckpt, spec.to_json())
    path.parent.mkdir(parents=True)
    old = {k: np.ascontiguousarray(v.T if k.startswith("transformer.") and v.ndim == 2 else v)
           for k, v in state.items()}
    source = identify(str(tiny_config), str(ckpt)).fingerprint
    meta = {"format": "mmsearch-text-tower-1", "spec": spec.to_json(), "source": source}
    save_file(old, str(path), metadata=meta)
    assert towerfile.header(path) is None  # not this format
    got = texttower.load("tinyclip-test", str(tiny_config), ckpt, home).encode(TEXTS)
    entries, meta = towerfile.header(path)
    assert meta["format"] == towerfile.FORMAT
    assert len(entries["transformer.resblocks.0.mlp.c_fc.weight"]["shape"]) == 4
    assert np.abs(got - open_clip_vectors(tiny_config, ckpt)).max() < 1e-5


def test_from_the_second_text_the_matrices_are_read_into_huge_pages(
        tmp_path: Path, tiny_config: Path) -> None:
    """A process answering more than one query without ONNX Runtime's graph moves the
    layers' matrices off the page cache's map into its own memory (huge pages where Linux
    gives them): the same vectors;
    a tower file rewritten meanwhile from other weights is not read, the map goes on."""
    import torch

    from mmsearch.models import hugepages, texttower, towerfile

    ckpt, home = tmp_path / "w.pt", tmp_path / "home"
    state = random_checkpoint(tiny_config, ckpt)
    tower = texttower.load("tinyclip-test", str(tiny_config), ckpt, home, graph=False)
    matrices = [k for k, v in tower._w.items() if v.ndim == 4]
    first = tower.encode(TEXTS)
    mapped = {k: tower._w[k] for k in matrices}
    second = tower.encode(TEXTS)  # the second text: the matrices move
    np.testing.assert_array_equal(first, second)
    if hugepages.available():
        assert all(tower._w[k] is not mapped[k] and not tower._w[k].flags.writeable
                   for k in matrices)
    else:  # not Linux, or huge pages off: nothing to gain, nothing read
        assert all(tower._w[k] is mapped[k] for k in matrices)
    np.testing.assert_array_equal(tower.encode(TEXTS), first)

    other = texttower.load("tinyclip-test", str(tiny_config), ckpt, home, graph=False)
    other.encode(TEXTS)
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in state.items()}, ckpt)  # new weights at the same path...
    texttower.load("tinyclip-test", str(tiny_config), ckpt, home)  # ...and their tower file
    before = {k: other._w[k] for k in matrices}
    np.testing.assert_array_equal(other.encode(TEXTS), first)  # still the weights it began with
    assert all(other._w[k] is before[k] for k in matrices)
