"""Models: which model an index uses (:mod:`.identity`, pure Python) and the code that runs it.

``identity``   ModelIdentity (backend, architecture, weights, text tower), resolving
               --model/--pretrained, fingerprints, defaults
``device``     the compute device, resolved once (and the GPU FAISS may use)
``openclip``   the open_clip backend: Embedder, load_embedder, its text towers for queries
``texttower``  CLIP's text tower in numpy, for text queries without torch or open_clip
``towerfile``  a text tower's weights file under the home (safetensors, memory-mapped)
``cliptokenizer`` CLIP's BPE tokenizer without torch
``onnxtext``   Hugging Face text towers (multilingual, Chinese-CLIP) through ONNX Runtime
``hftext``     what a backend hands over to export its Hugging Face text tower
``hub``        where a pretrained tag's weights come from; offline detection
``backends``   the one dispatch on the backend: open_clip or chinese_clip
``chineseclip`` OFA-Sys Chinese-CLIP through transformers
``languages``  which scripts a text tower reads; the hint for queries it does not

Importing this package imports neither torch nor open_clip: the loaders below do, when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmsearch.models.identity import (DEFAULT_MODEL, DEFAULT_PRETRAINED, NO_WEIGHTS,
                                      ModelIdentity, check_loaded, identify)

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder, TextEncoder, load_embedder, load_text_encoder

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "NO_WEIGHTS", "ModelIdentity", "identify",
           "check_loaded", "Embedder", "TextEncoder", "load_embedder", "load_text_encoder"]
_LAZY = ("Embedder", "TextEncoder", "load_embedder", "load_text_encoder")


def __getattr__(name: str) -> Any:
    if name in ("load_embedder", "load_text_encoder"):
        from mmsearch.models import backends

        return getattr(backends, name)
    if name in _LAZY:
        from mmsearch.models import openclip

        return getattr(openclip, name)
    raise AttributeError(f"module 'mmsearch.models' has no attribute {name!r}")
