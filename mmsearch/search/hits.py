"""What a search returns, and the one function that turns results into JSON-ready data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ImageHit:
    """An image found: its rank (1 = first shown), cosine score, id, path and metadata
    (None where the file does not say, or the index has not read it yet)."""

    rank: int       # 1 = best
    score: float    # cosine similarity, -1..1
    id: int
    path: Path | str  # a URL (s3://bucket/a.jpg: indexed by the Ray runner) stays a str
    taken: str | None = None          # local date-time, ISO
    taken_source: str | None = None   # "exif" or "mtime" (the file's modification time)
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None           # bytes
    ext: str | None = None
    kind: str = "image"               # "image", or "video": a moment of a video at ``path``
    time: float | None = None         # a video's moment: the best frame's time (seconds)
    start: float | None = None        # ...and the span around it that matches as well
    end: float | None = None
    video_id: int | None = None


class Hits(list):
    """The hits of a search, best first: a plain list, plus ``hint``, one line about the
    query worth showing (e.g. that the model does not read the query's script), or None."""

    hint: str | None = None

    @classmethod
    def of(cls, hits: list, hint: str | None = None) -> "Hits":
        out = cls(hits)
        out.hint = hint
        return out


HIT_METADATA = ("taken", "taken_source", "camera_make", "camera_model", "lens", "gps_lat",
                "gps_lon", "width", "height", "size", "ext")


@dataclasses.dataclass(frozen=True)
class TextHit:
    rank: int
    score: float
    id: int
    key: str
    text: str


def to_json(value: Any) -> Any:
    """Plain JSON data (dicts, lists, str, numbers, None) for hits, reports and their parts.

    Dataclasses become dicts of their fields (plus ``images_per_second`` and other
    properties named in ``__json_extra__``), paths strings, tuples and sets lists.
    The CLI prints it; the HTTP API will return it.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in getattr(value, "__json_extra__", ()):
            out[name] = to_json(getattr(value, name))
        return out
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
