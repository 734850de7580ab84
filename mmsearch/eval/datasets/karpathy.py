"""Karpathy's split JSON files: MS-COCO, Flickr30K and Flickr8k retrieval.

These benchmarks are evaluated on the splits Andrej Karpathy published
(``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``).
Each file looks like::

    {"dataset": "coco",
     "images": [{"filepath": "val2014",            # optional (COCO only)
                 "filename": "COCO_val2014_000000391895.jpg",
                 "split": "test",                  # test | val | train | restval
                 "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...],
                 "imgid": 0, ...},
                ...]}

:func:`load_karpathy` turns one split of such a file into a
:class:`RetrievalDataset`, order preserved exactly (images in file order,
captions in sentence order), so two runs over the same file number everything
the same way.  Every structural fault is a one-line :class:`DatasetError`
naming the offending ``images[i]`` field.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import DatasetError, UsageError
from mmsearch.eval.datasets.base import RetrievalDataset, check_image_files, json_type_name

#: The standard 5k/1k retrieval protocols use five captions per image.
DEFAULT_MAX_CAPTIONS_PER_IMAGE = 5


def _read_json(json_path: Path) -> Any:
    """Parse ``json_path``; every failure becomes a one-line :class:`DatasetError`."""
    if not json_path.exists():
        raise DatasetError(f"dataset file not found: {json_path}")
    if not json_path.is_file():
        raise DatasetError(f"dataset path is not a file: {json_path}")
    try:
        text = json_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{json_path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DatasetError(f"{json_path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{json_path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc


def _images_list(data: Any, json_path: Path) -> list[Any]:
    """The top-level ``images`` array, checked."""
    if not isinstance(data, dict):
        raise DatasetError(
            f"{json_path}: top level must be a JSON object with an 'images' array, "
            f"got {json_type_name(data)}"
        )
    if "images" not in data:
        raise DatasetError(f"{json_path}: missing top-level key 'images'")
    images = data["images"]
    if not isinstance(images, list):
        raise DatasetError(f"{json_path}: 'images' must be an array, got {json_type_name(images)}")
    return images


def _entry_split(entry: Any, index: int, json_path: Path) -> str:
    """The ``split`` of ``images[index]``; the entry must be an object with a string split."""
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{json_path}: images[{index}] must be an object, got {json_type_name(entry)}"
        )
    split = entry.get("split")
    if not isinstance(split, str):
        what = "missing" if split is None else f"must be a string, got {json_type_name(split)}"
        raise DatasetError(f"{json_path}: images[{index}].split {what}")
    return split


def _entry_relpath(entry: dict[str, Any], index: int, json_path: Path) -> Path:
    """``filepath/filename`` of ``images[index]`` (``filepath`` is optional)."""
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        what = "missing" if filename is None else f"must be a non-empty string, got {filename!r}"
        raise DatasetError(f"{json_path}: images[{index}].filename {what}")
    filepath = entry.get("filepath")
    if filepath is None or filepath == "":
        return Path(filename)
    if not isinstance(filepath, str):
        raise DatasetError(
            f"{json_path}: images[{index}].filepath must be a string, "
            f"got {json_type_name(filepath)}"
        )
    return Path(filepath) / filename


def _sentence_text(sentence: Any, where: str, json_path: Path) -> str:
    """Caption text of one sentence object: ``raw``, else the joined ``tokens``."""
    if not isinstance(sentence, dict):
        raise DatasetError(
            f"{json_path}: {where} must be an object, got {json_type_name(sentence)}"
        )
    raw = sentence.get("raw")
    if raw is None:
        tokens = sentence.get("tokens")
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            raw = " ".join(tokens)
        else:
            raise DatasetError(f"{json_path}: {where} has no 'raw' text (and no usable 'tokens')")
    if not isinstance(raw, str):
        raise DatasetError(f"{json_path}: {where}.raw must be a string, got {json_type_name(raw)}")
    text = raw.strip()
    if not text:
        raise DatasetError(f"{json_path}: {where}.raw is empty")
    return text


def _entry_captions(
    entry: dict[str, Any], index: int, json_path: Path, max_captions: int | None
) -> list[str]:
    """The captions of ``images[index]``, in order, capped at ``max_captions``."""
    sentences = entry.get("sentences")
    if sentences is None:
        raise DatasetError(f"{json_path}: images[{index}].sentences missing")
    if not isinstance(sentences, list):
        raise DatasetError(
            f"{json_path}: images[{index}].sentences must be an array, "
            f"got {json_type_name(sentences)}"
        )
    if not sentences:
        raise DatasetError(
            f"{json_path}: images[{index}] ({entry.get('filename')}) has no sentences"
        )
    kept = sentences if max_captions is None else sentences[:max_captions]
    return [
        _sentence_text(s, f"images[{index}].sentences[{j}]", json_path)
        for j, s in enumerate(kept)
    ]


def _describe_splits(counts: Counter[str]) -> str:
    """``"test (1000), train (6000)"``, sorted by split name."""
    if not counts:
        return "none (the file lists no images)"
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))



class _SplitEntries:
    """The images and captions of one split, gathered entry by entry in file order."""

    def __init__(
        self, json_path: Path, images_root: Path, split: str, max_captions: int | None
    ) -> None:
        self.json_path, self.images_root = json_path, images_root
        self.split, self.max_captions = split, max_captions
        self.split_counts: Counter[str] = Counter()
        self.image_paths: list[Path] = []
        self.captions: list[str] = []
        self.owners: list[int] = []
        self.first_seen: dict[Path, int] = {}

    def add(self, entry: Any, index: int) -> None:
        """Count ``images[index]``'s split; keep the image and its captions if it is ours."""
        entry_split = _entry_split(entry, index, self.json_path)
        self.split_counts[entry_split] += 1
        if entry_split != self.split:
            return
        relpath = _entry_relpath(entry, index, self.json_path)
        if relpath in self.first_seen:
            raise DatasetError(
                f"{self.json_path}: images[{index}] ({relpath}) duplicates "
                f"images[{self.first_seen[relpath]}]"
            )
        self.first_seen[relpath] = index
        entry_captions = _entry_captions(entry, index, self.json_path, self.max_captions)
        self.owners.extend([len(self.image_paths)] * len(entry_captions))
        self.captions.extend(entry_captions)
        self.image_paths.append(self.images_root / relpath)


def load_karpathy(
    json_path: Path,
    images_root: Path,
    *,
    split: str = "test",
    name: str | None = None,
    check_files: bool = True,
    max_captions_per_image: int | None = DEFAULT_MAX_CAPTIONS_PER_IMAGE,
) -> RetrievalDataset:
    """Load one split of a Karpathy-format caption file as a :class:`RetrievalDataset`.

    Args:
        json_path: the ``dataset_*.json`` file.
        images_root: directory the image paths are relative to.  An image's
            path is ``images_root / filepath / filename``, ``filepath`` being
            optional (COCO uses ``"val2014"`` / ``"train2014"``; the Flickr
            files have none).
        split: which split to keep (``"test"``, ``"val"``, ``"train"`` or
            ``"restval"``); images of other splits are skipped.
        name: dataset name; defaults to the file's top-level ``"dataset"``
            value, else the JSON file's stem.
        check_files: verify that every image file exists (cheap ``stat``
            calls, no decoding).
        max_captions_per_image: keep at most this many captions per image,
            the first ones in file order; ``None`` keeps all of them.

    The caption cap.  The "5k COCO test" protocol is usually stated as 5,000
    images and 25,000 captions, five per image (VSE++/SCAN-style evaluation
    code takes the first five captions of each image).  Karpathy's
    ``dataset_coco.json`` test split actually holds 25,010 sentences because a
    few images have six or seven, and some evaluation code (e.g. the ALBEF/BLIP
    annotation files) keeps them all.  CLIP_benchmark itself does not cut
    anything in code: it reads whatever captions its annotation file
    (``coco_test_karpathy.json`` from mehdidc/retrieval_annotations, read by
    torchvision's ``CocoCaptions``) lists for each image; whether that file holds
    25,000 or 25,010 captions could not be checked here (no network).  The
    default of 5 reproduces the 25,000-caption protocol; pass ``None`` for
    all captions.  Flickr30K and Flickr8k test images have exactly five
    captions each, so the cap changes nothing there.

    Only the entries of the requested split are fully validated; for the
    others only ``split`` must be a string (to count splits).

    Raises:
        DatasetError: the file is missing or not valid JSON, the structure is
            wrong (the message names the offending ``images[i]`` field), the
            split has no images (the message lists the splits present), an
            image has no sentences, an image appears twice in the split, or
            (with ``check_files``) image files are missing.
        UsageError: ``max_captions_per_image`` is smaller than 1.
    """
    if max_captions_per_image is not None and max_captions_per_image < 1:
        raise UsageError(
            f"max_captions_per_image must be at least 1 (or None), got {max_captions_per_image}"
        )
    json_path = Path(json_path)
    images_root = Path(images_root)
    data = _read_json(json_path)
    found = _SplitEntries(json_path, images_root, split, max_captions_per_image)
    for index, entry in enumerate(_images_list(data, json_path)):
        found.add(entry, index)
    if not found.image_paths:
        raise DatasetError(
            f"{json_path}: no images in split {split!r}; splits present: "
            f"{_describe_splits(found.split_counts)}"
        )
    if check_files:
        check_image_files(found.image_paths, images_root)

    if name is None:
        declared = data.get("dataset")
        name = declared if isinstance(declared, str) and declared else json_path.stem
    return RetrievalDataset(
        name=name,
        split=split,
        image_paths=found.image_paths,
        captions=found.captions,
        caption_image=np.asarray(found.owners, dtype=np.int64),
    )
