"""mmsearch: search photo folders and image-text collections by meaning.

`import mmsearch` is cheap: torch, open_clip and faiss load only when an
:class:`Engine` first needs a model or an index.

    from mmsearch import Engine
    with Engine.open("photos", model="ViT-B-32", pretrained="laion2b_s34b_b79k") as engine:
        engine.index(["~/Pictures"])
        for hit in engine.search("red sports car", k=5):
            print(hit.rank, hit.score, hit.path)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmsearch.errors import MMSearchError

__version__ = "0.1.0"
__all__ = ["Engine", "ImageHit", "TextHit", "IndexReport", "Query", "Filters", "MMSearchError",
           "__version__"]
_LAZY = ("Engine", "ImageHit", "TextHit", "IndexReport", "Query", "Filters")

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.engine import Engine, Filters, ImageHit, IndexReport, Query, TextHit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mmsearch import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mmsearch' has no attribute {name!r}")
