"""Tests for the Chinese / multilingual dataset loaders in mmsearch.eval.datasets.

Chinese-CLIP's jsonl (+ folder or base64 tsv) layout, XTD10's line-aligned
files, the format dispatch, the part-of-speech tag warning, and Chinese
``raw`` captions in Karpathy JSON.  Everything is built in tmp dirs; offline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmsearch.errors import DatasetError, UsageError
from mmsearch.eval.datasets import (
    RetrievalDataset,
    load_chinese_clip,
    load_dataset,
    load_karpathy,
    load_xtd10,
    pos_tag_warning,
)

FLICKR8K_JSON = (
    Path(__file__).resolve().parents[1].parent
    / "shared" / "data" / "flickr8k-1k" / "dataset_flickr8k_1k.json"
)

COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 7: (200, 200, 0), 99: (9, 9, 9)}


def _image_bytes(image_id: int, fmt: str = "JPEG") -> bytes:
    """A small real image, its colour chosen by ``image_id``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), COLORS.get(image_id, (1, 2, 3))).save(buf, fmt)
    return buf.getvalue()


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _texts(root: Path, rows: list[dict[str, Any]], split: str = "test") -> Path:
    """Write ``{split}_texts.jsonl`` (non-ASCII kept as is, as Chinese-CLIP's files are)."""
    return _write_lines(
        root / f"{split}_texts.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows]
    )


def _tsv(root: Path, ids: list[int], split: str = "test") -> Path:
    """Write ``{split}_imgs.tsv``: ``image_id<TAB>base64(jpeg)`` rows."""
    rows = [f"{i}\t{base64.b64encode(_image_bytes(i)).decode('ascii')}" for i in ids]
    return _write_lines(root / f"{split}_imgs.tsv", rows)


def _folder(path: Path, names: dict[str, int]) -> Path:
    """Write images ``name -> colour id`` into ``path`` (format from the extension)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, image_id in names.items():
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (path / name).write_bytes(_image_bytes(image_id, fmt))
    return path


CN_ROWS = [
    {"text_id": 10, "text": "一只红色的狗在草地上奔跑", "image_ids": [3]},
    {"text_id": 11, "text": " 两个孩子在海边玩耍 ", "image_ids": [1]},
    {"text_id": 12, "text": "一个男人在骑自行车", "image_ids": [2, 7]},
    {"text_id": 13, "text": "红色的狗", "image_ids": [3]},
]


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    return message


# --------------------------------------------------------------------------- #
# Chinese-CLIP: image folder
# --------------------------------------------------------------------------- #


def _cn_folder_dataset(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "Flickr30k-CN"
    _texts(root, CN_ROWS)
    images = _folder(
        tmp_path / "imgs",
        {"3.jpg": 3, "1.jpg": 1, "2.png": 2, "7.JPEG": 7, "99.jpg": 99, "1.txt": 1, "x10.jpg": 1},
    )
    return root, images


def test_chinese_clip_folder_order_and_mapping(tmp_path: Path) -> None:
    root, images = _cn_folder_dataset(tmp_path)
    ds = load_chinese_clip(root, images)
    assert isinstance(ds, RetrievalDataset)
    assert ds.name == "Flickr30k-CN" and ds.split == "test"
    # sorted by image id; only referenced ids (99 is not); any image extension
    assert ds.image_paths == [images / "1.jpg", images / "2.png", images / "3.jpg", images / "7.JPEG"]
    # captions in file order, stripped
    assert ds.captions == ["一只红色的狗在草地上奔跑", "两个孩子在海边玩耍", "一个男人在骑自行车", "红色的狗"]
    # each text -> the FIRST of its image_ids (12 lists [2, 7] -> image 2)
    assert ds.caption_image.tolist() == [2, 0, 1, 2]
    assert ds.image_captions(2) == [0, 3] and ds.image_captions(3) == []
    for path in ds.image_paths:
        with Image.open(path) as im:
            assert im.size == (16, 12)


def test_chinese_clip_name_and_split(tmp_path: Path) -> None:
    root, images = _cn_folder_dataset(tmp_path)
    _texts(root, [{"text_id": 1, "text": "蓝色", "image_ids": [3]}], split="valid")
    ds = load_chinese_clip(root, images, split="valid", name="f30k-cn")
    assert ds.name == "f30k-cn" and ds.split == "valid"
    assert ds.image_paths == [images / "3.jpg"] and ds.captions == ["蓝色"]
    with pytest.raises(DatasetError, match=r"dataset file not found: .*train_texts\.jsonl"):
        load_chinese_clip(root, images, split="train")


def test_chinese_clip_name_of_dot_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, images = _cn_folder_dataset(tmp_path)
    monkeypatch.chdir(root)
    assert load_chinese_clip(Path("."), images).name == "Flickr30k-CN"


# --------------------------------------------------------------------------- #
# Chinese-CLIP: base64 tsv
# --------------------------------------------------------------------------- #


def test_chinese_clip_tsv_decodes_into_cache(tmp_path: Path) -> None:
    root = tmp_path / "COCO-CN"
    _texts(root, CN_ROWS)
    _tsv(root, [99, 3, 7, 1, 2])
    ds = load_chinese_clip(root, None)
    cache = root / ".mmsearch_test_imgs"
    # gallery: every tsv image (99 is a distractor), sorted by id
    assert ds.image_paths == [cache / f"{i}.jpg" for i in (1, 2, 3, 7, 99)]
    assert ds.caption_image.tolist() == [2, 0, 1, 2]
    for image_id, path in zip((1, 2, 3, 7, 99), ds.image_paths):
        assert path.read_bytes() == _image_bytes(image_id)
        with Image.open(path) as im:
            assert im.getpixel((8, 6))[:3] == pytest.approx(COLORS[image_id], abs=8)
    assert sorted(p.name for p in cache.iterdir()) == [f"{i}.jpg" for i in (1, 2, 3, 7, 99)]


def test_chinese_clip_tsv_cache_is_reused(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS)
    _tsv(root, [1, 2, 3, 7])
    first = load_chinese_clip(root, None)
    old = 1_000_000_000_000_000_000  # 2001, in ns
    for path in first.image_paths:
        os.utime(path, ns=(old, old))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.image_paths}
    # a damaged (wrong-size) cache file is rewritten; the others are left alone
    damaged = first.image_paths[1]
    damaged.write_bytes(b"xx")
    second = load_chinese_clip(root, None)
    assert second.image_paths == first.image_paths
    for path in second.image_paths:
        if path != damaged:
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == before[path]
    assert damaged.read_bytes() == _image_bytes(2)
    assert not [p for p in damaged.parent.iterdir() if p.suffix == ".tmp"]


def test_chinese_clip_tsv_urlsafe_unpadded_base64(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    data = _image_bytes(1) + b"\xfb\xff"  # ends in bytes whose base64 uses - _ when URL-safe
    cell = base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    _write_lines(root / "test_imgs.tsv", [f"1\t{cell}"])
    _texts(root, [{"text_id": 1, "text": "红色", "image_ids": [1]}])
    ds = load_chinese_clip(root, None)
    assert ds.image_paths[0].read_bytes() == data


def test_chinese_clip_tsv_split_has_own_cache(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS[:2], split="valid")
    _tsv(root, [1, 3], split="valid")
    ds = load_chinese_clip(root, None, split="valid")
    assert ds.image_paths == [root / ".mmsearch_valid_imgs" / f"{i}.jpg" for i in (1, 3)]
    assert not (root / ".mmsearch_test_imgs").exists()


# --------------------------------------------------------------------------- #
# Chinese-CLIP: errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text_id": 1, "text": "狗", "image_ids": [1]', r"test_texts\.jsonl:2: not valid JSON"),
        ('["狗"]', r"test_texts\.jsonl:2: must be a JSON object, got array"),
        ('{"text": "狗", "image_ids": [1]}', r":2: 'text_id' missing"),
        ('{"text_id": "1", "text": "狗", "image_ids": [1]}', r":2: 'text_id' must be an integer, got '1'"),
        ('{"text_id": 2, "text": "  ", "image_ids": [1]}', r":2: 'text' must be a non-empty string"),
        ('{"text_id": 2, "image_ids": [1]}', r":2: 'text' missing"),
        ('{"text_id": 2, "text": "狗", "image_ids": []}', r":2: 'image_ids' must be a non-empty array"),
        ('{"text_id": 2, "text": "狗", "image_ids": [true]}', r":2: 'image_ids' must be a non-empty array"),
        ('{"text_id": 2, "text": "狗", "image_ids": 1}', r":2: 'image_ids' must be a non-empty array"),
        ('{"text_id": 2, "text": "狗"}', r":2: 'image_ids' missing"),
        ('{"text_id": 1, "text": "狗", "image_ids": [1]}', r":2: text_id 1 repeats line 1"),
    ],
)
def test_chinese_clip_malformed_text_lines(tmp_path: Path, line: str, expected: str) -> None:
    root = tmp_path / "cn"
    _write_lines(root / "test_texts.jsonl", ['{"text_id": 1, "text": "猫", "image_ids": [1]}', line])
    images = _folder(tmp_path / "imgs", {"1.jpg": 1})
    with pytest.raises(DatasetError, match=expected) as exc:
        load_chinese_clip(root, images)
    _one_line(exc)


def test_chinese_clip_empty_split(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _write_lines(root / "test_texts.jsonl", ["", "   "])
    with pytest.raises(DatasetError, match=r"test_texts\.jsonl: no texts \(the split is empty\)") as exc:
        load_chinese_clip(root, tmp_path)
    _one_line(exc)


def test_chinese_clip_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    root.mkdir()
    (root / "test_texts.jsonl").write_bytes('{"text_id": 1, "text": "狗"}\n'.encode("gbk"))
    with pytest.raises(DatasetError, match="not UTF-8 text") as exc:
        load_chinese_clip(root, tmp_path)
    _one_line(exc)


def test_chinese_clip_unknown_image_ids_folder(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS)
    images = _folder(tmp_path / "imgs", {"1.jpg": 1, "3.jpg": 3})
    with pytest.raises(
        DatasetError, match=r"test_texts\.jsonl: 2 of 4 image ids have no image in .*imgs: 2, 7$"
    ) as exc:
        load_chinese_clip(root, images)
    _one_line(exc)


def test_chinese_clip_unknown_image_ids_tsv(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS)
    _tsv(root, [1, 2, 3])
    with pytest.raises(DatasetError, match=r"1 of 4 image ids have no image in .*test_imgs\.tsv: 7$") as exc:
        load_chinese_clip(root, None)
    _one_line(exc)


def test_chinese_clip_missing_sources(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS)
    with pytest.raises(DatasetError, match=r"image file not found: .*test_imgs\.tsv \(or pass an images folder\)") as exc:
        load_chinese_clip(root, None)
    _one_line(exc)
    with pytest.raises(DatasetError, match=r"images directory not found: .*nowhere") as exc:
        load_chinese_clip(root, tmp_path / "nowhere")
    _one_line(exc)
    with pytest.raises(DatasetError, match=r"dataset file not found: .*test_texts\.jsonl"):
        load_chinese_clip(tmp_path / "empty", None)


def test_chinese_clip_two_files_for_one_id(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS[:1])
    images = _folder(tmp_path / "imgs", {"3.jpg": 3, "3.png": 3})
    with pytest.raises(DatasetError, match=r"two image files for image id 3: 3\.jpg, 3\.png") as exc:
        load_chinese_clip(root, images)
    _one_line(exc)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("1", r"test_imgs\.tsv:2: expected 2 tab-separated columns \(image_id, base64\), got 1"),
        ("1\tAAAA\textra", r":2: expected 2 tab-separated columns .*got 3"),
        ("abc\tAAAA", r"test_imgs\.tsv:2: image_id must be an integer, got 'abc'"),
        ("5\tnot base64!", r"test_imgs\.tsv:2: image data is not valid base64"),
        ("5\t图片", r":2: image data is not valid base64"),
        ("5\t", r":2: image data is empty"),
        ("1\tAAAA", r"test_imgs\.tsv:2: image_id 1 appears twice"),
    ],
)
def test_chinese_clip_malformed_tsv_rows(tmp_path: Path, row: str, expected: str) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS[1:2])
    good = f"1\t{base64.b64encode(_image_bytes(1)).decode('ascii')}"
    _write_lines(root / "test_imgs.tsv", [good, row])
    with pytest.raises(DatasetError, match=expected) as exc:
        load_chinese_clip(root, None)
    _one_line(exc)


def test_chinese_clip_empty_tsv(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    _texts(root, CN_ROWS)
    _write_lines(root / "test_imgs.tsv", [""])
    with pytest.raises(DatasetError, match=r"test_imgs\.tsv: no images \(the split is empty\)") as exc:
        load_chinese_clip(root, None)
    _one_line(exc)


def test_chinese_clip_bad_split_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="split must be a plain name"):
        load_chinese_clip(tmp_path, None, split="../test")


# --------------------------------------------------------------------------- #
# XTD10
# --------------------------------------------------------------------------- #

XTD_NAMES = ["COCO_train2014_000000000030.jpg", "COCO_train2014_000000000010.jpg", "c.png"]
XTD_ZH = ["一个花瓶里插着白色的花", "一只长颈鹿站在树旁", "桌子上放着一个红色的苹果"]
XTD_EN = ["white flowers in a vase", "a giraffe next to a tree", "a red apple on a table"]


def _xtd(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "XTD10"
    _write_lines(root / "test_image_names.txt", XTD_NAMES)
    _write_lines(root / "test_1kcaptions_zh.txt", XTD_ZH)
    _write_lines(root / "test_1kcaptions_en.txt", XTD_EN)
    images = _folder(tmp_path / "train2014", {n: i for n, i in zip(XTD_NAMES, (3, 1, 2))})
    return root, images


def test_xtd10_line_aligned(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    ds = load_xtd10(root, images)
    assert ds.name == "xtd10-zh" and ds.split == "test"
    assert ds.image_paths == [images / n for n in XTD_NAMES]  # file order
    assert ds.captions == XTD_ZH
    assert ds.caption_image.tolist() == [0, 1, 2]
    en = load_xtd10(root, images, language="en", name="xtd-en")
    assert en.name == "xtd-en" and en.captions == XTD_EN and en.image_paths == ds.image_paths


def test_xtd10_repeated_name_is_one_image(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    _write_lines(root / "test_image_names.txt", [*XTD_NAMES, XTD_NAMES[1]])
    _write_lines(root / "test_1kcaptions_zh.txt", [*XTD_ZH, "树旁的长颈鹿"])
    ds = load_xtd10(root, images)
    assert ds.n_images == 3 and ds.caption_image.tolist() == [0, 1, 2, 1]
    assert ds.image_captions(1) == [1, 3]


def test_xtd10_trailing_blank_lines_and_bom(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    (root / "test_1kcaptions_zh.txt").write_text("\ufeff" + "\r\n".join(XTD_ZH) + "\r\n\r\n", encoding="utf-8")
    assert load_xtd10(root, images).captions == XTD_ZH


def test_xtd10_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    _write_lines(root / "test_1kcaptions_zh.txt", XTD_ZH[:2])
    with pytest.raises(
        DatasetError,
        match=r"^test_image_names\.txt has 3 lines but test_1kcaptions_zh\.txt has 2; caption i must describe image i$",
    ) as exc:
        load_xtd10(root, images)
    _one_line(exc)


def test_xtd10_errors(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    with pytest.raises(DatasetError, match=r"test_1kcaptions_de\.txt \(languages present: en, zh\)") as exc:
        load_xtd10(root, images, language="de")
    _one_line(exc)
    with pytest.raises(UsageError, match="language must be a plain name"):
        load_xtd10(root, images, language="zh/../x")
    _write_lines(root / "test_1kcaptions_zh.txt", [XTD_ZH[0], " ", XTD_ZH[2]])
    with pytest.raises(DatasetError, match=r"test_1kcaptions_zh\.txt:2: empty caption line") as exc:
        load_xtd10(root, images)
    _one_line(exc)
    (images / XTD_NAMES[0]).unlink()
    with pytest.raises(DatasetError, match=r"1 of 3 image files missing under .*: COCO_train2014_000000000030\.jpg") as exc:
        load_xtd10(root, images, language="en")
    _one_line(exc)
    with pytest.raises(DatasetError, match=r"dataset file not found: .*test_image_names\.txt"):
        load_xtd10(tmp_path / "nothing", images)


def test_xtd10_empty(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    _write_lines(root / "test_image_names.txt", [])
    _write_lines(root / "test_1kcaptions_zh.txt", [""])
    with pytest.raises(DatasetError, match=r"test_image_names\.txt: no image names") as exc:
        load_xtd10(root, images)
    _one_line(exc)


# --------------------------------------------------------------------------- #
# Dispatch
# --------------------------------------------------------------------------- #


def _karpathy_zh(tmp_path: Path, *, ensure_ascii: bool) -> tuple[Path, Path]:
    data = {
        "dataset": "coco-cn",
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": " 一只猫坐在窗台上 "}, {"raw": "窗台上的猫"}]},
            {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "狗"}]},
            {"filename": "c.jpg", "split": "test", "sentences": [{"tokens": ["一个", "男人", "骑", "自行车"]}]},
        ],
    }
    json_path = tmp_path / "dataset_coco_cn.json"
    json_path.write_text(json.dumps(data, ensure_ascii=ensure_ascii), encoding="utf-8")
    images = _folder(tmp_path / "images", {"a.jpg": 1, "b.jpg": 2, "c.jpg": 3})
    return json_path, images


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_karpathy_chinese_raw(tmp_path: Path, ensure_ascii: bool) -> None:
    json_path, images = _karpathy_zh(tmp_path, ensure_ascii=ensure_ascii)
    ds = load_karpathy(json_path, images)
    assert ds.name == "coco-cn"
    assert ds.image_paths == [images / "a.jpg", images / "c.jpg"]
    assert ds.captions == ["一只猫坐在窗台上", "窗台上的猫", "一个 男人 骑 自行车"]
    assert ds.caption_image.tolist() == [0, 0, 1]
    assert pos_tag_warning(ds) is None


def test_dispatch_karpathy(tmp_path: Path) -> None:
    json_path, images = _karpathy_zh(tmp_path, ensure_ascii=False)
    ds = load_dataset(json_path, images)
    assert ds.captions[0] == "一只猫坐在窗台上"
    val = load_dataset(json_path, images, split="val", name="cn")
    assert val.name == "cn" and val.split == "val" and val.captions == ["狗"]
    with pytest.raises(UsageError, match="a Karpathy JSON file needs an images folder"):
        load_dataset(json_path, None)


def test_dispatch_chinese_clip(tmp_path: Path) -> None:
    root, images = _cn_folder_dataset(tmp_path)
    ds = load_dataset(root, images, name="x")
    assert ds.name == "x" and ds.caption_image.tolist() == [2, 0, 1, 2]
    _tsv(root, [1, 2, 3, 7])
    assert load_dataset(root, None).image_paths[0] == root / ".mmsearch_test_imgs" / "1.jpg"
    _texts(root, CN_ROWS[:1], split="valid")
    assert load_dataset(root, images, split="valid").captions == [CN_ROWS[0]["text"]]


def test_dispatch_xtd10(tmp_path: Path) -> None:
    root, images = _xtd(tmp_path)
    assert load_dataset(root, images).captions == XTD_ZH
    assert load_dataset(root, images, language="en").name == "xtd10-en"
    with pytest.raises(UsageError, match="XTD10 needs an images folder"):
        load_dataset(root, None)
    with pytest.raises(UsageError, match="XTD10 has only a 'test' split, got 'val'"):
        load_dataset(root, images, split="val")


def test_dispatch_unrecognised(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(UsageError, match="unrecognised dataset layout") as exc:
            load_dataset(path, None)
        message = _one_line(exc)
        assert "Karpathy split .json" in message
        assert "test_texts.jsonl" in message and "test_imgs.tsv" in message
        assert "test_image_names.txt and test_1kcaptions_<lang>.txt" in message
    # a Chinese-CLIP folder without the asked split says which splits it has
    _texts(tmp_path, CN_ROWS, split="valid")
    _texts(tmp_path, CN_ROWS, split="train")
    with pytest.raises(UsageError, match=r"Chinese-CLIP splits present: train, valid"):
        load_dataset(tmp_path, None)
    with pytest.raises(UsageError, match="pass the folder holding this file"):
        load_dataset(tmp_path / "valid_texts.jsonl", None)
    with pytest.raises(DatasetError, match="dataset file not found"):  # as load_karpathy says
        load_dataset(tmp_path / "missing.json", tmp_path)
    with pytest.raises(DatasetError, match="dataset path not found"):
        load_dataset(tmp_path / "missing-folder", tmp_path)


# --------------------------------------------------------------------------- #
# Part-of-speech tags
# --------------------------------------------------------------------------- #


def _ds(captions: list[str]) -> RetrievalDataset:
    return RetrievalDataset(
        name="t", split="test", image_paths=[Path("a.jpg")], captions=captions,
        caption_image=[0] * len(captions),
    )


CLEAN_ZH = ["一个男人在骑自行车", "两个孩子在海边玩耍", "一只 红色 的 狗", "时间是10:30", "车速60km/h的汽车"]
CLEAN_EN = ["a car at 60 km/h on the road", "see http://example.com/a for more", "a man w/ a dog"]


def test_pos_tag_warning_fires_on_slash_tags(tmp_path: Path) -> None:
    tagged = ["一个/m 男人/n 在/p 骑/v 自行车/n", "两个/m 孩子/n 在/p 海边/s 玩耍/v"]
    warning = pos_tag_warning(_ds(tagged + CLEAN_ZH))
    assert warning == (
        "2 of 7 captions look part-of-speech tagged ('一个/m'); "
        "strip the tags first (see CLIP_benchmark PR #101)"
    )


def test_pos_tag_warning_fires_on_colon_and_unspaced_tags() -> None:
    assert pos_tag_warning(_ds(["男人:n 骑:v 自行车:n", *CLEAN_ZH])) is not None
    assert pos_tag_warning(_ds(["一只/m狗/n在/p跑/v", *CLEAN_ZH])) is not None
    assert pos_tag_warning(_ds(["一只/mq 狗/n ，/wp 在/p 跑/vi"])) is not None


def test_pos_tag_warning_quiet_on_clean_captions() -> None:
    assert pos_tag_warning(_ds(CLEAN_ZH + CLEAN_EN)) is None
    assert pos_tag_warning(_ds(["男人/n 在骑一辆很旧的 自行车 沿着 河边 慢慢 前进"])) is None  # 1 tag
    assert pos_tag_warning(_ds(["男人/N 骑/V"])) is None  # upper-case is not a tag


def test_pos_tag_warning_threshold_is_more_than_five_percent() -> None:
    tagged = "一个/m 男人/n"
    assert pos_tag_warning(_ds([tagged] + ["狗"] * 19)) is None  # exactly 5%
    warning = pos_tag_warning(_ds([tagged] * 2 + ["狗"] * 18))
    assert warning is not None and warning.startswith("2 of 20 captions")


def test_pos_tag_warning_on_loaded_dataset(tmp_path: Path) -> None:
    root = tmp_path / "cn"
    rows = [
        {"text_id": 1, "text": "一个/m 男人/n 在/p 骑/v 自行车/n", "image_ids": [1]},
        {"text_id": 2, "text": "一个男人在骑自行车", "image_ids": [1]},
    ]
    _texts(root, rows)
    images = _folder(tmp_path / "imgs", {"1.jpg": 1})
    warning = pos_tag_warning(load_chinese_clip(root, images))
    assert warning is not None and re.match(r"1 of 2 captions look part-of-speech tagged \('一个/m'\)", warning)


@pytest.mark.skipif(not FLICKR8K_JSON.is_file(), reason="shared Flickr8k 1k JSON not present")
def test_pos_tag_warning_quiet_on_real_english_captions() -> None:
    images = FLICKR8K_JSON.parent / "images"
    ds = load_karpathy(FLICKR8K_JSON, images, check_files=False)
    assert ds.n_captions >= 1000 and pos_tag_warning(ds) is None
