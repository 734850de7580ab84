"""Chinese-CLIP's layout: Flickr30K-CN, COCO-CN and MUGE retrieval.

A split is ``{split}_texts.jsonl``, one ``{"text_id": int, "text": str,
"image_ids": [int, ...]}`` object per line, with its images in a folder or in
``{split}_imgs.tsv`` (see :mod:`~mmsearch.eval.datasets.chinese_images`).
:func:`load_chinese_clip` reads the texts (a malformed line is a
:class:`DatasetError` naming ``file:line``), checks that every image id they
refer to has an image, and returns a :class:`RetrievalDataset` with images
sorted by id and captions in file order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import DatasetError
from mmsearch.eval.datasets.base import (RetrievalDataset, check_plain_name, iter_lines,
                                         json_type_name, short_repr, some_names)
from mmsearch.eval.datasets.chinese_images import images_from_tsv, images_in_folder


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_text_line(line: str, where: str) -> tuple[int, str, list[int]]:
    """``(text_id, text, image_ids)`` of one Chinese-CLIP ``*_texts.jsonl`` line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: must be a JSON object, got {json_type_name(obj)}")
    text_id, text, ids = obj.get("text_id"), obj.get("text"), obj.get("image_ids")
    if not _is_int(text_id):
        what = "missing" if text_id is None else f"must be an integer, got {short_repr(text_id)}"
        raise DatasetError(f"{where}: 'text_id' {what}")
    if not isinstance(text, str) or not text.strip():
        what = "missing" if text is None else f"must be a non-empty string, got {short_repr(text)}"
        raise DatasetError(f"{where}: 'text' {what}")
    if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
        what = "must be a non-empty array of integers, got " + short_repr(ids)
        what = "missing" if ids is None else what
        raise DatasetError(f"{where}: 'image_ids' {what}")
    return text_id, text.strip(), ids


def _read_texts(path: Path) -> tuple[list[str], list[list[int]]]:
    """Captions and their ``image_ids`` from a ``*_texts.jsonl`` file, in file order."""
    captions: list[str] = []
    id_lists: list[list[int]] = []
    first_line: dict[int, int] = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        text_id, text, ids = _parse_text_line(line, f"{path}:{lineno}")
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


def _check_known_ids(
    referenced: set[int], available: dict[int, Path], texts: Path, source: Path
) -> None:
    """Raise :class:`DatasetError` if a text refers to an image id ``source`` lacks."""
    unknown = sorted(referenced.difference(available))
    if unknown:
        raise DatasetError(
            f"{texts}: {len(unknown)} of {len(referenced)} image ids have no image in {source}: "
            f"{some_names(unknown)}"
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
    check_plain_name(split, "split")
    root = Path(root)
    texts_path = root / f"{split}_texts.jsonl"
    captions, id_lists = _read_texts(texts_path)
    referenced = {i for ids in id_lists for i in ids}
    if images is None:
        source = root / f"{split}_imgs.tsv"
        available = images_from_tsv(source, root / f".mmsearch_{split}_imgs")
    else:
        source = Path(images)
        available = images_in_folder(source, referenced)
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
