"""Which library runs a model: the one place that dispatches on ``ModelIdentity.backend``.

``open_clip`` (:mod:`.openclip`): open_clip architectures, config JSONs, ``local-dir:``
folders, the ``multilingual`` preset. ``chinese_clip`` (:mod:`.chineseclip`):
OFA-Sys Chinese-CLIP through transformers, the ``chinese`` preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmsearch.models.identity import CHINESE_CLIP, ModelIdentity, check_supported

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder, TextEncoder


def load_embedder(identity: ModelIdentity, device: str = "auto", *, runtime: str = "auto",
                  home: Path | None = None) -> "Embedder":
    """The model for ``identity`` with both towers (images and texts); ``runtime`` runs the
    image tower (:mod:`.onnxtower`: auto, torch, onnx, onnx-int8)."""
    check_supported(identity)
    if identity.backend == CHINESE_CLIP:
        from mmsearch.models.chineseclip import load_chinese_clip
        from mmsearch.models.device import resolve_device
        from mmsearch.models.onnxtower import load_runtime
        from mmsearch.settings import default_home

        embedder = load_chinese_clip(identity, resolve_device(device))
        embedder.runtime = load_runtime(runtime, identity, embedder.image_tower, embedder.image_size,
                                        home or default_home(), embedder.device)
        return embedder  # type: ignore[return-value]
    from mmsearch.models import openclip

    return openclip.load_embedder(identity, device, runtime=runtime, home=home)


def load_text_encoder(identity: ModelIdentity, device: str = "auto", *,
                      weights_path: str | None = None, home: Path | None = None) -> "TextEncoder":
    """What text queries need, loaded the cheapest way the backend has (``home``: where the
    numpy text tower keeps its weights file; default MMSEARCH_HOME)."""
    check_supported(identity)
    if identity.backend == CHINESE_CLIP:
        return load_embedder(identity, device)
    from mmsearch.models import openclip

    return openclip.load_text_encoder(identity, device, weights_path=weights_path, home=home)


def lean_text_encoder(identity: ModelIdentity, device: str = "auto", *,
                      weights_path: str | None = None,
                      home: Path | None = None) -> "TextEncoder | None":
    """The numpy text tower for ``identity`` where it applies (open_clip's standard CLIP
    text tower, weights in a file, on the CPU), else None."""
    if identity.backend == CHINESE_CLIP:
        return None
    from mmsearch.models import openclip

    return openclip.lean_text_encoder(identity, device, weights_path=weights_path, home=home)
