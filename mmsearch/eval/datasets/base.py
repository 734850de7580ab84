"""The type every loader returns, and the checks the loaders share.

:class:`RetrievalDataset` is one split of an image-text retrieval set,
flattened: a list of image paths, a list of captions, and for every caption the
index of the image it describes.  The helpers below are what more than one
file format needs: reading a UTF-8 text file line by line, checking that a
split or language name fits in a file name, checking that the image files
exist, and naming values and JSON types in one-line :class:`DatasetError`
messages.  Pure Python + numpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mmsearch.errors import DatasetError, UsageError

_T = TypeVar("_T")

#: How many missing names an error message spells out.
_NAMES_SHOWN = 3

#: Longest ``repr`` of an offending value quoted in an error message.
_SHOWN_VALUE_CHARS = 60


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


def json_type_name(value: Any) -> str:
    """Short JSON-ish name of a value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to :data:`_SHOWN_VALUE_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[: _SHOWN_VALUE_CHARS - 3] + "..."


def some_names(items: Sequence[_T], show: Callable[[_T], object] = str) -> str:
    """``"a, b, c, ..."``: the first few ``items`` as ``show`` names them, for an error message."""
    more = ", ..." if len(items) > _NAMES_SHOWN else ""
    return ", ".join(str(show(item)) for item in items[:_NAMES_SHOWN]) + more


def check_plain_name(value: str, what: str) -> None:
    """A split or language must be usable inside a file name.

    Raises:
        UsageError: ``value`` is not letters, digits, ``_``, ``-`` and ``.``
            (starting with a letter or digit).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise UsageError(
            f"{what} must be a plain name (letters, digits, '_', '-', '.'), got {value!r}"
        )


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line without newline)`` of a UTF-8 text file, streamed.

    Lines are split on newlines only (``\\n``, ``\\r\\n``, ``\\r``), not on the
    other Unicode separators :meth:`str.splitlines` knows; a BOM is dropped.

    Raises:
        DatasetError: the file is missing, unreadable or not UTF-8.
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


def check_image_files(paths: list[Path], images_root: Path) -> None:
    """Raise :class:`DatasetError` if ``images_root`` or any image file is missing."""
    if not images_root.is_dir():
        raise DatasetError(f"images directory not found: {images_root}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} image files missing under {images_root}: "
            f"{some_names(missing, lambda p: p.relative_to(images_root))}"
        )
