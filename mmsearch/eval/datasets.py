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

Chinese (and other multilingual) retrieval sets come in two more layouts,
loaded by :func:`load_chinese_clip` (Chinese-CLIP's ``{split}_texts.jsonl`` +
``{split}_imgs.tsv`` or an image folder: Flickr30K-CN, COCO-CN, MUGE) and
:func:`load_xtd10` (XTD10's line-aligned ``test_image_names.txt`` +
``test_1kcaptions_<lang>.txt``).  :func:`load_dataset` picks the loader from
what the given path is, and :func:`pos_tag_warning` flags captions that still
carry part-of-speech tags (a known defect of some Flickr30K-CN files).

This module is pure Python + numpy: it never imports torch, open_clip or faiss.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import DatasetError, UsageError
from mmsearch.ingest.discover import IMAGE_EXTENSIONS

__all__ = [
    "DEFAULT_MAX_CAPTIONS_PER_IMAGE",
    "KNOWN_DATASETS",
    "KnownDataset",
    "RetrievalDataset",
    "check_expected",
    "load_chinese_clip",
    "load_dataset",
    "load_karpathy",
    "load_xtd10",
    "pos_tag_warning",
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


# --------------------------------------------------------------------------- #
# Chinese-CLIP (jsonl + tsv), XTD10, format dispatch, POS-tag check
# --------------------------------------------------------------------------- #

#: Longest ``repr`` of an offending value quoted in an error message.
_SHOWN_VALUE_CHARS = 60

#: base64's URL-safe alphabet mapped onto the standard one (Chinese-CLIP
#: writes ``b64encode`` output and reads it back with ``urlsafe_b64decode``).
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def _short(value: Any) -> str:
    """``repr(value)``, cut to :data:`_SHOWN_VALUE_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_plain_name(value: str, what: str) -> None:
    """A split or language must be usable inside a file name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise UsageError(
            f"{what} must be a plain name (letters, digits, '_', '-', '.'), got {value!r}"
        )


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line without newline)`` of a UTF-8 text file, streamed.

    Lines are split on newlines only (``\\n``, ``\\r\\n``, ``\\r``), not on the
    other Unicode separators :meth:`str.splitlines` knows; a BOM is dropped.
    """
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise DatasetError(f"dataset file {what}: {path}")
    lineno = 0
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}:{lineno + 1}: not UTF-8 text") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _parse_cn_text(line: str, where: str) -> tuple[int, str, list[int]]:
    """``(text_id, text, image_ids)`` of one Chinese-CLIP ``*_texts.jsonl`` line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: must be a JSON object, got {_type_name(obj)}")
    text_id, text, ids = obj.get("text_id"), obj.get("text"), obj.get("image_ids")
    if not _is_int(text_id):
        what = "missing" if text_id is None else f"must be an integer, got {_short(text_id)}"
        raise DatasetError(f"{where}: 'text_id' {what}")
    if not isinstance(text, str) or not text.strip():
        what = "missing" if text is None else f"must be a non-empty string, got {_short(text)}"
        raise DatasetError(f"{where}: 'text' {what}")
    if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
        what = "must be a non-empty array of integers, got " + _short(ids)
        what = "missing" if ids is None else what
        raise DatasetError(f"{where}: 'image_ids' {what}")
    return text_id, text.strip(), ids


def _read_cn_texts(path: Path) -> tuple[list[str], list[list[int]]]:
    """Captions and their ``image_ids`` from a ``*_texts.jsonl`` file, in file order."""
    captions: list[str] = []
    id_lists: list[list[int]] = []
    first_line: dict[int, int] = {}
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        text_id, text, ids = _parse_cn_text(line, f"{path}:{lineno}")
        if text_id in first_line:
            raise DatasetError(
                f"{path}:{lineno}: text_id {text_id} repeats line {first_line[text_id]}"
            )
        first_line[text_id] = lineno
        captions.append(text)
        id_lists.append(ids)
    if not captions:
        raise DatasetError(f"{path}: no texts (the split is empty)")
    return captions, id_lists


def _images_in_folder(folder: Path, wanted: set[int]) -> dict[int, Path]:
    """Files of ``folder`` (not recursive) named ``<image_id>.<image ext>``, for ``wanted`` ids."""
    if not folder.is_dir():
        raise DatasetError(f"images directory not found: {folder}")
    by_stem = {str(i): i for i in wanted}
    found: dict[int, Path] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list: {exc.strerror or exc}") from exc
    for file_name in names:
        stem, dot, ext = file_name.rpartition(".")
        if not dot or f".{ext.lower()}" not in IMAGE_EXTENSIONS or stem not in by_stem:
            continue
        image_id = by_stem[stem]
        if image_id in found:
            raise DatasetError(
                f"{folder}: two image files for image id {image_id}: "
                f"{found[image_id].name}, {file_name}"
            )
        found[image_id] = folder / file_name
    return found


def _decode_b64_image(cell: str, where: str) -> bytes:
    """The bytes of one base64 image cell (standard or URL-safe alphabet, padding optional)."""
    try:
        raw = cell.strip().encode("ascii").translate(_URLSAFE_TO_STD)
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise DatasetError(f"{where}: image data is not valid base64") from exc
    if not data:
        raise DatasetError(f"{where}: image data is empty")
    return data


def _cache_image(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, unless a file of that size is already there."""
    try:
        if target.stat().st_size == len(data):
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_tsv_row(line: str, where: str) -> tuple[int, str]:
    """``(image_id, base64 cell)`` of one ``*_imgs.tsv`` row."""
    cells = line.split("\t")
    if len(cells) != 2:
        raise DatasetError(
            f"{where}: expected 2 tab-separated columns (image_id, base64), got {len(cells)}"
        )
    if not re.fullmatch(r"\s*-?[0-9]+\s*", cells[0]):
        raise DatasetError(f"{where}: image_id must be an integer, got {_short(cells[0])}")
    return int(cells[0]), cells[1]


def _images_from_tsv(tsv: Path, cache: Path) -> dict[int, Path]:
    """Decode ``image_id<TAB>base64`` rows of ``tsv`` into ``cache/<image_id>.jpg`` files.

    Files already in the cache with the decoded size are reused, not rewritten.
    """
    if not tsv.is_file():
        raise DatasetError(f"image file not found: {tsv} (or pass an images folder)")
    try:
        cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create image cache {cache}: {exc.strerror or exc} "
            f"(extract the images to a folder and pass it instead)"
        ) from exc
    paths: dict[int, Path] = {}
    for lineno, line in _iter_lines(tsv):
        if not line.strip():
            continue
        where = f"{tsv}:{lineno}"
        image_id, cell = _split_tsv_row(line, where)
        if image_id in paths:
            raise DatasetError(f"{where}: image_id {image_id} appears twice")
        paths[image_id] = cache / f"{image_id}.jpg"
        try:
            _cache_image(paths[image_id], _decode_b64_image(cell, where))
        except OSError as exc:
            raise DatasetError(f"cannot write image cache {cache}: {exc.strerror or exc}") from exc
    if not paths:
        raise DatasetError(f"{tsv}: no images (the split is empty)")
    return paths


def _check_known_ids(
    referenced: set[int], available: dict[int, Path], texts: Path, source: Path
) -> None:
    """Raise :class:`DatasetError` if a text refers to an image id ``source`` lacks."""
    unknown = sorted(referenced.difference(available))
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:_MISSING_NAMES_SHOWN])
        more = ", ..." if len(unknown) > _MISSING_NAMES_SHOWN else ""
        raise DatasetError(
            f"{texts}: {len(unknown)} of {len(referenced)} image ids have no image in {source}: "
            f"{shown}{more}"
        )


def _default_name(root: Path) -> str:
    """A dataset folder's name (resolved, so ``.`` gives the real name)."""
    return root.name or root.resolve().name or "dataset"


def load_chinese_clip(
    root: Path, images: Path | None, split: str = "test", name: str | None = None
) -> RetrievalDataset:
    """Load one split of a dataset in Chinese-CLIP's layout (Flickr30K-CN, COCO-CN, MUGE).

    ``{root}/{split}_texts.jsonl`` holds one ``{"text_id": int, "text": str,
    "image_ids": [int, ...]}`` object per line (blank lines are skipped).
    Images come from the folder ``images`` (files named ``<image_id>.<ext>``,
    any image extension, not recursive), or, when ``images`` is ``None``, from
    ``{root}/{split}_imgs.tsv`` (``image_id<TAB>base64 image bytes`` rows),
    decoded once into ``{root}/.mmsearch_{split}_imgs/<image_id>.jpg`` (written
    atomically; files already there with the right size are reused).

    The gallery: with the tsv, every image it lists (as Chinese-CLIP evaluates:
    unreferenced images are distractors); with a folder, the images the texts
    refer to (a folder may hold several splits).  Images are sorted by id;
    captions keep file order.

    One image per caption: ``caption_image`` maps each text to the FIRST id of
    its ``image_ids``; further ids join the gallery but a hit on them is not
    counted (Recall@K is then a lower bound for such texts).  Name defaults to
    ``root``'s folder name.

    Raises:
        DatasetError: a file is missing, a line is malformed (message gives
            ``file:line``), a ``text_id`` or tsv ``image_id`` repeats, a text
            refers to an image id with no image, or the split is empty.
        UsageError: ``split`` is not a plain name.
    """
    _check_plain_name(split, "split")
    root = Path(root)
    texts_path = root / f"{split}_texts.jsonl"
    captions, id_lists = _read_cn_texts(texts_path)
    referenced = {i for ids in id_lists for i in ids}
    if images is None:
        source = root / f"{split}_imgs.tsv"
        available = _images_from_tsv(source, root / f".mmsearch_{split}_imgs")
    else:
        source = Path(images)
        available = _images_in_folder(source, referenced)
    _check_known_ids(referenced, available, texts_path, source)
    order = sorted(available)
    index = {image_id: i for i, image_id in enumerate(order)}
    return RetrievalDataset(
        name=name or _default_name(root),
        split=split,
        image_paths=[available[i] for i in order],
        captions=captions,
        caption_image=np.asarray([index[ids[0]] for ids in id_lists], dtype=np.int64),
    )


def _read_xtd_lines(path: Path, what: str) -> list[str]:
    """Stripped lines of an XTD10 file; blank lines are errors, except trailing ones."""
    lines = [(lineno, line.strip()) for lineno, line in _iter_lines(path)]
    while lines and not lines[-1][1]:
        lines.pop()
    for lineno, line in lines:
        if not line:
            raise DatasetError(f"{path}:{lineno}: empty {what} line")
    return [line for _, line in lines]


def _xtd_languages(root: Path) -> str:
    """``"de, en, zh"``: the caption languages present in an XTD10 folder."""
    prefix, suffix = "test_1kcaptions_", ".txt"
    found = sorted(p.name[len(prefix) : -len(suffix)] for p in root.glob(f"{prefix}*{suffix}"))
    return ", ".join(found) or "none"


def load_xtd10(
    root: Path, images: Path, language: str = "zh", name: str | None = None
) -> RetrievalDataset:
    """Load XTD10 (Aggarwal & Kale 2020): 1,000 COCO images captioned in ten languages.

    ``{root}/test_image_names.txt`` lists one image file name per line and
    ``{root}/test_1kcaptions_{language}.txt`` one caption per line, aligned:
    caption ``i`` describes image ``i``.  Image ``i`` is ``images / name``.
    Images keep file order; a name listed twice is one image with both
    captions.  Split is ``"test"``; name defaults to ``"xtd10-<language>"``.

    Raises:
        DatasetError: a file is missing (the message lists the languages
            present), a line is blank, the two files' line counts differ, the
            files are empty, or image files are missing.
        UsageError: ``language`` is not a plain name.
    """
    _check_plain_name(language, "language")
    root, images = Path(root), Path(images)
    names_path = root / "test_image_names.txt"
    captions_path = root / f"test_1kcaptions_{language}.txt"
    if names_path.is_file() and not captions_path.is_file():
        raise DatasetError(
            f"dataset file not found: {captions_path} "
            f"(languages present: {_xtd_languages(root)})"
        )
    names = _read_xtd_lines(names_path, "image name")
    captions = _read_xtd_lines(captions_path, "caption")
    if len(names) != len(captions):
        raise DatasetError(
            f"{names_path.name} has {len(names)} lines but "
            f"{captions_path.name} has {len(captions)}; "
            f"caption i must describe image i"
        )
    if not names:
        raise DatasetError(f"{names_path}: no image names (the dataset is empty)")
    index: dict[str, int] = {}
    owners = [index.setdefault(n, len(index)) for n in names]
    image_paths = [images / n for n in index]
    _check_image_files(image_paths, images)
    return RetrievalDataset(
        name=name or f"xtd10-{language}",
        split="test",
        image_paths=image_paths,
        captions=captions,
        caption_image=np.asarray(owners, dtype=np.int64),
    )


#: A token with a part-of-speech tag left on it: ``男人/n``, ``骑:v``, ``，/wp``.
_POS_TAG = re.compile(r"[^\s/:]+[/:][a-z]{1,3}(?![A-Za-z])")

#: Share of tagged captions above which :func:`pos_tag_warning` warns.
_POS_TAGGED_SHARE = 0.05


def _pos_tags(caption: str) -> list[str]:
    """The tagged tokens of ``caption`` if it looks tagged (at least two, and at
    least half of its whitespace tokens), else ``[]``."""
    tags = _POS_TAG.findall(caption)
    if len(tags) >= 2 and 2 * len(tags) >= len(caption.split()):
        return tags
    return []


def pos_tag_warning(ds: RetrievalDataset) -> str | None:
    """A one-line warning if more than 5% of ``ds``'s captions look POS-tagged, else ``None``.

    Some Flickr30K-CN annotation files carry segmenter output with the tags
    left in (``一个/m 男人/n 在/p 骑/v 自行车/n``, or ``男人:n``; see
    CLIP_benchmark PR #101); text encoders then score far below the published
    numbers.  A caption counts as tagged when at least two of its tokens, and
    at least half of its whitespace-separated tokens, end in ``/x`` or ``:x``
    (``x`` one to three lowercase letters), so ``km/h`` or a URL in an English
    caption does not trigger it.  Nothing is printed; the caller decides.
    """
    tagged = 0
    example = ""
    for caption in ds.captions:
        tags = _pos_tags(caption)
        if tags:
            tagged += 1
            example = example or tags[0]
    if tagged == 0 or tagged <= _POS_TAGGED_SHARE * ds.n_captions:
        return None
    return (
        f"{tagged} of {ds.n_captions} captions look part-of-speech tagged ({example!r}); "
        f"strip the tags first (see CLIP_benchmark PR #101)"
    )


#: The layouts :func:`load_dataset` recognises, for its error message.
_FORMATS = (
    "a Karpathy split .json file (needs images)",
    "a Chinese-CLIP folder with {split}_texts.jsonl (images from a folder or {split}_imgs.tsv)",
    "an XTD10 folder with test_image_names.txt and test_1kcaptions_<lang>.txt (needs images)",
)


def _need_images(images: Path | None, layout: str) -> Path:
    """``images``, which ``layout`` cannot do without."""
    if images is None:
        raise UsageError(f"{layout} needs an images folder")
    return Path(images)


def _unrecognised(path: Path, split: str) -> UsageError:
    """The error for a path in none of the known layouts, with a hint where one helps."""
    formats = "; ".join(f.replace("{split}", split) for f in _FORMATS)
    hint = ""
    if path.is_dir():
        splits = sorted(p.name[: -len("_texts.jsonl")] for p in path.glob("*_texts.jsonl"))
        if splits:
            hint = f" (Chinese-CLIP splits present: {', '.join(splits)})"
    elif path.name.endswith("_texts.jsonl"):
        hint = " (for Chinese-CLIP, pass the folder holding this file)"
    return UsageError(f"{path}: unrecognised dataset layout{hint}; expected {formats}")


def load_dataset(
    path: Path,
    images: Path | None,
    split: str = "test",
    name: str | None = None,
    language: str = "zh",
) -> RetrievalDataset:
    """Load a retrieval dataset, choosing the loader from what ``path`` is.

    * a ``.json`` file: :func:`load_karpathy` (``images`` required);
    * a folder holding ``{split}_texts.jsonl``: :func:`load_chinese_clip`
      (``images`` optional: ``None`` reads ``{split}_imgs.tsv``);
    * a folder holding ``test_image_names.txt``: :func:`load_xtd10` with
      ``language`` (``images`` required; only split ``"test"`` exists).

    ``language`` is used by XTD10 only.

    Raises:
        DatasetError: ``path`` does not exist, or the chosen loader's errors.
        UsageError: ``path`` is in none of the three layouts (the message lists
            them), ``images`` is missing where required, or a split other than
            ``"test"`` is asked of XTD10.
    """
    path = Path(path)
    if not path.exists() and path.suffix.lower() != ".json":
        raise DatasetError(f"dataset path not found: {path}")
    if path.suffix.lower() == ".json" and not path.is_dir():
        json_images = _need_images(images, "a Karpathy JSON file")
        return load_karpathy(path, json_images, split=split, name=name)
    if path.is_dir() and (path / f"{split}_texts.jsonl").is_file():
        return load_chinese_clip(path, images, split=split, name=name)
    if path.is_dir() and (path / "test_image_names.txt").is_file():
        if split != "test":
            raise UsageError(f"XTD10 has only a 'test' split, got {split!r}")
        return load_xtd10(path, _need_images(images, "XTD10"), language=language, name=name)
    raise _unrecognised(path, split)
