"""Which library runs a model: the one place that dispatches on ``ModelIdentity.backend``.

``open_clip`` (:mod:`.openclip`): open_clip architectures, config JSONs, ``local-dir:``
folders, the ``multilingual`` preset. ``chinese_clip`` (:mod:`.chineseclip`):
OFA-Sys Chinese-CLIP through transformers, the ``chinese`` preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmsearch.models.identity import (CHINESE_CLIP, ModelIdentity, check_supported, checked_folder,
                                      hf_weight_names)

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder, TextEncoder


def load_embedder(identity: ModelIdentity, device: str = "auto", *, runtime: str = "auto",
                  home: Path | None = None) -> "Embedder":
    """The model for ``identity`` with both towers (images and texts); ``runtime`` runs the
    image tower (:mod:`.onnxtower`: auto, torch, onnx, onnx-int8)."""
    check_supported(identity)
    if identity.backend == CHINESE_CLIP:
        from mmsearch.models.chineseclip import load_chinese_clip
        from mmsearch.models.device import resolve_device, torch_device
        from mmsearch.models.onnxtower import load_runtime
        from mmsearch.settings import default_home

        dev = resolve_device(device)
        embedder = load_chinese_clip(identity, torch_device(dev))
        embedder.runtime = load_runtime(runtime, identity, embedder.image_tower, embedder.image_size,
                                        home or default_home(), dev)
        return embedder  # type: ignore[return-value]
    from mmsearch.models import openclip

    return openclip.load_embedder(identity, device, runtime=runtime, home=home)


def load_text_encoder(identity: ModelIdentity, device: str = "auto", *,
                      weights_path: str | None = None, home: Path | None = None) -> "TextEncoder":
    """What text queries need, loaded the cheapest way that gives the same vectors:
    :func:`lean_text_encoder`'s where one applies, else the model through torch (open_clip's
    text tower alone where it can). ``weights_path``: where a tag's download was cached;
    ``home``: where the torch-free towers keep their files (default MMSEARCH_HOME)."""
    check_supported(identity)
    lean = lean_text_encoder(identity, device, weights_path=weights_path, home=home)
    if lean is not None:
        return lean
    if identity.backend == CHINESE_CLIP:
        return load_embedder(identity, device)
    from mmsearch.models import openclip

    return openclip.load_embedder(identity, device, image_tower=False)


def lean_text_encoder(identity: ModelIdentity, device: str = "auto", *,
                      weights_path: str | None = None,
                      home: Path | None = None) -> "TextEncoder | None":
    """The text encoder that imports no torch for ``identity``, on the CPU, else None; the
    one place that decides which encoder a text query uses. open_clip's plain CLIP text
    tower with its weights in a file: the numpy tower (:mod:`.texttower`). A Hugging Face
    text tower (the multilingual preset, Chinese-CLIP): its ONNX export (:mod:`.onnxtext`),
    made the first time from the model loaded with torch."""
    from mmsearch.models import onnxtext, openclip
    from mmsearch.models.device import resolve_device
    from mmsearch.settings import default_home

    check_supported(identity)
    if identity.backend == CHINESE_CLIP:
        from mmsearch.models import chineseclip

        if identity.fingerprint.startswith("dir:"):
            checked_folder(identity, hf_weight_names())  # changed weights: refused (as open_clip)
        hf_text = chineseclip.hf_text
    else:
        lean = openclip.lean_text_encoder(identity, device, weights_path=weights_path, home=home)
        if lean is not None or not openclip.has_hf_text_tower(identity):
            return lean
        hf_text = openclip.hf_text
    if resolve_device(device) != "cpu":
        return None
    return onnxtext.load(identity, home or default_home(), lambda: hf_text(identity))
