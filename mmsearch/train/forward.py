"""Model calls used while training: texts and images to normalised features, and the
held-out Recall@K of a model state (the ``eval`` command's 5-captions protocol)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.eval.metrics import recalls_from_similarity

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder

KS = (1, 5, 10)
EVAL_BATCH = 256


@dataclass(frozen=True)
class Recalls:
    """Recall@1/5/10 in percent, both directions."""

    text_to_image: dict[int, float]
    image_to_text: dict[int, float]

    @property
    def r1(self) -> float:
        """Mean of the two R@1."""
        return (self.text_to_image[1] + self.image_to_text[1]) / 2

    @property
    def rsum(self) -> float:
        """The six R@1/5/10 summed."""
        return sum(self.text_to_image.values()) + sum(self.image_to_text.values())

    def score(self) -> dict[str, float]:
        """The held-out score that picks the step, the WiSE alpha and says "improved": the
        rsum (the checkpoint criterion of VSE++ and SCAN: on a split of a few dozen photos
        R@1 alone moves by whole photos), ties broken by the mean R@1."""
        return {"rsum": self.rsum, "r1": self.r1}

    def to_dict(self) -> dict[str, dict[int, float]]:
        return {"text_to_image": dict(self.text_to_image), "image_to_text": dict(self.image_to_text)}


def recalls(image_vectors: np.ndarray, text_vectors: np.ndarray, pairs: RetrievalDataset) -> Recalls:
    t2i, i2t = recalls_from_similarity(text_vectors @ image_vectors.T, pairs.caption_image, KS)
    return Recalls(t2i, i2t)


def text_features(model: Any, tokens: "torch.Tensor") -> "torch.Tensor":
    """Normalised text features (with gradients if enabled), padding after the longest cut."""
    import torch.nn.functional as F

    from mmsearch.models.openclip import encode_text_trimmed

    with autocast(model):
        features = encode_text_trimmed(model, tokens.to(_device(model)))
    return F.normalize(features.float(), dim=-1)


def image_features(model: Any, embedder: "Embedder", inputs: Sequence[Any]) -> "torch.Tensor":
    """Normalised image features of decoded inputs (with gradients if enabled)."""
    import torch.nn.functional as F

    batch = embedder.collate(list(inputs)).to(_device(model))
    with autocast(model):
        features = model.encode_image(batch)
    return F.normalize(features.float(), dim=-1)


def autocast(model: Any) -> Any:
    """bf16 mixed precision on CUDA (no loss scaling needed), plain fp32 on the CPU."""
    import contextlib

    import torch

    if _device(model).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embed_texts(model: Any, tokens: "torch.Tensor") -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([text_features(model, tokens[i:i + EVAL_BATCH]).cpu().numpy()
                               for i in range(0, len(tokens), EVAL_BATCH)])


def embed_images(model: Any, embedder: "Embedder", inputs: Sequence[Any]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([image_features(model, embedder, inputs[i:i + 64]).cpu().numpy()
                               for i in range(0, len(inputs), 64)])


def _device(model: Any) -> "torch.device":
    return next(model.parameters()).device
