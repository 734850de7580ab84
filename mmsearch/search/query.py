"""What to search for: a :class:`Query` of weighted terms, and :class:`Filters` on the results.

A term is a text, an image (a path or a PIL image) or a stored image's id, with
a weight; a negative weight pushes results away from it. The query vector is

    q = normalise( sum_i  w_i * normalise(embed(term_i)) )

so each term counts by its weight whatever its modality. Build queries with the
class methods and ``+``, ``-`` and ``*``::

    Query.text("golden retriever", 2) + Query.image("pool.jpg") - Query.text("fruit")
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.search.filters import Filters  # noqa: F401  (Query and Filters go together)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

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
        return cls((Term("id", image_id, _weight(weight)),))

    def __add__(self, other: "Query") -> "Query":
        return Query(self.terms + _query(other).terms)

    def __sub__(self, other: "Query") -> "Query":
        return self + -_query(other)

    def __neg__(self) -> "Query":
        return self * -1.0

    def __mul__(self, factor: float) -> "Query":
        return Query(tuple(replace(t, weight=t.weight * _weight(factor)) for t in self.terms))

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
    if size < 1e-6:
        raise UsageError("the query's terms cancel each other out: nothing to search for")
    return (total / size).astype(np.float32)[None, :]


def _query(value: object) -> Query:
    if not isinstance(value, Query):
        raise UsageError(f"a query combines with another Query, not {type(value).__name__}")
    return value


def _weight(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UsageError(f"a term's weight is a number, got {value!r}")
    return float(value)
