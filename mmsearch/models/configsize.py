"""An open_clip model's size read from its config JSON: parameters, input size, vector size.

Pure Python: neither torch nor open_clip is imported (importing open_clip alone takes
seconds). :func:`model_config` finds a config the way open_clip names it (an architecture
in the installed package's ``model_configs/``, a config file, a ``local-dir:`` folder);
:func:`count_parameters` counts the parameters open_clip would build for the towers it
knows: the ViT and ModifiedResNet image towers and the CLIP text transformer. Towers
built by timm or Hugging Face (MobileCLIP's, XLM-RoBERTa's) need their libraries: for
those it returns None, and :data:`COUNTED` holds what open_clip builds for the
architectures ``mmsearch models`` suggests. The tests hold both to open_clip's own models.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

# Parameters of open_clip 3.3.0's build of architectures with a timm image tower
# (timm 1.0.31), counted from ``open_clip.create_model(arch)``; tests/test_models_cmd.py
# counts them again.
COUNTED = {"MobileCLIP2-S0": 74_835_073, "MobileCLIP2-S2": 99_243_329}

_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
        "init_logit_bias", "custom_text"}
_VIT = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size",
        "patch_dropout", "ls_init_value", "no_ln_pre", "output_tokens"}
_RESNET = {"image_size", "layers", "width", "head_width", "patch_size"}  # patch_size: unused
_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
         "no_causal_mask", "proj_bias", "proj_type", "pool_type", "pad_id", "eos_id",
         "output_tokens", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode"}


def model_config(arch: str, config_path: str | None = None) -> dict[str, Any] | None:
    """The open_clip config of ``arch`` (or of the file ``config_path``), None if not found.

    A ``local-dir:`` folder's ``open_clip_config.json`` keeps the model under ``model_cfg``."""
    if config_path:
        path: Path | None = Path(config_path)
    else:
        spec = importlib.util.find_spec("open_clip")  # the package's folder, not imported
        folders = list(spec.submodule_search_locations or []) if spec else []
        path = Path(folders[0]) / "model_configs" / f"{arch}.json" if folders else None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
    except (OSError, ValueError):
        return None
    if isinstance(cfg, dict) and isinstance(cfg.get("model_cfg"), dict):
        cfg = cfg["model_cfg"]
    return cfg if isinstance(cfg, dict) else None


def image_size(cfg: dict[str, Any]) -> int | None:
    """The image tower's input size in pixels (the smaller side of a non-square one)."""
    size = (cfg.get("vision_cfg") or {}).get("image_size")
    if isinstance(size, (list, tuple)) and size:
        size = min(size)
    return int(size) if isinstance(size, (int, float)) else None


def embed_dim(cfg: dict[str, Any]) -> int | None:
    dim = cfg.get("embed_dim")
    return int(dim) if isinstance(dim, int) else None


def count_parameters(cfg: dict[str, Any]) -> int | None:
    """The parameters open_clip builds for ``cfg``, or None for a tower it cannot count."""
    vision, text, dim = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}, embed_dim(cfg)
    if set(cfg) - _TOP or dim is None:
        return None
    image = _vit(vision, dim) if isinstance(vision.get("layers", 12), int) else _resnet(vision, dim)
    words = _text(text, dim)
    if image is None or words is None:
        return None
    return image + words + 1 + (cfg.get("init_logit_bias") is not None)  # logit scale, bias


def _block(width: int, mlp_ratio: float, layer_scale: bool) -> int:
    """One residual attention block: two LayerNorms, attention, the MLP, layer scale."""
    mlp = int(width * mlp_ratio)
    attention = 3 * width * width + 3 * width + width * width + width
    return 4 * width + attention + 2 * width * mlp + mlp + width + 2 * width * layer_scale


def _vit(v: dict[str, Any], dim: int) -> int | None:
    size, patch, width = v.get("image_size", 224), v.get("patch_size", 16), v.get("width", 768)
    if set(v) - _VIT or not all(isinstance(x, int) for x in (size, patch, width)):
        return None
    layers, ratio = int(v.get("layers", 12)), float(v.get("mlp_ratio", 4.0))
    tokens = (size // patch) ** 2 + 1
    embed = 3 * patch * patch * width + width + tokens * width  # patches, class, positions
    pre = 0 if v.get("no_ln_pre") else 2 * width
    blocks = layers * _block(width, ratio, v.get("ls_init_value") is not None)
    return embed + pre + blocks + 2 * width + width * dim  # ln_post, projection


def _resnet(v: dict[str, Any], dim: int) -> int | None:
    """open_clip's ModifiedResNet: a 3-conv stem, 4 stages of bottlenecks, attention pooling."""
    layers, width, size = v.get("layers"), v.get("width", 64), v.get("image_size", 224)
    if set(v) - _RESNET or not isinstance(size, int) or not (
            isinstance(layers, (list, tuple)) and len(layers) == 4):
        return None
    half = width // 2
    total = 9 * (3 * half + half * half + half * width) + 2 * (2 * half + width)  # stem + BN
    inplanes = width
    for stage, blocks in enumerate(layers):
        planes = width * 2 ** stage
        for n in range(int(blocks)):
            total += _bottleneck(inplanes, planes, downsample=n == 0 and (
                stage > 0 or inplanes != 4 * planes))
            inplanes = 4 * planes
    features = width * 32
    pool = ((size // 32) ** 2 + 1) * features + 3 * (features * features + features)
    return total + pool + features * dim + dim


def _bottleneck(inplanes: int, planes: int, downsample: bool) -> int:
    out = 4 * planes
    convs = inplanes * planes + 9 * planes * planes + planes * out
    norms = 2 * (2 * planes + out)
    return convs + norms + ((inplanes * out + 2 * out) if downsample else 0)


def _text(t: dict[str, Any], dim: int) -> int | None:
    if set(t) - _TEXT or t.get("proj_type", "linear") not in ("linear", "none"):
        return None
    width, vocab = t.get("width", 512), t.get("vocab_size", 49408)
    context = t.get("context_length", 77)
    if not all(isinstance(x, int) for x in (width, vocab, context)):
        return None
    blocks = int(t.get("layers", 12)) * _block(width, float(t.get("mlp_ratio", 4.0)),
                                                t.get("ls_init_value") is not None)
    projection = 0 if t.get("proj_type") == "none" else width * dim + dim * bool(t.get("proj_bias"))
    return vocab * width + context * width + blocks + 2 * width + projection


__all__ = ["COUNTED", "count_parameters", "embed_dim", "image_size", "model_config"]
