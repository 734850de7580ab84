"""Retrieval evaluation datasets in Karpathy's split JSON format.

MS-COCO, Flickr30K and Flickr8k image-text retrieval are evaluated on the
splits Andrej Karpathy published (``dataset_coco.json``,
``dataset_flickr30k.json``, ``dataset_flickr8k.json``).  Each file looks like::

    {"dataset": "coco",
     "images": [{"filepath": "val2014",            # optional (COCO only)
                 "filename": "COCO_val2014_000000391895.jpg",
                 "split": "test",                  # test | val | train | restval
                 "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...],
                 "imgid": 0, ...},
                ...]}

:func:`load_karpathy` turns one split of such a file into a
:class:`RetrievalDataset`: a flat list of image paths, a flat list of
captions, and for every caption the index of the image it describes.  Order is
preserved exactly (images in file order, captions in sentence order), so two
runs over the same file number everything the same way.

This module is pure Python + numpy: it never imports torch, open_clip or faiss.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import DatasetError, UsageError

__all__ = [
    "DEFAULT_MAX_CAPTIONS_PER_IMAGE",
    "KNOWN_DATASETS",
    "KnownDataset",
    "RetrievalDataset",
    "check_expected",
    "load_karpathy",
    "resolve_known",
]

#: The standard 5k/1k retrieval protocols use five captions per image.
DEFAULT_MAX_CAPTIONS_PER_IMAGE = 5

#: How many missing image names a "files missing" error spells out.
_MISSING_NAMES_SHOWN = 3


@dataclass(frozen=True, eq=False)
class RetrievalDataset:
    """One split of an image-text retrieval dataset, flattened.

    Attributes:
        name: dataset name (e.g. ``"coco"``, ``"flickr30k"``).
        split: the Karpathy split it was taken from (``"test"``...).
        image_paths: one path per image, in dataset order.
        captions: every caption, in dataset order (all captions of image 0,
            then all captions of image 1, ...).
        caption_image: int64 array, ``len(captions)`` long; entry ``c`` is the
            index into ``image_paths`` of the image caption ``c`` describes.
            Stored read-only.

    ``eq=False``: the instance holds a numpy array, so field-wise ``==`` would
    be ambiguous; instances compare by identity.
    """

    name: str
    split: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        owners = np.array(self.caption_image, dtype=np.int64, copy=True)
        if owners.ndim != 1 or owners.shape[0] != len(self.captions):
            raise DatasetError(
                f"caption_image must be a 1-D array with one entry per caption "
                f"({len(self.captions)}), got shape {owners.shape}"
            )
        if owners.size and (owners.min() < 0 or owners.max() >= len(self.image_paths)):
            raise DatasetError(
                f"caption_image holds indices outside 0..{len(self.image_paths) - 1}"
            )
        owners.setflags(write=False)
        object.__setattr__(self, "caption_image", owners)

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        """Number of captions (text queries)."""
        return len(self.captions)

    @cached_property
    def _captions_by_image(self) -> tuple[np.ndarray, np.ndarray]:
        """Caption indices grouped by image (stable), and each group's start offset."""
        order = np.argsort(self.caption_image, kind="stable")
        counts = np.bincount(self.caption_image, minlength=self.n_images)
        starts = np.concatenate(([0], np.cumsum(counts)))
        return order, starts

    def image_captions(self, i: int) -> list[int]:
        """Indices (into :attr:`captions`) of the captions of image ``i``, ascending.

        Raises:
            IndexError: ``i`` is not a valid image index.
        """
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range 0..{self.n_images - 1}")
        order, starts = self._captions_by_image
        return [int(c) for c in order[starts[i] : starts[i + 1]]]


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def _type_name(value: Any) -> str:
    """Short JSON-ish name of a value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


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
            f"got {_type_name(data)}"
        )
    if "images" not in data:
        raise DatasetError(f"{json_path}: missing top-level key 'images'")
    images = data["images"]
    if not isinstance(images, list):
        raise DatasetError(f"{json_path}: 'images' must be an array, got {_type_name(images)}")
    return images


def _entry_split(entry: Any, index: int, json_path: Path) -> str:
    """The ``split`` of ``images[index]``; the entry must be an object with a string split."""
    if not isinstance(entry, dict):
        raise DatasetError(
            f"{json_path}: images[{index}] must be an object, got {_type_name(entry)}"
        )
    split = entry.get("split")
    if not isinstance(split, str):
        what = "missing" if split is None else f"must be a string, got {_type_name(split)}"
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
            f"{json_path}: images[{index}].filepath must be a string, got {_type_name(filepath)}"
        )
    return Path(filepath) / filename


def _sentence_text(sentence: Any, where: str, json_path: Path) -> str:
    """Caption text of one sentence object: ``raw``, else the joined ``tokens``."""
    if not isinstance(sentence, dict):
        raise DatasetError(f"{json_path}: {where} must be an object, got {_type_name(sentence)}")
    raw = sentence.get("raw")
    if raw is None:
        tokens = sentence.get("tokens")
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            raw = " ".join(tokens)
        else:
            raise DatasetError(f"{json_path}: {where} has no 'raw' text (and no usable 'tokens')")
    if not isinstance(raw, str):
        raise DatasetError(f"{json_path}: {where}.raw must be a string, got {_type_name(raw)}")
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
            f"got {_type_name(sentences)}"
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


def _check_image_files(paths: list[Path], images_root: Path) -> None:
    """Raise :class:`DatasetError` if ``images_root`` or any image file is missing."""
    if not images_root.is_dir():
        raise DatasetError(f"images directory not found: {images_root}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(images_root)) for p in missing[:_MISSING_NAMES_SHOWN])
        more = ", ..." if len(missing) > _MISSING_NAMES_SHOWN else ""
        raise DatasetError(
            f"{len(missing)} of {len(paths)} image files missing under {images_root}: "
            f"{shown}{more}"
        )


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
    entries = _images_list(data, json_path)

    split_counts: Counter[str] = Counter()
    image_paths: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    first_seen: dict[Path, int] = {}
    for index, entry in enumerate(entries):
        entry_split = _entry_split(entry, index, json_path)
        split_counts[entry_split] += 1
        if entry_split != split:
            continue
        relpath = _entry_relpath(entry, index, json_path)
        if relpath in first_seen:
            raise DatasetError(
                f"{json_path}: images[{index}] ({relpath}) duplicates images[{first_seen[relpath]}]"
            )
        first_seen[relpath] = index
        entry_captions = _entry_captions(entry, index, json_path, max_captions_per_image)
        owners.extend([len(image_paths)] * len(entry_captions))
        captions.extend(entry_captions)
        image_paths.append(images_root / relpath)

    if not image_paths:
        raise DatasetError(
            f"{json_path}: no images in split {split!r}; splits present: "
            f"{_describe_splits(split_counts)}"
        )
    if check_files:
        _check_image_files(image_paths, images_root)

    if name is None:
        declared = data.get("dataset")
        name = declared if isinstance(declared, str) and declared else json_path.stem
    return RetrievalDataset(
        name=name,
        split=split,
        image_paths=image_paths,
        captions=captions,
        caption_image=np.asarray(owners, dtype=np.int64),
    )


# --------------------------------------------------------------------------- #
# Known benchmark sizes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class KnownDataset:
    """Expected size of a standard retrieval benchmark split."""

    name: str
    description: str
    split: str
    n_images: int
    n_captions: int
    captions_per_image: int


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "coco": KnownDataset(
        name="coco",
        description="MS-COCO Karpathy 5k test split",
        split="test",
        n_images=5000,
        n_captions=25000,
        captions_per_image=5,
    ),
    "flickr30k": KnownDataset(
        name="flickr30k",
        description="Flickr30K Karpathy 1k test split",
        split="test",
        n_images=1000,
        n_captions=5000,
        captions_per_image=5,
    ),
    "flickr8k": KnownDataset(
        name="flickr8k",
        description="Flickr8k Karpathy 1k test split",
        split="test",
        n_images=1000,
        n_captions=5000,
        captions_per_image=5,
    ),
}

#: Other spellings accepted by :func:`check_expected`.
_ALIASES = {"mscoco": "coco", "mscoco_captions": "coco", "coco5k": "coco", "f30k": "flickr30k"}


def resolve_known(dataset_name: str) -> KnownDataset:
    """The :class:`KnownDataset` for a (case-insensitive) name or alias.

    Raises:
        UsageError: the name is not a known benchmark.
    """
    key = dataset_name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in KNOWN_DATASETS:
        raise UsageError(
            f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(KNOWN_DATASETS))}"
        )
    return KNOWN_DATASETS[key]


def check_expected(ds: RetrievalDataset, dataset_name: str) -> list[str]:
    """Compare ``ds`` with the published size of ``dataset_name``'s split.

    Returns one human-readable warning per difference (split, image count,
    caption count, captions per image); an empty list means the loaded data
    matches the benchmark, so the numbers computed on it are comparable with
    papers.  Nothing is printed: the caller decides whether a warning is
    shown or fatal.

    Raises:
        UsageError: ``dataset_name`` is not in :data:`KNOWN_DATASETS`.
    """
    known = resolve_known(dataset_name)
    label = f"{known.name} ({known.description})"
    warnings: list[str] = []
    if ds.split != known.split:
        warnings.append(f"{label} is the {known.split!r} split, but {ds.split!r} was loaded")
    if ds.n_images != known.n_images:
        warnings.append(f"{label} has {known.n_images} images, loaded {ds.n_images}")
    if ds.n_captions != known.n_captions:
        warnings.append(f"{label} has {known.n_captions} captions, loaded {ds.n_captions}")
    per_image = np.bincount(ds.caption_image, minlength=ds.n_images)
    off = int(np.count_nonzero(per_image != known.captions_per_image))
    if off:
        warnings.append(
            f"{label} has {known.captions_per_image} captions per image, "
            f"{off} loaded images have another count (min {int(per_image.min())}, "
            f"max {int(per_image.max())})"
        )
    return warnings
