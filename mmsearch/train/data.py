"""One split ready for training: its captions tokenised, and each photo either as a fixed
vector (image tower frozen) or as a decoded model input (image tower training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.progress import Progress, no_progress
from mmsearch.train.forward import Recalls, embed_images, embed_texts, recalls
from mmsearch.train.images import base_vectors, decoded_inputs, keep_images

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store


@dataclass
class TrainSet:
    pairs: RetrievalDataset
    tokens: "torch.Tensor"
    vectors: "torch.Tensor | None" = None  # (n_images, D), fixed
    inputs: list[Any] | None = None  # decoded model inputs, when the image tower trains
    unreadable: list[str] = field(default_factory=list)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.pairs.n_images // batch_size)

    def batches(self, options: Any, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image ids, caption ids) per step: every photo once, one random caption each;
        a last partial batch is dropped unless it is the only one."""
        rng = np.random.default_rng([options.seed, epoch])
        order = rng.permutation(self.pairs.n_images)
        size = min(options.batch_size, len(order))
        for start in range(0, len(order) - size + 1, size):
            images = order[start:start + size]
            if not self.pairs.n_captions:  # photos only (distillation without captions)
                yield images, np.full(len(images), -1)
                continue
            captions = np.asarray([rng.choice(self.pairs.image_captions(int(i))) for i in images])
            yield images, captions

    def evaluate(self, model: Any, embedder: "Embedder") -> Recalls:
        texts = embed_texts(model, self.tokens)
        if self.vectors is not None:
            images = self.vectors.numpy()
        else:
            assert self.inputs is not None
            images = embed_images(model, embedder, self.inputs)
        return recalls(images, texts, self.pairs)


def prepare_set(embedder: "Embedder", pairs: RetrievalDataset, image_trains: bool, *,
                store: "Store | None" = None, progress: Progress = no_progress) -> TrainSet:
    """Decode or look up every photo of ``pairs`` (dropping unreadable ones) and tokenise."""
    import torch

    paths = list(pairs.image_paths)
    if image_trains:
        inputs, bad = decoded_inputs(embedder, paths, progress=progress)
        kept = np.asarray([i for i, x in enumerate(inputs) if x is not None], dtype=np.int64)
        vectors, inputs = None, [inputs[i] for i in kept]
    else:
        found, kept, bad = base_vectors(embedder, paths, store=store, progress=progress)
        vectors, inputs = torch.from_numpy(found), None
    if len(kept) < len(paths):
        pairs = keep_images(pairs, kept)
    notes = [note] if (note := bad.describe()) else []
    tokens = embedder.tokenize(pairs.captions) if pairs.n_captions else torch.zeros(0, 1)
    return TrainSet(pairs, tokens, vectors, inputs, notes)
