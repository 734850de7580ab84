"""Tests for mmsearch.eval.datasets: Karpathy split loading, errors, expected sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmsearch.eval.datasets import (
    KNOWN_DATASETS,
    RetrievalDataset,
    check_expected,
    load_karpathy,
)
from mmsearch.errors import DatasetError, UsageError

FLICKR8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k-1k"
FLICKR8K_JSON = FLICKR8K_DIR / "dataset_flickr8k_1k.json"
FLICKR8K_IMAGES = FLICKR8K_DIR / "images"


def _image(filename: str, split: str, n_captions: int, filepath: str | None = None) -> dict:
    """One Karpathy ``images`` entry with captions ``"<filename> caption <j>"``."""
    entry: dict[str, Any] = {
        "filename": filename,
        "split": split,
        "imgid": 0,
        "sentences": [
            {"raw": f"{filename} caption {j} .", "tokens": [filename, "caption", str(j)]}
            for j in range(n_captions)
        ],
    }
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _write(tmp_path: Path, data: Any, *, touch: bool = True) -> tuple[Path, Path]:
    """Write ``data`` as dataset.json under tmp_path; create its image files (empty)."""
    json_path = tmp_path / "dataset.json"
    json_path.write_text(json.dumps(data), encoding="utf-8")
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    if touch and isinstance(data, dict):
        for entry in data.get("images", []):
            path = root / entry.get("filepath", "") / entry["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return json_path, root


def _coco_like() -> dict:
    return {
        "dataset": "coco",
        "images": [
            _image("a.jpg", "test", 5, "val2014"),
            _image("b.jpg", "train", 5, "train2014"),
            _image("c.jpg", "test", 7, "val2014"),  # COCO test images sometimes have 6-7
            _image("d.jpg", "val", 5, "val2014"),
            _image("e.jpg", "test", 3, "val2014"),
            _image("f.jpg", "restval", 5, "val2014"),
        ],
    }


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def test_load_keeps_order_and_paths(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, _coco_like())
    ds = load_karpathy(json_path, root)
    assert ds.name == "coco" and ds.split == "test"
    assert ds.image_paths == [root / "val2014" / n for n in ("a.jpg", "c.jpg", "e.jpg")]
    # first 5 of c.jpg's 7 captions; e.jpg keeps its 3
    assert ds.n_captions == 5 + 5 + 3
    assert ds.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 3
    assert ds.captions[:2] == ["a.jpg caption 0 .", "a.jpg caption 1 ."]
    assert ds.captions[5:10] == [f"c.jpg caption {j} ." for j in range(5)]
    assert ds.image_captions(1) == [5, 6, 7, 8, 9]
    assert ds.image_captions(2) == [10, 11, 12]


def test_caption_cap(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, _coco_like())
    all_captions = load_karpathy(json_path, root, max_captions_per_image=None)
    assert all_captions.n_captions == 5 + 7 + 3
    assert all_captions.image_captions(1) == list(range(5, 12))
    one = load_karpathy(json_path, root, max_captions_per_image=1)
    assert one.captions == ["a.jpg caption 0 .", "c.jpg caption 0 .", "e.jpg caption 0 ."]
    with pytest.raises(UsageError, match="max_captions_per_image"):
        load_karpathy(json_path, root, max_captions_per_image=0)


def test_other_splits_and_names(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, _coco_like())
    val = load_karpathy(json_path, root, split="val", name="mine")
    assert val.name == "mine" and val.split == "val"
    assert val.image_paths == [root / "val2014" / "d.jpg"]
    restval = load_karpathy(json_path, root, split="restval")
    assert restval.n_images == 1


def test_name_defaults_to_file_stem_and_filepath_is_optional(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, {"images": [_image("x.jpg", "test", 2)]})
    ds = load_karpathy(json_path, root)
    assert ds.name == "dataset"
    assert ds.image_paths == [root / "x.jpg"]


def test_tokens_used_when_raw_missing(tmp_path: Path) -> None:
    data = {"images": [_image("x.jpg", "test", 1)]}
    del data["images"][0]["sentences"][0]["raw"]
    json_path, root = _write(tmp_path, data)
    assert load_karpathy(json_path, root).captions == ["x.jpg caption 0"]


def test_caption_image_is_read_only(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, _coco_like())
    ds = load_karpathy(json_path, root)
    with pytest.raises(ValueError):
        ds.caption_image[0] = 3
    with pytest.raises(IndexError):
        ds.image_captions(3)


def test_dataset_rejects_inconsistent_fields() -> None:
    with pytest.raises(DatasetError, match="one entry per caption"):
        RetrievalDataset("x", "test", [Path("a")], ["c1", "c2"], np.array([0]))
    with pytest.raises(DatasetError, match="outside"):
        RetrievalDataset("x", "test", [Path("a")], ["c1"], np.array([1]))


# --------------------------------------------------------------------------- #
# Errors: one line naming what is wrong
# --------------------------------------------------------------------------- #


def _error(json_path: Path, root: Path, **kwargs: Any) -> str:
    with pytest.raises(DatasetError) as info:
        load_karpathy(json_path, root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_json(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.json", tmp_path)
    assert "not found" in message and "nope.json" in message


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    json_path = tmp_path / "bad.json"
    json_path.write_text('{\n  "images": [\n    {"filename": "a.jpg",,}\n  ]\n}\n')
    message = _error(json_path, tmp_path)
    assert "not valid JSON" in message and "line 3, column" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "top level must be a JSON object"),
        ({"dataset": "coco"}, "missing top-level key 'images'"),
        ({"images": {"a": 1}}, "'images' must be an array, got object"),
        ({"images": [_image("a.jpg", "test", 1), "b.jpg"]}, r"images\[1\] must be an object"),
        ({"images": [{"filename": "a.jpg", "sentences": []}]}, r"images\[0\]\.split missing"),
        ({"images": [{"split": 3}]}, r"images\[0\]\.split must be a string"),
        ({"images": [{"split": "test", "sentences": []}]}, r"images\[0\]\.filename missing"),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "filepath": 7, "sentences": []}]},
            r"images\[0\]\.filepath must be a string",
        ),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": "x"}]},
            r"images\[0\]\.sentences must be an array",
        ),
        (
            {"images": [{"split": "test", "filename": "a.jpg"}]},
            r"images\[0\]\.sentences missing",
        ),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"raw": 5}]}]},
            r"images\[0\]\.sentences\[0\]\.raw must be a string",
        ),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"raw": "  "}]}]},
            r"images\[0\]\.sentences\[0\]\.raw is empty",
        ),
        (
            {"images": [{"split": "test", "filename": "a.jpg", "sentences": [7]}]},
            r"images\[0\]\.sentences\[0\] must be an object",
        ),
    ],
)
def test_structure_errors_name_the_field(tmp_path: Path, data: Any, expected: str) -> None:
    json_path, root = _write(tmp_path, data, touch=False)
    assert re.search(expected, _error(json_path, root, check_files=False))


def test_image_without_sentences(tmp_path: Path) -> None:
    data = {"images": [_image("a.jpg", "test", 2), _image("b.jpg", "test", 0)]}
    json_path, root = _write(tmp_path, data)
    message = _error(json_path, root)
    assert "images[1] (b.jpg) has no sentences" in message


def test_malformed_entries_of_other_splits_are_tolerated(tmp_path: Path) -> None:
    data = {"images": [_image("a.jpg", "test", 2), {"split": "train", "sentences": "junk"}]}
    json_path, root = _write(tmp_path, data, touch=False)
    (root / "a.jpg").touch()
    assert load_karpathy(json_path, root).n_images == 1


def test_empty_split_lists_splits_present(tmp_path: Path) -> None:
    json_path, root = _write(tmp_path, _coco_like())
    message = _error(json_path, root, split="tset")
    assert "no images in split 'tset'" in message
    assert "restval (1), test (3), train (1), val (1)" in message


def test_missing_image_files(tmp_path: Path) -> None:
    data = {"images": [_image(f"{i}.jpg", "test", 1) for i in range(6)]}
    json_path, root = _write(tmp_path, data)
    for i in (1, 2, 4, 5):
        (root / f"{i}.jpg").unlink()
    message = _error(json_path, root)
    assert message.startswith("4 of 6 image files missing under")
    assert "1.jpg, 2.jpg, 4.jpg, ..." in message
    # without the check the split loads
    assert load_karpathy(json_path, root, check_files=False).n_images == 6


def test_missing_images_root(tmp_path: Path) -> None:
    json_path, _ = _write(tmp_path, {"images": [_image("a.jpg", "test", 1)]})
    assert "images directory not found" in _error(json_path, tmp_path / "elsewhere")


def test_duplicate_image(tmp_path: Path) -> None:
    data = {"images": [_image("a.jpg", "test", 1), _image("a.jpg", "test", 1)]}
    json_path, root = _write(tmp_path, data)
    assert "images[1] (a.jpg) duplicates images[0]" in _error(json_path, root)


# --------------------------------------------------------------------------- #
# Expected benchmark sizes
# --------------------------------------------------------------------------- #


def _synthetic(n_images: int, per_image: list[int] | int, split: str = "test") -> RetrievalDataset:
    counts = [per_image] * n_images if isinstance(per_image, int) else per_image
    owners = np.repeat(np.arange(n_images), counts)
    return RetrievalDataset(
        name="synthetic",
        split=split,
        image_paths=[Path(f"{i}.jpg") for i in range(n_images)],
        captions=[f"caption {c}" for c in range(len(owners))],
        caption_image=owners,
    )


def test_known_datasets_sizes() -> None:
    assert (KNOWN_DATASETS["coco"].n_images, KNOWN_DATASETS["coco"].n_captions) == (5000, 25000)
    flickr = KNOWN_DATASETS["flickr30k"]
    assert (flickr.n_images, flickr.n_captions) == (1000, 5000)


def test_check_expected_match_and_aliases() -> None:
    assert check_expected(_synthetic(5000, 5), "coco") == []
    assert check_expected(_synthetic(5000, 5), "MSCOCO") == []
    assert check_expected(_synthetic(1000, 5), "flickr30k") == []


def test_check_expected_reports_differences() -> None:
    # COCO test with every caption kept: 25,010 captions (some images have 6-7)
    counts = [5] * 5000
    counts[:8] = [6] * 7 + [8]
    warnings = check_expected(_synthetic(5000, counts), "coco")
    assert len(warnings) == 2
    assert "25000 captions, loaded 25010" in warnings[0]
    assert "8 loaded images have another count (min 5, max 8)" in warnings[1]

    warnings = check_expected(_synthetic(900, 5, split="val"), "flickr30k")
    assert len(warnings) == 3
    assert "'test' split, but 'val' was loaded" in warnings[0]
    assert "1000 images, loaded 900" in warnings[1]
    assert "5000 captions, loaded 4500" in warnings[2]


def test_check_expected_unknown_name() -> None:
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'; known: coco, flickr30k"):
        check_expected(_synthetic(2, 5), "imagenet")


# --------------------------------------------------------------------------- #
# The real Flickr8k 1k test file in shared/
# --------------------------------------------------------------------------- #

needs_flickr8k = pytest.mark.skipif(
    not (FLICKR8K_JSON.is_file() and FLICKR8K_IMAGES.is_dir()),
    reason=f"Flickr8k 1k test data not found at {FLICKR8K_DIR}",
)


@needs_flickr8k
def test_real_flickr8k_test_split() -> None:
    ds = load_karpathy(FLICKR8K_JSON, FLICKR8K_IMAGES)
    assert ds.name == "flickr8k" and ds.split == "test"
    assert ds.n_images == 1000 and ds.n_captions == 5000
    assert ds.caption_image.tolist() == np.repeat(np.arange(1000), 5).tolist()
    assert all(p.is_file() for p in ds.image_paths)
    raw = json.loads(FLICKR8K_JSON.read_text(encoding="utf-8"))
    first = raw["images"][0]
    assert ds.image_paths[0] == FLICKR8K_IMAGES / first["filename"]
    assert ds.captions[:5] == [s["raw"].strip() for s in first["sentences"]]
    assert check_expected(ds, "flickr8k") == []
    assert check_expected(ds, "flickr30k") == []  # same published sizes (1k / 5k)
    assert len(check_expected(ds, "coco")) == 2  # images and captions differ


@needs_flickr8k
def test_real_flickr8k_has_no_val_split() -> None:
    expected = r"no images in split 'val'; splits present: test \(1000\)"
    with pytest.raises(DatasetError, match=expected):
        load_karpathy(FLICKR8K_JSON, FLICKR8K_IMAGES, split="val")
