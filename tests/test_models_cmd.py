"""`mmsearch models`: presets and cached models, their sizes, runtimes and published figures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import draw_shapes
from mmsearch.models import configsize, listing, texttower, towerfile
from mmsearch.models.identity import identify

CLI = str(Path(sys.executable).parent / "mmsearch")
HEAVY = ("torch", "open_clip", "faiss", "transformers")


def run_models(home: Path, tmp_path: Path, *args: str, hf_home: Path | None = None,
               importtime: bool = False) -> subprocess.CompletedProcess:
    """``mmsearch models --home HOME ARGS`` with private caches and HF_HUB_OFFLINE unset:
    whatever it looks up, it must answer from the disk (this machine has no network)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                        "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT")}
    env.update(HOME=str(tmp_path / "user"), HF_HOME=str(hf_home or tmp_path / "hf"))
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    run = subprocess.run([CLI, "models", "--home", str(home), *args], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def imported_heavy(run: subprocess.CompletedProcess) -> list[str]:
    """The heavy libraries a run imported (from ``-X importtime``'s report on stderr)."""
    loaded = {line.rsplit("|", 1)[-1].strip().split(".")[0]
              for line in run.stderr.splitlines() if line.startswith("import time:")}
    return sorted(loaded & set(HEAVY))


def vendored_rows() -> list[dict[str, str]]:
    with listing.PUBLISHED.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_an_empty_home_lists_the_presets_without_torch_or_open_clip(tmp_path: Path) -> None:
    run = run_models(tmp_path / "home", tmp_path, "--json", importtime=True)
    assert imported_heavy(run) == []
    entries = {e["name"]: e for e in json.loads(run.stdout)}
    assert list(entries)[:3] == ["default", "multilingual", "chinese"]
    assert {"MobileCLIP2-S0 / dfndr2b", "ViT-L-14 / laion2b_s32b_b82k"} <= set(entries)
    default = entries["default"]
    assert (default["arch"], default["pretrained"]) == ("ViT-B-32", "laion2b_s34b_b79k")
    sizes = default["params"], default["image_size"], default["embed_dim"]
    assert sizes == (151_277_313, 224, 512)
    assert default["weights"] == "not cached" and default["runtimes"]["torch"] == "first use"
    assert entries["ViT-L-14 / laion2b_s32b_b82k"]["embed_dim"] == 768
    assert entries["chinese"]["runtimes"] == {"torch": "missing", "onnx": "n/a",
                                              "onnx-int8": "n/a", "numpy-text": "n/a"}
    assert entries["multilingual"]["runtimes"]["numpy-text"] == "n/a"  # an HF text tower
    table = run_models(tmp_path / "home", tmp_path).stdout
    assert table.splitlines()[0].split()[:3] == ["MODEL", "FOR", "PARAMS"]
    assert "151.3M" in table and "Flickr30K-CN 62.7" in table


def test_the_published_figures_are_the_vendored_rows(tmp_path: Path) -> None:
    rows = [r for r in vendored_rows() if (r["arch"], r["pretrained"]) == ("ViT-B-32",
                                                                         "laion2b_s34b_b79k")]
    assert {r["figure"] for r in rows} >= {"flickr30k_t2i_r1", "coco_t2i_r1", "imagenet1k_top1"}
    (default,) = [e for e in listing.list_models(tmp_path / "home") if e.name == "default"]
    assert default.figures == {r["figure"]: float(r["value"]) for r in rows
                               if r["figure"] not in listing.SHAPE_FIGURES}
    assert default.figures["flickr30k_t2i_r1"] == 66.78  # as README cites it (66.8)
    mobile = next(e for e in listing.list_models(tmp_path / "home") if e.arch == "MobileCLIP2-S0")
    assert "xtd10_zh_t2i_r1" not in mobile.figures  # not published: shown as —, never made up


def test_every_vendored_row_names_a_described_source_and_a_listed_model() -> None:
    figures, sources = listing.read_published()
    assert {r["source"] for r in vendored_rows()} <= set(sources)
    listed = {(e.arch, e.pretrained) for e in listing.list_models(Path("/nonexistent"))}
    assert set(figures) <= listed


def test_sizes_from_the_config_equal_open_clips_models(tiny_model: tuple[Path, Path]) -> None:
    import open_clip

    config, _ = tiny_model
    open_clip.add_model_config(str(config))
    for arch, path in (("tinyclip-test", str(config)), ("ViT-B-32", None), ("RN50", None)):
        cfg = configsize.model_config(arch, path)
        model = open_clip.create_model(arch, device="meta")
        assert configsize.count_parameters(cfg) == sum(p.numel() for p in model.parameters()), arch
        assert configsize.embed_dim(cfg) == model.text_projection.shape[1]
        size = model.visual.image_size
        assert configsize.image_size(cfg) == (size if isinstance(size, int) else size[0])


def test_counted_towers_equal_open_clips_build() -> None:
    """The MobileCLIP2 counts (a timm image tower, not countable from the config) are
    what open_clip builds today; the ViT counts agree with open_clip's published table."""
    import open_clip

    for arch, count in configsize.COUNTED.items():
        assert configsize.count_parameters(configsize.model_config(arch)) is None
        model = open_clip.create_model(arch, device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, arch
    published = {(r["arch"], r["pretrained"]): float(r["value"]) for r in vendored_rows()
                 if r["figure"] == "params_m"}
    for arch, tag in (("ViT-B-16", "laion2b_s34b_b88k"), ("ViT-L-14", "laion2b_s32b_b82k")):
        counted = configsize.count_parameters(configsize.model_config(arch))
        assert abs(counted / 1e6 - published[(arch, tag)]) < 0.006, arch


def test_a_cached_checkpoint_is_torch_ready_and_its_text_tower_file_shows(
        tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    config, ckpt = tiny_model
    home = tmp_path / "home"
    identity = identify(str(config), str(ckpt))
    item = listing.IndexedModel("shapes", identity)

    def entry() -> listing.ModelEntry:
        (found,) = [e for e in listing.list_models(home, [item]) if e.indexes]
        return found

    before = entry()
    assert (before.weights, before.weights_path) == ("cached", str(ckpt))
    assert before.runtimes["torch"] == "ready" and before.runtimes["numpy-text"] == "first use"
    assert before.params == configsize.count_parameters(configsize.model_config("x", str(config)))
    assert (before.image_size, before.embed_dim, before.figures) == (32, 64, {})
    tower = texttower.load(identity.arch, identity.config_path, ckpt, home)  # as a query writes it
    assert tower is not None and list((home / towerfile.FOLDER).iterdir())
    assert entry().runtimes["numpy-text"] == "ready"
    moved = replace(identity, pretrained=str(tmp_path / "moved.pt"))  # the file is elsewhere now
    (gone,) = [e for e in listing.list_models(home, [listing.IndexedModel("old", moved)])
               if e.indexes]
    assert gone.weights == "missing" and set(gone.runtimes.values()) == {"missing"}


def test_the_command_lists_the_model_of_an_index(
        tmp_path: Path, home: Path, tiny_model: tuple[Path, Path]) -> None:
    from mmsearch.engine import Engine

    config, ckpt = tiny_model
    draw_shapes(tmp_path / "photos", per_combo=1)
    with Engine.open("shapes", model=str(config), pretrained=str(ckpt)) as engine:
        engine.index([tmp_path / "photos"])
    entries = json.loads(run_models(home, tmp_path, "--json").stdout)
    (mine,) = [e for e in entries if e["indexes"]]
    assert mine["indexes"] == ["shapes"] and mine["listed_as"] == ["index"]
    assert mine["name"] == f"tinyclip-test / {ckpt.name}"
    assert mine["weights"] == "cached" and mine["runtimes"]["torch"] == "ready"
    assert mine["runtimes"]["numpy-text"] == "ready"  # written when the index was built
    row = next(line for line in run_models(home, tmp_path).stdout.splitlines()
               if line.startswith("tinyclip-test"))
    assert "index shapes" in row and "3.6M" in row


def test_a_tag_in_the_hugging_face_cache_shows_as_cached(tmp_path: Path) -> None:
    """A cache laid out as huggingface_hub lays it (the file's contents do not matter to a
    listing), found through open_clip's registry without the network; where the tags
    download from is kept under the home, so the next listing does not import open_clip."""
    repo = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really weights")
    runs = [run_models(tmp_path / "home", tmp_path, "--json", importtime=True) for _ in range(2)]
    first, second = (imported_heavy(r) for r in runs)
    assert "open_clip" in first and second == []
    assert (tmp_path / "home" / listing.TAGS_FILE).is_file()
    entries = json.loads(runs[1].stdout)
    assert json.loads(runs[0].stdout) == entries
    (default,) = [e for e in entries if e["name"] == "default"]
    assert default["weights"] == "cached" and default["listed_as"] == ["default", "cached"]
    assert default["weights_path"] == str(snapshot / "open_clip_model.safetensors")
    assert default["runtimes"]["torch"] == "ready"
    assert [e["name"] for e in entries].count("default") == 1


def test_an_exported_onnx_tower_shows_as_ready(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    pytest.importorskip("onnxruntime")
    from mmsearch.models import load_embedder

    config, ckpt = tiny_model
    home = tmp_path / "home"
    item = listing.IndexedModel("shapes", identify(str(config), str(ckpt)))

    def runtimes() -> dict[str, str]:
        (found,) = [e for e in listing.list_models(home, [item]) if e.indexes]
        return found.runtimes

    assert runtimes()["onnx"] == runtimes()["onnx-int8"] == "first use"
    embedder = load_embedder(item.identity, "cpu", runtime="onnx", home=home)
    assert embedder.runtime.runtime == "onnx"  # exported, not fallen back to torch
    assert (runtimes()["onnx"], runtimes()["onnx-int8"]) == ("ready", "first use")
