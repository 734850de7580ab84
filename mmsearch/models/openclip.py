"""The open_clip backend: load a :class:`ModelIdentity` into encoders.

This is the only module that imports open_clip. :func:`load_embedder` builds an
:class:`Embedder` (images in, vectors out; texts in, vectors out); for text queries
:func:`lean_text_encoder` the numpy text tower and :func:`hf_text` a Hugging Face text
tower to export (:mod:`.backends` decides which a query uses). Vectors are float32 and
L2-normalised.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from mmsearch.errors import ModelError
from mmsearch.models.device import resolve_device, torch_device
from mmsearch.models.identity import (LOCAL_DIR, NO_WEIGHTS, ModelIdentity, check_supported,
                                      checked_file, checked_folder, checked_text_folder)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

    from mmsearch.models.hftext import HFText

TEXT_CACHE = 1024  # texts whose vectors an encoder keeps for repeated queries


class TextEncoder:
    """Texts in, vectors out, with a small cache for repeated texts (shared by both loaders)."""

    identity: ModelIdentity
    device: str
    has_image_tower = False

    def __init__(self, identity: ModelIdentity, device: str) -> None:
        self.identity = identity
        self.device = device
        self._text_cache: OrderedDict[str, "np.ndarray"] = OrderedDict()

    def encode_texts(self, texts: Sequence[str]) -> "np.ndarray":
        """Embed texts; returns (N, D) float32, L2-normalised. Repeated texts hit a small cache."""
        import numpy as np

        distinct = list(dict.fromkeys(texts))
        missing = [t for t in distinct if t not in self._text_cache]
        found = dict(zip(missing, self._encode_uncached(missing))) if missing else {}
        found.update((t, self._text_cache[t]) for t in distinct if t not in found)
        out = np.stack([found[t] for t in texts]).astype(np.float32, copy=False)
        for t in distinct:  # the cache keeps the last TEXT_CACHE texts, read back or not
            self._text_cache[t] = found[t]
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > TEXT_CACHE:
            self._text_cache.popitem(last=False)
        return out

    def _encode_uncached(self, texts: list[str]) -> "np.ndarray":
        raise NotImplementedError

    def warm(self) -> None:
        """Get ready to answer many texts (a server, before its first query): what a
        second text would set up, done now. Nothing to do for most encoders."""

    @property
    def embed_dim(self) -> int:
        return int(self.encode_texts([""]).shape[1])


class _PlainTextEncoder(TextEncoder):
    """Text queries through :mod:`mmsearch.models.texttower` (numpy: no torch, no open_clip)."""

    def __init__(self, identity: ModelIdentity, tower: Any) -> None:
        super().__init__(identity, "cpu")
        self._tower = tower

    def _encode_uncached(self, texts: list[str]) -> "np.ndarray":
        return self._tower.encode(texts)

    def warm(self) -> None:
        self._tower.warm()


class Embedder(TextEncoder):
    """A loaded open_clip model: ``encode_images`` and ``encode_texts``."""

    def __init__(self, identity: ModelIdentity, model: Any, preprocess: Callable,
                 tokenizer: Callable, device: str) -> None:
        import open_clip

        super().__init__(identity, device)
        self._model = model
        self.preprocess: Callable[["Image.Image"], "torch.Tensor"] = preprocess
        self._tokenizer = tokenizer
        self.has_image_tower = preprocess is not None
        cfg = open_clip.get_model_preprocess_cfg(model) if self.has_image_tower else {}
        size = cfg.get("size", 224)
        self.image_size: int = int(size if isinstance(size, int) else min(size))
        self.preprocess_cfg: dict[str, Any] = {k: v for k, v in cfg.items()}
        self._pil_stage, self._norm = _split_preprocess(preprocess) if preprocess else (None, None)
        self.runtime: Any = None  # models.onnxtower.ImageRuntime; None: torch

    @property
    def image_precision(self) -> str:
        """``int8`` when the int8 ONNX tower embeds the images, else ``fp32``."""
        from mmsearch.models.onnxtower import precision

        return precision(self.runtime.runtime if self.runtime is not None else "torch")

    def prepare(self, image: "Image.Image") -> "np.ndarray | torch.Tensor":
        """One RGB image -> model input: a uint8 HxWx3 array when the tensor steps can be
        batched (open_clip's standard transform), else the fully preprocessed tensor."""
        if self._pil_stage is None:
            return self.preprocess(image)
        import numpy as np

        return np.asarray(self._pil_stage(image), dtype=np.uint8)

    def collate(self, items: Sequence["np.ndarray | torch.Tensor"], *,
                uint8: bool = False) -> "torch.Tensor":
        """Stack :meth:`prepare` outputs into a batch; ToTensor + Normalize run once per batch
        (per image they cost ~20x more in torch op overhead; the result is bit-identical).
        ``uint8``: leave uint8 arrays as a (N, H, W, 3) uint8 batch (pinned for a GPU), which
        :meth:`encode_images` normalises on the model's device (a quarter of the bytes)."""
        import numpy as np
        import torch

        if self._norm is None:
            return torch.stack(list(items))
        if uint8:
            from mmsearch.models.device import stack_uint8

            return stack_uint8(items, pin=self.device.startswith("cuda"))
        mean, std = self._norm
        batch = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float().div_(255)
        return batch.sub_(mean).div_(std).contiguous()

    @property
    def torch_model(self) -> Any:
        """The open_clip ``nn.Module`` itself (for training; search code never needs it)."""
        return self._model

    def tokenize(self, texts: Sequence[str]) -> "torch.Tensor":
        """Token ids as the model's tokenizer makes them (N, context length), on the CPU."""
        return self._tokenizer(list(texts))

    @functools.cached_property
    def weights_path(self) -> str | None:
        """The checkpoint file the weights came from (a tag's: where open_clip cached it)."""
        if self.identity.fingerprint.startswith("file:"):
            return self.identity.pretrained
        return _tag_file(self.identity) if self.identity.pretrained != NO_WEIGHTS else None

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def encode_images(self, batch: "torch.Tensor") -> "np.ndarray":
        """Embed a preprocessed batch (N, 3, H, W), or a uint8 (N, H, W, 3) one (normalised on
        the model's device); returns (N, D) float32, L2-normalised."""
        import torch

        from mmsearch.models.device import normalise_on

        with torch.inference_mode(), self._autocast():
            if batch.dtype == torch.uint8 and self._norm is not None:
                batch = normalise_on(batch, *self._norm, self.device)
            if self.runtime is not None and self.runtime.run is not None:  # ONNX Runtime
                feats = torch.from_numpy(self.runtime.run(batch))
            else:
                feats = self._model.encode_image(batch.to(self.device, non_blocking=True))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    def _encode_uncached(self, texts: list[str]) -> "np.ndarray":
        import torch

        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            feats = encode_text_trimmed(self._model, tokens)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()


def _split_preprocess(preprocess: Any) -> tuple[Any, Any]:
    """(PIL steps, (mean, std)) when ``preprocess`` is PIL steps + ToTensor + Normalize, else (None, None)."""
    import torch
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        return None, None
    pil_steps = [t for t in steps[:-2] if type(t).__name__ != "MaybeConvertMode"]
    if not all(isinstance(t, (T.Resize, T.CenterCrop)) for t in pil_steps):
        return None, None
    norm = steps[-1]
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return T.Compose(pil_steps), (mean, std)


def encode_text_trimmed(model: Any, tokens: "torch.Tensor") -> "torch.Tensor":
    """``model.encode_text`` without the padding after the longest text in the batch.

    A causal text tower (open_clip's ``CLIP`` with an attention mask and EOT pooling)
    never lets a token see the ones after it, so cutting the padded 77-token context
    to the longest real sequence gives the same embedding at a fraction of the cost
    ("red sports car" is 5 tokens). Other towers fall back to ``encode_text``.
    """
    import torch
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    pool = getattr(model, "text_pool_type", None)
    if not isinstance(model, CLIP) or model.attn_mask is None or pool not in ("argmax", "eos"):
        return model.encode_text(tokens)
    if pool == "argmax":  # the pooled (EOT) token has the highest id
        last = tokens.argmax(dim=-1)
    else:
        last = (tokens == model.text_eos_id).int().argmax(dim=-1)
    length = int(last.max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


def load_embedder(identity: ModelIdentity, device: str = "auto", *,
                  image_tower: bool = True, runtime: str = "torch",
                  home: Path | None = None) -> Embedder:
    """Build the open_clip model for ``identity`` (downloading a tagged checkpoint once).

    ``image_tower=False`` builds only what text queries need when it can: the
    model skeleton on the meta device (no random initialisation) and the text
    weights from the checkpoint, about half the weights and a fraction of the time.
    ``runtime``: who runs the image tower (:mod:`.onnxtower`; its files under ``home``).
    """
    import open_clip

    check_supported(identity)
    if identity.config_path:
        if not Path(identity.config_path).is_file():
            raise ModelError(f"model config not found: {identity.config_path}")
        open_clip.add_model_config(identity.config_path)
    name = open_clip_name(identity)
    if not name.startswith(LOCAL_DIR) and name not in open_clip.list_models():
        raise ModelError(f"unknown model architecture {identity.arch!r} "
                         "(see `python -c 'import open_clip; print(open_clip.list_models())'`)")
    dev = resolve_device(device)
    pretrained = None if identity.pretrained == NO_WEIGHTS else identity.pretrained
    if identity.text_pretrained:  # a fine-tuned text tower: its folder holds the whole model
        checked_text_folder(identity)  # (with the base's image tower, bit for bit)
        pretrained = None
    elif identity.fingerprint.startswith("file:"):
        checked_file(identity)
    elif identity.fingerprint.startswith("dir:"):
        checked_folder(identity)
        pretrained = None  # a local-dir: model: the folder is the model, weights included
    tdev = torch_device(dev)  # openvino, coreml: ONNX Runtime's; torch works on the CPU
    text_only = None if image_tower or pretrained is None else _create_text_only(identity, tdev)
    model, preprocess = (text_only, None) if text_only is not None else _create(identity, pretrained, tdev)
    model.eval()
    with _quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(name)
    embedder = Embedder(identity, model, preprocess, tokenizer, tdev)
    if preprocess is not None:
        embedder.runtime = _image_runtime(embedder, runtime, home, dev)
    return embedder


def _image_runtime(embedder: Embedder, runtime: str, home: Path | None, device: str) -> Any:
    """The :class:`~.onnxtower.ImageRuntime` ``runtime`` resolves to on ``device`` (its notes
    logged)."""
    from mmsearch.models.onnxtower import load_runtime
    from mmsearch.settings import default_home

    return load_runtime(runtime, embedder.identity, embedder.torch_model, embedder.image_size,
                        home or default_home(), device)


def open_clip_name(identity: ModelIdentity) -> str:
    """The model name open_clip knows ``identity`` by (``local-dir:FOLDER`` for a folder)."""
    if identity.text_pretrained:
        return f"{LOCAL_DIR}{identity.text_pretrained}"
    if identity.fingerprint.startswith("dir:"):
        return f"{LOCAL_DIR}{identity.pretrained}"
    return identity.arch


def lean_text_encoder(identity: ModelIdentity, device: str = "auto", *,
                      weights_path: str | None = None,
                      home: Path | None = None) -> TextEncoder | None:
    """:mod:`mmsearch.models.texttower` for ``identity`` where it applies (a plain CLIP text
    tower, its weights in a file, on the CPU), else None."""
    config_path = identity.config_path
    if identity.text_pretrained or identity.fingerprint.startswith("dir:"):  # a model folder
        folder = Path(checked_text_folder(identity) if identity.text_pretrained
                      else checked_folder(identity))
        config_path, weights_path = str(folder / "open_clip_config.json"), None
        if (folder / "open_clip_model.safetensors").is_file():
            weights_path = str(folder / "open_clip_model.safetensors")
    elif identity.fingerprint.startswith("file:"):
        weights_path = checked_file(identity)
    if weights_path and Path(weights_path).is_file() and resolve_device(device) == "cpu":
        from mmsearch.models import texttower
        from mmsearch.settings import default_home

        tower = texttower.load(identity.arch, config_path, weights_path, home or default_home())
        if tower is not None:
            return _PlainTextEncoder(identity, tower)
    return None


def has_hf_text_tower(identity: ModelIdentity) -> bool:
    """Whether ``identity``'s config gives it a Hugging Face text tower (the multilingual
    preset's XLM-RoBERTa, say) with weights to export; read without importing open_clip."""
    import importlib.util
    import json

    if identity.text_pretrained or identity.fingerprint.startswith("dir:"):
        path = Path(identity.text_pretrained or identity.pretrained) / "open_clip_config.json"
    elif identity.config_path:
        path = Path(identity.config_path)
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return False
        package = Path(list(spec.submodule_search_locations)[0])
        path = package / "model_configs" / f"{identity.arch}.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        text = cfg.get("model_cfg", cfg)["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(text.get("hf_model_name")) and identity.pretrained != NO_WEIGHTS


def hf_text(identity: ModelIdentity) -> "HFText":
    """``identity``'s Hugging Face text tower as :mod:`.onnxtext` exports it: the
    transformer, open_clip's pooler and projection, its tokenizer's cleaning (loads the
    model with torch, on the CPU)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer, _clean_lower, _clean_whitespace

    from mmsearch.models.hftext import HFText, NotExportable

    embedder = load_embedder(identity, "cpu", image_tower=False)
    tower, tok = getattr(embedder.torch_model, "text", None), embedder._tokenizer
    if not isinstance(tower, HFTextEncoder) or not isinstance(tok, HFTokenizer):
        raise NotExportable("not a Hugging Face text tower with its tokenizer")
    clean = {_clean_whitespace: "whitespace", _clean_lower: "lower"}.get(tok.clean_fn)
    if tok.tokenizer_mode or tok.strip_sep_token or clean is None:
        raise NotExportable("its tokenizer's mode, cleaning or [SEP] stripping is not one "
                            "the export repeats")

    def forward(input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
        out = tower.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return tower.proj(tower.pooler(out, attention_mask))

    return HFText(tower, forward, tok.tokenizer, int(tok.context_length), embedder.encode_texts,
                  clean, int(tower.config.pad_token_id))


def _create(identity: ModelIdentity, pretrained: str | None, device: str) -> tuple[Any, Callable]:
    import open_clip
    import torch

    if pretrained and identity.fingerprint.startswith("tag:"):
        tags = open_clip.list_pretrained_tags_by_model(identity.arch)
        if pretrained not in tags:
            raise ModelError(f"{identity.arch} has no pretrained tag {pretrained!r}; "
                             f"known tags: {', '.join(tags) or 'none'}; or pass a checkpoint file")
    if pretrained is None:
        torch.manual_seed(0)  # random weights, but the same ones in every process
    elif identity.fingerprint.startswith("tag:"):
        from mmsearch.models.hub import check_download

        check_download(identity.arch, pretrained)  # fails at once, in one line, when offline
    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                open_clip_name(identity), pretrained=pretrained, device=device)
    except Exception as exc:  # open_clip raises RuntimeError/OSError/KeyError variously
        if pretrained and identity.fingerprint.startswith("tag:"):
            raise ModelError(
                f"could not download weights {identity.describe()} ({type(exc).__name__}); "
                "offline? download once where there is network (open_clip caches them), "
                "or pass --pretrained /path/to/checkpoint.pt") from exc
        raise ModelError(f"could not load {identity.describe()}: {exc}") from exc
    return model, preprocess


def _create_text_only(identity: ModelIdentity, device: str) -> Any:
    """open_clip's ``CLIP`` with text weights only, or None where that does not apply."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    if identity.fingerprint.startswith("tag:"):
        path = _tag_file(identity)
        if path is None or identity.pretrained == "openai":  # OpenAI's are TorchScript archives
            return None  # (and a failed download is reported by the full path)
    else:
        path = identity.pretrained
    with torch.device("meta"), _quiet_open_clip():
        model = open_clip.create_model(identity.arch, device="meta")
    if not isinstance(model, CLIP) or model.attn_mask is None:
        return None
    try:
        weights = open_clip.factory.load_state_dict(path)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from exc
    text = {k: v for k, v in weights.items() if not k.startswith("visual.")}
    model.visual = None
    try:
        model.load_state_dict(text, strict=True, assign=True)
    except RuntimeError:
        return None  # an unusual checkpoint layout: let open_clip's own loader handle it
    length = model.positional_embedding.shape[0]
    model.attn_mask = torch.full((length, length), float("-inf")).triu_(1)
    return model.to(device)


def _tag_file(identity: ModelIdentity) -> str | None:
    """The local file of a tag's weights (downloading them if needed), or None."""
    import open_clip

    from mmsearch.models.hub import cached_weights, check_download

    try:
        path = cached_weights(identity.arch, identity.pretrained)
        if path is None and check_download(identity.arch, identity.pretrained) is None:
            with _quiet_open_clip():
                cfg = open_clip.get_pretrained_cfg(identity.arch, identity.pretrained)
                path = open_clip.download_pretrained(cfg) if cfg else None
    except Exception:  # noqa: BLE001 - offline (a failed download is reported by the full path)
        return None
    return str(path) if path and Path(path).is_file() else None


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip and huggingface_hub log warnings and progress; the library stays quiet."""
    from mmsearch.models.hub import quiet_hub

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with quiet_hub():
            yield
    finally:
        root.setLevel(level)


quiet_open_clip = _quiet_open_clip  # for the trainers, which build models themselves

__all__ = ["Embedder", "TextEncoder", "encode_text_trimmed", "has_hf_text_tower", "hf_text",
           "lean_text_encoder", "load_embedder"]
