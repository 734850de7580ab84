"""Text queries without importing open_clip: CLIP's text tower in plain torch.

Importing open_clip also imports torchvision, timm and friends: about 2 s of a
cold ``mmsearch query`` that embeds one short text. For the standard open_clip
text tower (token embedding, a causal pre-LayerNorm transformer, pooling at the
end-of-text token, a projection matrix) this module runs the same computation
with ``torch.nn.functional`` over the checkpoint's text weights, memory-mapped
so only the pages used are read; the tokenizer is open_clip's own file, loaded
by path. Anything else -- other configs, checkpoint layouts, devices -- makes
:func:`load` return None and :mod:`mmsearch.models` uses open_clip as usual.
The tests hold this tower equal to open_clip's ``encode_text`` to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

# text_cfg keys this tower implements (with open_clip's defaults); any other key
# (HF towers, layer scale, other pooling or attention variants) means "use open_clip"
_PLAIN_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_PLAIN_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                   "init_logit_bias"}


@dataclass(frozen=True)
class TextSpec:
    """The shape of a plain CLIP text tower, read from its open_clip config."""

    context_length: int
    width: int
    heads: int
    layers: int
    quick_gelu: bool


def _open_clip_dir() -> Path | None:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def text_spec(arch: str, config_path: str | None) -> TextSpec | None:
    """The tower's shape when ``arch`` (or the config file) is a plain CLIP text tower."""
    package = _open_clip_dir()
    path = Path(config_path) if config_path else (package / "model_configs" / f"{arch}.json"
                                                  if package else None)
    if path is None or not path.is_file() or "siglip" in arch.lower():
        return None  # SigLIP names pick another tokenizer in open_clip
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)  # a local-dir folder's open_clip_config.json
        text = cfg["text_cfg"]
        if set(cfg) - _PLAIN_TOP_KEYS or set(text) - _PLAIN_TEXT_KEYS:
            return None
        return TextSpec(int(text.get("context_length", 77)), int(text.get("width", 512)),
                        int(text.get("heads", 8)), int(text.get("layers", 12)),
                        bool(cfg.get("quick_gelu", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _tokenizer(context_length: int) -> Callable[[Sequence[str]], "torch.Tensor"] | None:
    """open_clip's SimpleTokenizer, from the loaded package or its file loaded on its own."""
    module = sys.modules.get("open_clip.tokenizer")
    if module is None:
        package = _open_clip_dir()
        if package is None or not (package / "tokenizer.py").is_file():
            return None
        spec = importlib.util.spec_from_file_location("_mmsearch_clip_tokenizer",
                                                      package / "tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a changed open_clip layout: fall back to open_clip
            return None
    return module.SimpleTokenizer(context_length=context_length)


def _text_weights(path: Path) -> dict[str, "torch.Tensor"] | None:
    """The checkpoint's non-image tensors, memory-mapped; None for layouts left to open_clip."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - TorchScript archives, old formats, pickles: open_clip's job
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    return {k.removeprefix("module."): v if v.dtype == torch.float32 or not v.is_floating_point()
            else v.float()  # half-precision checkpoints: open_clip loads them into float32 too
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.removeprefix("module.").startswith("visual.")}


def _shapes_fit(w: dict[str, "torch.Tensor"], spec: TextSpec) -> bool:
    width = spec.width
    need = {"token_embedding.weight": 2, "positional_embedding": 2, "ln_final.weight": 1,
            "ln_final.bias": 1, "text_projection": 2}
    if any(k not in w or w[k].dim() != d for k, d in need.items()):
        return False
    layers = {int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks.")}
    return (tuple(w["positional_embedding"].shape) == (spec.context_length, width)
            and w["token_embedding.weight"].shape[1] == width
            and w["text_projection"].shape[0] == width
            and layers == set(range(spec.layers)) and width % spec.heads == 0
            and all(f"transformer.resblocks.{i}.{name}" in w for i in range(spec.layers)
                    for name in _BLOCK_KEYS))


_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
               "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


class TextTower:
    """CLIP's text encoder as ``torch.nn.functional`` calls over a dict of weights.

    The layers' matrices are used as ``[in, out]``: first as transposed views of the
    mapped checkpoint, then, from the second encoding on, as contiguous copies -- for
    the few rows of a query ``addmm`` over that layout runs ~25 % faster (the matrix
    products are ~80 % of an encoding), but copying 151 MB (ViT-B-32) costs ~0.12 s,
    which a process that embeds one query (``mmsearch query``) never pays.
    """

    def __init__(self, spec: TextSpec, weights: dict[str, "torch.Tensor"],
                 tokenizer: Callable[[Sequence[str]], "torch.Tensor"]) -> None:
        self.spec = spec
        self._w = {k: (w.t() if _is_matrix(k, w) else w) for k, w in weights.items()}
        self._tokenizer = tokenizer
        self._encodings = 0

    def _pack(self) -> None:
        self._w = {k: (w.contiguous() if _is_matrix(k, w) else w) for k, w in self._w.items()}

    def encode(self, texts: Sequence[str]) -> "np.ndarray":
        """(N, D) float32, L2-normalised: open_clip's ``encode_text`` over the trimmed context."""
        import torch
        import torch.nn.functional as F

        self._encodings += 1
        if self._encodings == 2:
            self._pack()
        w, spec = self._w, self.spec
        tokens = self._tokenizer(list(texts))
        last = tokens.argmax(dim=-1)  # the end-of-text token has the highest id
        n = int(last.max()) + 1       # causal: the padding after it changes nothing
        with torch.inference_mode():
            x = F.embedding(tokens[:, :n], w["token_embedding.weight"]) + w["positional_embedding"][:n]
            b = x.shape[0]
            x = x.reshape(b * n, spec.width)  # rows = tokens; attention reshapes per head
            for i in range(spec.layers):
                x = self._block(x, b, n, f"transformer.resblocks.{i}.")
            x = F.layer_norm(x, (spec.width,), w["ln_final.weight"], w["ln_final.bias"])
            x = x.reshape(b, n, spec.width)[torch.arange(b), last] @ w["text_projection"]
            return F.normalize(x.float(), dim=-1).numpy()

    def _block(self, x: "torch.Tensor", b: int, n: int, p: str) -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        w, width, heads = self._w, self.spec.width, self.spec.heads
        y = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = torch.addmm(w[p + "attn.in_proj_bias"], y, w[p + "attn.in_proj_weight"])
        q, k, v = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b * n, width)
        x = x + torch.addmm(w[p + "attn.out_proj.bias"], a, w[p + "attn.out_proj.weight"])
        y = F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        y = torch.addmm(w[p + "mlp.c_fc.bias"], y, w[p + "mlp.c_fc.weight"])
        y = y * torch.sigmoid(1.702 * y) if self.spec.quick_gelu else F.gelu(y)
        return x + torch.addmm(w[p + "mlp.c_proj.bias"], y, w[p + "mlp.c_proj.weight"])


def _is_matrix(key: str, w: "torch.Tensor") -> bool:
    return key.startswith("transformer.") and w.dim() == 2


def load(arch: str, config_path: str | None, weights_path: str | Path) -> TextTower | None:
    """The plain-torch tower for these weights, or None where open_clip must do it."""
    spec = text_spec(arch, config_path)
    if spec is None:
        return None
    weights = _text_weights(Path(weights_path))
    if weights is None or not _shapes_fit(weights, spec):
        return None
    tokenizer = _tokenizer(spec.context_length)
    return TextTower(spec, weights, tokenizer) if tokenizer is not None else None


__all__ = ["TextSpec", "TextTower", "load", "text_spec"]
