"""The standard retrieval benchmark splits and their published sizes.

:data:`KNOWN_DATASETS` holds, per benchmark (COCO 5k, Flickr30K 1k, Flickr8k
1k test, MSR-VTT 1k-A test), the split, image (or video) count, caption count and
captions per image that papers report.  :func:`resolve_known` finds one by name or alias, and
:func:`check_expected` compares a loaded :class:`RetrievalDataset` with it, so
a run can say whether its figures are comparable with published ones.  Nothing
here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.eval.datasets.base import RetrievalDataset


@dataclass(frozen=True)
class KnownDataset:
    """Expected size of a standard retrieval benchmark split."""

    name: str
    description: str
    split: str
    n_images: int
    n_captions: int
    captions_per_image: int
    item: str = "image"  # what a caption describes: "image" or "video"


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "coco": KnownDataset(
        name="coco",
        description="MS-COCO Karpathy 5k test split",
        split="test",
        n_images=5000,
        n_captions=25000,
        captions_per_image=5,
    ),
    "flickr30k": KnownDataset(
        name="flickr30k",
        description="Flickr30K Karpathy 1k test split",
        split="test",
        n_images=1000,
        n_captions=5000,
        captions_per_image=5,
    ),
    "flickr8k": KnownDataset(
        name="flickr8k",
        description="Flickr8k Karpathy 1k test split",
        split="test",
        n_images=1000,
        n_captions=5000,
        captions_per_image=5,
    ),
    "msrvtt": KnownDataset(
        name="msrvtt",
        description="MSR-VTT 1k-A (JSFusion) test split",
        split="test",
        n_images=1000,
        n_captions=1000,
        captions_per_image=1,
        item="video",
    ),
}

#: Other spellings accepted by :func:`check_expected`.
_ALIASES = {"mscoco": "coco", "mscoco_captions": "coco", "coco5k": "coco", "f30k": "flickr30k",
            "msr-vtt": "msrvtt", "msrvtt-1ka": "msrvtt", "msrvtt1ka": "msrvtt"}


def resolve_known(dataset_name: str) -> KnownDataset:
    """The :class:`KnownDataset` for a (case-insensitive) name or alias.

    Raises:
        UsageError: the name is not a known benchmark.
    """
    key = dataset_name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in KNOWN_DATASETS:
        raise UsageError(
            f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(KNOWN_DATASETS))}"
        )
    return KNOWN_DATASETS[key]


def check_expected(ds: RetrievalDataset, dataset_name: str) -> list[str]:
    """Compare ``ds`` with the published size of ``dataset_name``'s split.

    Returns one human-readable warning per difference (split, image count,
    caption count, captions per image); an empty list means the loaded data
    matches the benchmark, so the numbers computed on it are comparable with
    papers.  Nothing is printed: the caller decides whether a warning is
    shown or fatal.

    Raises:
        UsageError: ``dataset_name`` is not in :data:`KNOWN_DATASETS`.
    """
    known = resolve_known(dataset_name)
    label = f"{known.name} ({known.description})"
    warnings: list[str] = []
    if ds.split != known.split:
        warnings.append(f"{label} is the {known.split!r} split, but {ds.split!r} was loaded")
    if ds.n_images != known.n_images:
        warnings.append(f"{label} has {known.n_images} {known.item}s, loaded {ds.n_images}")
    if ds.n_captions != known.n_captions:
        warnings.append(f"{label} has {known.n_captions} captions, loaded {ds.n_captions}")
    per_image = np.bincount(ds.caption_image, minlength=ds.n_images)
    off = int(np.count_nonzero(per_image != known.captions_per_image))
    if off:
        warnings.append(
            f"{label} has {known.captions_per_image} captions per {known.item}, "
            f"{off} loaded {known.item}s have another count (min {int(per_image.min())}, "
            f"max {int(per_image.max())})"
        )
    return warnings
