"""What to search for: a :class:`Query` of weighted terms, and :class:`Filters` on the results.

A term is a text, an image (a path or a PIL image) or a stored image's id, with
a weight; a negative weight pushes results away from it. The query vector is

    q = normalise( sum_i  w_i * normalise(embed(term_i)) )

so each term counts by its weight whatever its modality. Build queries with the
class methods and ``+``, ``-`` and ``*``::

    Query.text("golden retriever", 2) + Query.image("pool.jpg") - Query.text("fruit")

Bounds: a weight is a finite number of size at most :data:`MAX_WEIGHT` (0, or at
least :data:`MIN_WEIGHT`), a query has at most :data:`MAX_TERMS` terms, and an id
is a whole number SQLite can hold (:func:`image_id` reads one from text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.search.filters import Filters  # noqa: F401  (Query and Filters go together)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

MAX_WEIGHT, MIN_WEIGHT = 100.0, 1e-3  # weights are relative: wider spans only lose precision
MAX_TERMS = 32
MAX_ID = 2**63 - 1                    # SQLite's INTEGER: no catalog id is larger

TermKind = Literal["text", "image", "id"]
ImageLike = Union[str, Path, "Image.Image"]


@dataclass(frozen=True)
class Term:
    kind: TermKind
    value: "str | ImageLike | int"
    weight: float = 1.0


@dataclass(frozen=True)
class Query:
    """Weighted positive and negative terms; see the module's docstring."""

    terms: tuple[Term, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.terms) > MAX_TERMS:
            raise UsageError(f"too many terms: {len(self.terms)} (at most {MAX_TERMS})")

    @classmethod
    def text(cls, text: str, weight: float = 1.0) -> "Query":
        return cls((Term("text", text, _weight(weight)),))

    @classmethod
    def image(cls, image: ImageLike, weight: float = 1.0) -> "Query":
        return cls((Term("image", image, _weight(weight)),))

    @classmethod
    def id(cls, image_id: int, weight: float = 1.0) -> "Query":
        """An indexed image, by its id (``ImageHit.id``): "more like this one"."""
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise UsageError(f"an image id is a whole number, got {image_id!r}")
        if not 0 <= image_id <= MAX_ID:
            raise UsageError(f"no indexed image has id {shown(str(image_id))}")
        return cls((Term("id", image_id, _weight(weight)),))

    def __add__(self, other: "Query") -> "Query":
        return Query(self.terms + _query(other).terms)

    def __sub__(self, other: "Query") -> "Query":
        return self + -_query(other)

    def __neg__(self) -> "Query":
        return self * -1.0

    def __mul__(self, factor: float) -> "Query":
        factor = _weight(factor)
        return Query(tuple(replace(t, weight=_weight(t.weight * factor)) for t in self.terms))

    __rmul__ = __mul__

    @property
    def kinds(self) -> set[TermKind]:
        return {t.kind for t in self.terms}


def combine(vectors: np.ndarray, weights: "list[float] | np.ndarray") -> np.ndarray:
    """``normalise(sum_i w_i * normalise(v_i))`` as a (1, D) float32 row.

    Raises :class:`UsageError` when the terms cancel out (a zero vector ranks nothing).
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not len(vectors) or (norms == 0).any():
        raise UsageError("a query term has no direction (an empty or blank embedding)")
    total = (np.asarray(weights, dtype=np.float64)[:, None] * vectors / norms).sum(axis=0)
    size = float(np.linalg.norm(total))
    if size <= 1e-6 * float(np.abs(weights).max()):  # relative: weights only scale the sum
        raise UsageError("the query's terms cancel each other out: nothing to search for")
    return (total / size).astype(np.float32)[None, :]


def _query(value: object) -> Query:
    if not isinstance(value, Query):
        raise UsageError(f"a query combines with another Query, not {type(value).__name__}")
    return value


def _weight(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"a term's weight is a number, got {shown(repr(value))}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_WEIGHT or 0 < abs(number) < MIN_WEIGHT:
        raise UsageError(f"a term's weight is 0 or between {MIN_WEIGHT:g} and {MAX_WEIGHT:g} "
                         f"in size (negative to push away), got {shown(repr(value))}")
    return number


def image_id(text: str) -> int:
    """An image id written as text (a URL's ``/thumb/42``, ``id:42``, a command line): ASCII
    digits only, so ``²`` or ``１`` are no id. :class:`UsageError` otherwise, and for a
    number no catalog can hold (beyond SQLite's integer)."""
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"id: takes an indexed image's number (id:42), not {shown(text)!r}")
    if len(text.lstrip("0")) > len(str(MAX_ID)) or int(text) > MAX_ID:
        raise UsageError(f"no indexed image has id {shown(text)}")
    return int(text)


def shown(text: str, limit: int = 40) -> str:
    """``text`` cut for an error message (one line, a bounded length)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
