"""The Chinese-CLIP backend (OFA-Sys) through Hugging Face ``transformers``.

:func:`load_chinese_clip` turns a :class:`ModelIdentity` whose ``pretrained`` is a
local directory in Hugging Face layout (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``, ``vocab.txt``, ``preprocessor_config.json``) or a hub id
already in the local Hugging Face cache into a :class:`ChineseClipEmbedder`, with
the same duck-typed interface as :class:`mmsearch.models.openclip.Embedder`.
Nothing is ever downloaded. Vectors are float32 and L2-normalised.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from mmsearch.errors import ModelError
from mmsearch.models.device import resolve_device
from mmsearch.models.identity import ModelIdentity
from mmsearch.models.openclip import TextEncoder

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

    from mmsearch.models.hftext import HFText

BACKEND = "chinese_clip"
TEXT_LENGTH = 52  # Chinese-CLIP's context length (its BERT allows 512 positions)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ChineseClipEmbedder(TextEncoder):
    """A loaded ``ChineseCLIPModel``: ``prepare``/``collate``/``encode_images`` and ``encode_texts``."""

    has_image_tower = True

    def __init__(self, identity: ModelIdentity, model: Any, tokenizer: Any,
                 image_processor: Any, device: str, model_dir: Path) -> None:
        import torch

        super().__init__(identity, device)
        self._model = model
        self._tokenizer = tokenizer
        self.model_dir = model_dir
        self.image_size: int = int(model.config.vision_config.image_size)
        self._resize, self._crop, self._resample = _pil_steps(image_processor)
        mean, std = _norm_stats(image_processor)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        limits = (TEXT_LENGTH, int(model.config.text_config.max_position_embeddings),
                  int(getattr(tokenizer, "model_max_length", TEXT_LENGTH) or TEXT_LENGTH))
        self.max_text_length: int = min(limits)
        self.runtime: Any = None  # models.onnxtower.ImageRuntime; None: torch

    @property
    def image_precision(self) -> str:
        """``int8`` when the int8 ONNX tower embeds the images, else ``fp32``."""
        from mmsearch.models.onnxtower import precision

        return precision(self.runtime.runtime if self.runtime is not None else "torch")

    @property
    def image_tower(self) -> Any:
        """The vision tower and its projection as an ``nn.Module`` with ``encode_image``
        (what :mod:`.onnxtower` exports)."""
        return _image_tower(self._model)

    @property
    def embed_dim(self) -> int:
        """The vector size (the model's projection dimension)."""
        return int(self._model.config.projection_dim)

    @property
    def weights_path(self) -> str | None:
        """The weights file in the model directory (None if it holds none we know)."""
        return next((str(self.model_dir / n) for n in WEIGHT_FILES if (self.model_dir / n).is_file()),
                    None)

    def prepare(self, image: "Image.Image") -> "np.ndarray":
        """One RGB image -> the processor's resize and centre crop, as a uint8 HxWx3 array
        (the PIL backend's arithmetic: same sizes, same PIL resampling, same crop offsets)."""
        import numpy as np

        if self._resize is not None:
            size = self._resize(image.height, image.width)
            if size != (image.height, image.width):
                image = image.resize((size[1], size[0]), resample=self._resample)
        arr = np.asarray(image, dtype=np.uint8)
        if self._crop is not None:
            arr = _center_crop(arr, *self._crop)
        return arr

    def collate(self, items: Sequence["np.ndarray"]) -> "torch.Tensor":
        """Stack :meth:`prepare` outputs into a normalised float (N, 3, H, W) batch."""
        import numpy as np
        import torch

        batch = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float().mul_(self._scale)
        return batch.sub_(self._mean).div_(self._std).contiguous()

    def _autocast(self) -> Any:
        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def encode_images(self, batch: "torch.Tensor") -> "np.ndarray":
        """Embed a :meth:`collate` batch; returns (N, D) float32, L2-normalised."""
        import torch

        with torch.inference_mode(), self._autocast():
            if self.runtime is not None and self.runtime.run is not None:  # ONNX Runtime
                feats = torch.from_numpy(self.runtime.run(batch))
            else:
                pixels = batch.to(self.device, non_blocking=True)
                feats = _features(self._model.get_image_features(pixel_values=pixels))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    def _encode_uncached(self, texts: list[str]) -> "np.ndarray":
        import torch

        tokens = self._tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.max_text_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        with torch.inference_mode(), self._autocast():
            feats = _features(self._model.get_text_features(**tokens))
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()


def _image_tower(model: Any) -> Any:
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
            return _features(self.model.get_image_features(pixel_values=pixels))

    return ImageTower()


def hf_text(identity: ModelIdentity) -> "HFText":
    """The text tower of ``identity`` as :mod:`.onnxtext` exports it: BERT, the first
    token's state, the projection (loads the model with torch, on the CPU)."""
    from mmsearch.models.hftext import HFText

    embedder = load_chinese_clip(identity, "cpu")
    model = embedder._model

    def forward(input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
        out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _features(out)

    return HFText(model, forward, embedder._tokenizer, embedder.max_text_length,
                  embedder.encode_texts)


def _features(out: Any) -> "torch.Tensor":
    """The projected embeddings: transformers 4.x returns a tensor, 5.x an output's ``pooler_output``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[1]
    return out.pooler_output


def _size_dict(size: Any) -> dict[str, int]:
    """A processor ``size``/``crop_size`` (dict, SizeDict, int or None) as a plain dict."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: int(v) for k, v in items if v is not None}


def _pil_steps(proc: Any) -> tuple[Any, tuple[int, int] | None, int]:
    """(target (h, w) from input (h, w) or None, crop (h, w) or None, PIL resample) of ``proc``."""
    size, crop = _size_dict(proc.size), _size_dict(getattr(proc, "crop_size", None))
    resize = None
    if proc.do_resize:
        if "shortest_edge" in size and "longest_edge" not in size:
            edge = size["shortest_edge"]
            resize = lambda h, w: _shortest_edge(h, w, edge)  # noqa: E731
        elif "height" in size and "width" in size:
            resize = lambda h, w: (size["height"], size["width"])  # noqa: E731
        else:
            raise ModelError(f"unsupported image processor size {size} in the model's preprocessor_config.json")
    crop_hw = (crop["height"], crop["width"]) if proc.do_center_crop and crop else None
    resample = 3 if proc.resample is None else int(getattr(proc.resample, "value", proc.resample))
    return resize, crop_hw, resample


def _shortest_edge(height: int, width: int, edge: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(..., default_to_square=False)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(arr: "np.ndarray", height: int, width: int) -> "np.ndarray":
    """transformers' ``center_crop`` (offsets ``(orig - crop) // 2``, zero padding if too small)."""
    import numpy as np

    h, w = arr.shape[:2]
    if h < height or w < width:  # pad to at least the crop, centred, as transformers does
        ph, pw = max(height - h, 0), max(width - w, 0)
        top, left = (ph + 1) // 2, (pw + 1) // 2
        arr = np.pad(arr, ((top, ph - top), (left, pw - left), (0, 0)))
        h, w = arr.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(arr[top:top + height, left:left + width])


def _norm_stats(proc: Any) -> tuple[list[float], list[float]]:
    """The processor's (mean, std), or the identity normalisation when it does not normalise."""
    if not proc.do_normalize:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    mean, std = proc.image_mean, proc.image_std
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    return mean, std


def model_dir(pretrained: str) -> Path:
    """The local directory of ``pretrained``: itself, or a hub id's snapshot in the local cache.

    Never touches the network; raises :class:`ModelError` in one line otherwise.
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path.resolve()
    if not _HUB_ID.match(pretrained) or pretrained.startswith((".", "~")):
        raise ModelError(f"Chinese-CLIP model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download

        with _quiet_transformers():
            found = snapshot_download(pretrained, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, HFValidationError, ...
        raise ModelError(
            f"{pretrained} is not in the local Hugging Face cache and mmsearch does not download "
            f"it; download it once where there is network (`hf download {pretrained}`), "
            "or pass a local model directory") from exc
    return Path(found)


def load_chinese_clip(identity: ModelIdentity, device: str = "auto") -> ChineseClipEmbedder:
    """Load ``identity.pretrained`` (a local directory or a cached hub id) onto ``device``, offline."""
    import torch
    from transformers import AutoTokenizer, ChineseCLIPImageProcessor, ChineseCLIPModel

    if identity.backend != BACKEND:
        raise ModelError(f"{identity.describe()} is not a {BACKEND} model")
    folder = model_dir(identity.pretrained)
    dev = resolve_device(device)
    try:
        with _quiet_transformers():
            model = ChineseCLIPModel.from_pretrained(str(folder), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            processor = ChineseCLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, safetensors errors...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"could not load Chinese-CLIP from {folder}: {type(exc).__name__}: {first}") from exc
    model = model.to(device=dev, dtype=torch.float32).eval()
    return ChineseClipEmbedder(identity, model, tokenizer, processor, dev, folder)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers and huggingface_hub log, warn and draw progress bars; the library stays quiet."""
    from transformers.utils import logging as hf_logging

    from mmsearch.models.hub import quiet_hub

    logger = logging.getLogger("transformers")
    level, verbosity = logger.level, hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with quiet_hub(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["BACKEND", "ChineseClipEmbedder", "hf_text", "load_chinese_clip", "model_dir"]
