"""Tests for mmsearch.evaluate and `mmsearch eval`: reference agreement, cache, errors.

The model is a tiny open_clip config (tests/tinyclip.py) with random weights
saved once as a checkpoint file, so the engine and the reference load the very
same weights. The photos are real Flickr8k JPEGs from ../shared (skipped when
absent); the error tests need no photos and no model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from mmsearch.cli.eval import eval_command
from mmsearch.eval.datasets import RetrievalDataset, load_karpathy
from mmsearch.errors import DatasetError
from mmsearch.eval.evaluate import EvalResult, _positions, eval_index_name, evaluate
from mmsearch.eval.metrics import DEFAULT_KS, recalls_from_similarity
from mmsearch.models import identify
from mmsearch.settings import Settings, resolve

from evalref import better_counts, stored_embeddings
from tinyclip import write_config

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k"
FLICKR_JSON = FLICKR / "dataset_flickr8k_1k.json"
N_TEST, N_TRAIN = 30, 3
MODEL_STEM = "tiny-eval-random"


def _needs_photos() -> None:
    if not FLICKR_JSON.is_file():
        pytest.skip(f"shared Flickr8k sample not found at {FLICKR} (see ../shared/README.md)")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of a tiny CLIP with fixed random weights."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("model")
    config = write_config(folder / f"{MODEL_STEM}.json")
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_STEM, pretrained=None)
    # open_clip's own init makes a tiny image tower map every photo to nearly the
    # same vector (cosine ~0.99998, so rankings are decided by 1e-7 noise); weights
    # drawn with variance 1/fan-in spread the photos out (cosine ~0.94).
    with torch.no_grad():
        for weight in model.visual.parameters():
            if weight.dim() >= 2:
                weight.normal_(0.0, weight[0].numel() ** -0.5)
    checkpoint = folder / f"{MODEL_STEM}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return config, checkpoint


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Karpathy JSON over 30 real photos (split test) plus 3 train ones to be ignored."""
    _needs_photos()
    entries = json.loads(FLICKR_JSON.read_text())["images"][: N_TEST + N_TRAIN]
    for i, entry in enumerate(entries):
        entry["split"] = "test" if i < N_TEST else "train"
    path = tmp_path_factory.mktemp("data") / "dataset_sample.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return path


def _settings(home: Path, random_model: tuple[Path, Path]) -> Settings:
    config, checkpoint = random_model
    return resolve(home=home, model=str(config), pretrained=str(checkpoint), device="cpu",
                   draft=False, batch_size=8, workers=1)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, random_model: tuple[Path, Path],
              sample: Path) -> tuple[RetrievalDataset, Settings, EvalResult]:
    dataset = load_karpathy(sample, FLICKR / "images")
    settings = _settings(tmp_path_factory.mktemp("home"), random_model)
    return dataset, settings, evaluate(dataset, settings=settings)


# --------------------------------------------------------------------------- #
# (a) Agreement with plain open_clip + numpy
# --------------------------------------------------------------------------- #


def _reference_embeddings(dataset: RetrievalDataset,
                          random_model: tuple[Path, Path]) -> tuple[np.ndarray, np.ndarray]:
    """(caption vectors, image vectors), L2-normalised, by open_clip as its README shows
    (``Image.open``: full decoding)."""
    import open_clip
    import torch
    from PIL import Image

    config, checkpoint = random_model
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        MODEL_STEM, pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL_STEM)
    image_vecs, text_vecs = [], []
    with torch.no_grad():
        for start in range(0, dataset.n_images, 256):
            images = torch.stack([preprocess(Image.open(p).convert("RGB"))
                                  for p in dataset.image_paths[start:start + 256]])
            image_vecs.append(torch.nn.functional.normalize(model.encode_image(images), dim=-1))
        for start in range(0, dataset.n_captions, 1024):
            tokens = tokenizer(dataset.captions[start:start + 1024])
            text_vecs.append(torch.nn.functional.normalize(model.encode_text(tokens), dim=-1))
    return torch.cat(text_vecs).numpy(), torch.cat(image_vecs).numpy()


def _assert_matches_plain_open_clip(dataset: RetrievalDataset, settings: Settings,
                                    result: EvalResult, random_model: tuple[Path, Path],
                                    max_undecided: int) -> None:
    """The engine stored open_clip's vectors, and its recalls are numpy's on them."""
    text_vecs, image_vecs = _reference_embeddings(dataset, random_model)
    sim = text_vecs @ image_vecs.T
    ref_t2i, ref_i2t = recalls_from_similarity(sim, dataset.caption_image)

    # The engine stored the same vectors (same decoding, preprocessing, weights)...
    texts, images = stored_embeddings(settings, result.index_name, dataset)
    drift = (np.linalg.norm(images - image_vecs, axis=1).max()
             + np.linalg.norm(texts - text_vecs, axis=1).max())
    assert drift < 1e-4

    # ...so each engine score is within `tol` of numpy's (|dt| + |di| for unit vectors,
    # plus float32 rounding in FAISS's matrix product). A hit whose relevant score has
    # no rival within `tol` across the cut-off is the same in both; the others are
    # only bounded. With these weights (almost) every recall is decided: a plain equality.
    tol = drift + 1e-5
    t2i_counts, i2t_counts = better_counts(sim, dataset.caption_image, tol)
    undecided, slack = [], 0.0
    for direction, (sure, maybe), got, ref in (("t2i", t2i_counts, result.t2i, ref_t2i),
                                               ("i2t", i2t_counts, result.i2t, ref_i2t)):
        for k in DEFAULT_KS:
            low, high = 100 * np.mean(maybe < k), 100 * np.mean(sure < k)
            assert low - 1e-9 <= ref[k] <= high + 1e-9
            if np.isclose(low, high):
                assert got[k] == ref[k], (direction, k)
            else:
                assert low - 1e-9 <= got[k] <= high + 1e-9, (direction, k)
                undecided.append((direction, k))
                slack += high - low
    assert len(undecided) <= max_undecided, (
        f"near-ties decide {undecided}: the test weights lost their spread")
    assert result.rsum == pytest.approx(sum(ref_t2i.values()) + sum(ref_i2t.values()),
                                        abs=slack + 1e-9)
    assert result.mean_recall == pytest.approx(result.rsum / 6)


def test_recalls_match_plain_open_clip(first_run, random_model) -> None:
    dataset, settings, result = first_run
    _assert_matches_plain_open_clip(dataset, settings, result, random_model, max_undecided=1)
    assert result.n_images == N_TEST and result.n_captions == 5 * N_TEST


def test_recalls_match_plain_open_clip_on_flickr_1k(tmp_path: Path, random_model) -> None:
    """The whole 1,000-image / 5,000-caption sample, decoded in full by default."""
    _needs_photos()
    dataset = load_karpathy(FLICKR_JSON, FLICKR / "images")
    assert (dataset.n_images, dataset.n_captions) == (1000, 5000)
    settings = _settings(tmp_path / "home", random_model).with_(batch_size=64, draft=True)
    result = evaluate(dataset, settings=settings)  # settings.draft is not eval's to use
    assert result.draft is False and result.embedded == 1000
    _assert_matches_plain_open_clip(dataset, settings, result, random_model, max_undecided=2)


@pytest.fixture(scope="module")
def upscaled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Karpathy JSON over 8 Flickr photos upscaled 2x (about 1000x750): at least twice a
    224-px model's input, so the draft decodes them at a reduced DCT scale (1/2; 1/8 for
    the 32-px test model)."""
    from PIL import Image

    _needs_photos()
    root = tmp_path_factory.mktemp("upscaled")
    (root / "images").mkdir()
    entries = json.loads(FLICKR_JSON.read_text())["images"][:8]
    for entry in entries:
        with Image.open(FLICKR / "images" / entry["filename"]) as photo:
            big = photo.convert("RGB").resize((2 * photo.width, 2 * photo.height),
                                              Image.Resampling.BICUBIC)
        big.save(root / "images" / entry["filename"], quality=95)
    path = root / "dataset_upscaled.json"
    path.write_text(json.dumps({"dataset": "flickr8k-2x", "images": entries}))
    return path


def test_eval_decodes_in_full_unless_draft(upscaled, random_model, tmp_path: Path) -> None:
    """Without --draft the stored vectors are open_clip's own (Image.open + preprocess +
    encode_image); with --draft they are not, and the report says which it was."""
    config, checkpoint = random_model
    dataset = load_karpathy(upscaled, upscaled.parent / "images")
    common = ["--karpathy-json", str(upscaled), "--images", str(upscaled.parent / "images"),
              "--model", str(config), "--pretrained", str(checkpoint),
              "--home", str(tmp_path / "home"), "--device", "cpu", "--workers", "1"]
    runs = {}
    for mode, flags in (("full", []), ("draft", ["--draft"])):
        out = tmp_path / f"{mode}.json"
        run = _invoke(*common, *flags, "--json", str(out))
        assert run.exit_code == 0, run.output
        runs[mode] = json.loads(out.read_text())
        assert ("full JPEG decoding" in run.stdout) == (mode == "full")
    assert runs["full"]["draft"] is False and runs["draft"]["draft"] is True
    assert runs["full"]["index_name"] != runs["draft"]["index_name"]
    assert runs["draft"]["embedded"] == dataset.n_images  # not the full run's cached vectors
    assert any("draft" in note for note in runs["draft"]["notes"])

    _, reference = _reference_embeddings(dataset, random_model)
    settings = _settings(tmp_path / "home", random_model)
    moved = {mode: np.linalg.norm(stored_embeddings(settings, run["index_name"], dataset)[1]
                                  - reference, axis=1) for mode, run in runs.items()}
    assert moved["full"].max() < 1e-5, moved["full"]  # float32 rounding only
    # Every photo moved (by 4e-4 to 2e-2 with these weights), far beyond rounding.
    assert moved["draft"].min() > 1e-4 and moved["draft"].max() > 1e-3, moved["draft"]


def test_result_describes_the_run(first_run) -> None:
    dataset, settings, result = first_run
    assert result.embedded == N_TEST and result.texts_embedded == 5 * N_TEST
    assert result.images_per_second > 0 and result.eval_seconds >= result.embed_seconds
    assert result.index_type == "Flat" and result.approx_overlap is None
    assert result.model["arch"] == MODEL_STEM and result.device == "cpu"
    assert result.index_name == eval_index_name(
        "flickr8k", "test", identify(settings.model, settings.pretrained), draft=False)
    assert result.index_name.startswith("eval-flickr8k-test-tiny-eval-random-")
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data["t2i"]) == {"R@1", "R@5", "R@10"} and data["cached"] is False


def test_index_name_changes_with_weights_and_decoding() -> None:
    a = identify("ViT-B-32", "laion2b_s34b_b79k")
    b = identify("ViT-B-32", "openai")
    names = {eval_index_name("coco", "test", a, True), eval_index_name("coco", "test", b, True),
             eval_index_name("coco", "test", a, False),
             eval_index_name("coco/x y", "test", a, True)}
    assert len(names) == 4
    long = eval_index_name("d" * 80, "s" * 80, a, True)
    assert len(long) <= 64 and all(c.isalnum() or c in "._-" for c in long)


# --------------------------------------------------------------------------- #
# (b) The cached index
# --------------------------------------------------------------------------- #


def test_second_run_reuses_the_index(first_run) -> None:
    dataset, settings, first = first_run
    again = evaluate(dataset, settings=settings)
    assert again.index_name == first.index_name
    assert again.embedded == 0 and again.texts_embedded == 0 and again.cached
    assert again.t2i == first.t2i and again.i2t == first.i2t
    assert any("cached" in note for note in again.notes)


def test_approximate_index_on_the_cache(first_run) -> None:
    from mmsearch.engine import Engine

    dataset, settings, first = first_run
    approx = evaluate(dataset, settings=settings, index_type="hnsw")
    assert approx.embedded == 0 and approx.index_type.startswith("HNSW")
    assert approx.approx_overlap is not None and 0.0 <= approx.approx_overlap <= 1.0
    with Engine(settings.with_(index=first.index_name)) as engine:
        info = engine.info()
        assert info.image_index == "Flat" and engine.store.vectors("images").is_exact
        assert info.images == N_TEST  # the train entries were never indexed


def test_compressed_index_is_evaluated_with_the_engines_reranking(first_run) -> None:
    """8-bit codes rank approximately; the engine re-scores a pool of max(100, 10k) candidates
    exactly, which covers all 30 images here: the recalls are exact search's."""
    dataset, settings, first = first_run
    result = evaluate(dataset, settings=settings, index_type="IVF2,SQ4")
    assert result.index_type == "IVF2,SQ4" and result.approx_overlap == 1.0
    assert result.t2i == first.t2i and result.i2t == first.i2t


def test_untrainable_index_type_is_reported_as_exact(first_run) -> None:
    """IVF-PQ needs 256 training vectors per codebook; the engine falls back to Flat."""
    dataset, settings, first = first_run
    result = evaluate(dataset, settings=settings, index_type="ivfpq")
    assert result.index_type == "Flat" and result.approx_overlap is None
    assert any("'ivfpq' could not be built" in note for note in result.notes)
    assert result.t2i == first.t2i and result.i2t == first.i2t


def test_duplicate_and_symlinked_photos(tmp_path: Path, random_model) -> None:
    """Symlinked photos plus the same bytes under another name: embedded once, each
    name still its own image, and a second run finds them all in the cache."""
    _needs_photos()
    entries = json.loads(FLICKR_JSON.read_text())["images"][:2]
    root = tmp_path / "images"
    root.mkdir()
    for entry in entries:
        (root / entry["filename"]).symlink_to(FLICKR / "images" / entry["filename"])
    copy = dict(entries[0], filename="copy-of-first.jpg",
                sentences=[{"raw": f"copy caption {j}"} for j in range(5)])
    shutil.copy(FLICKR / "images" / entries[0]["filename"], root / copy["filename"])
    path = tmp_path / "dup.json"
    path.write_text(json.dumps({"images": [*entries, copy]}))
    dataset = load_karpathy(path, root)
    settings = _settings(tmp_path / "home", random_model)
    ks = (1, 3, dataset.n_captions)
    result = evaluate(dataset, settings=settings, ks=ks)
    assert result.embedded == 2 and result.n_images == 3
    # A wrong id -> image mapping (both copies as one image) would miss at K = everything.
    assert result.t2i[3] == 100.0 and result.i2t[dataset.n_captions] == 100.0
    again = evaluate(dataset, settings=settings, ks=ks)
    assert again.embedded == 0 and again.t2i == result.t2i and again.i2t == result.i2t


def test_undecodable_image_is_a_dataset_error(tmp_path: Path, random_model) -> None:
    _needs_photos()
    entry = json.loads(FLICKR_JSON.read_text())["images"][0]
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(FLICKR / "images" / entry["filename"], root / entry["filename"])
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": [entry, dict(entry, filename="broken.jpg")]}))
    with pytest.raises(DatasetError, match=r"1 of 2 images could not be indexed; first: .*broken"):
        evaluate(load_karpathy(path, root), settings=_settings(tmp_path / "home", random_model))


def test_positions_maps_catalog_ids_to_dataset_order() -> None:
    ids = np.array([30, 10, 20])  # dataset image i has catalog id ids[i]
    found = np.array([[20, 30, -1], [99, 10, 20]])
    assert _positions(found, ids).tolist() == [[2, 0, -1], [-1, 1, 2]]


# --------------------------------------------------------------------------- #
# (c) The command line
# --------------------------------------------------------------------------- #


def _invoke(*args: str):
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # two commands: "eval" stays a subcommand
    return CliRunner().invoke(app, ["eval", *args])


def _write(tmp_path: Path, text: str) -> tuple[str, str]:
    path = tmp_path / "dataset.json"
    path.write_text(text)
    (tmp_path / "images").mkdir(exist_ok=True)
    return str(path), str(tmp_path / "images")


def _entry(filename: str, split: str = "test") -> dict:
    return {"filename": filename, "split": split,
            "sentences": [{"raw": f"caption {j} of {filename}"} for j in range(5)]}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [_entry("gone.jpg")]}), "image files missing"),
    (json.dumps({"images": [_entry("a.jpg", "train")]}), "no images in split 'test'"),
    (json.dumps([1, 2]), "top level must be a JSON object"),
])
def test_dataset_errors_are_one_line(tmp_path: Path, content: str, message: str) -> None:
    json_path, images = _write(tmp_path, content)
    (tmp_path / "images" / "a.jpg").touch()
    result = _invoke("--karpathy-json", json_path, "--images", images,
                     "--home", str(tmp_path / "home"))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsearch: ") and message in lines[0]
    assert not (tmp_path / "home").exists()  # nothing opened before the data was checked


def test_missing_json_file(tmp_path: Path) -> None:
    result = _invoke("--karpathy-json", str(tmp_path / "nope.json"), "--images", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"mmsearch: dataset file not found: {tmp_path / 'nope.json'}"]


def test_cli_prints_table_warnings_and_json(first_run, sample, random_model, tmp_path) -> None:
    _, settings, first = first_run
    config, checkpoint = random_model
    out = tmp_path / "out.json"
    common = ["--karpathy-json", str(sample), "--images", str(FLICKR / "images"),
              "--model", str(config), "--pretrained", str(checkpoint), "--no-draft",
              "--home", str(settings.home), "--device", "cpu", "--workers", "1"]
    result = _invoke("--dataset", "flickr8k", "--index-type", "ivf", "--json", str(out), *common)
    assert result.exit_code == 0, result.output
    assert "text->image" in result.stdout and "image->text" in result.stdout
    assert "approximate vs exact" in result.stdout and "all 30 images cached" in result.stdout
    assert "warning: flickr8k" in result.stderr  # 30 images, not the 1,000 of the benchmark
    data = json.loads(out.read_text())
    assert data["index_name"] == first.index_name and data["index_type"].startswith("IVF")
    assert 0.0 <= data["approx_overlap"] <= 1.0 and data["n_images"] == N_TEST
