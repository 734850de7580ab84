"""Image-caption pairs to train on, and the split that holds some of them out.

Three inputs: a Karpathy JSON (``train`` + ``restval`` train, ``val`` is held out,
else ``test``), a ``.jsonl``/``.csv`` of ``image,caption`` rows, or a folder where
``photo.jpg`` has its captions in ``photo.txt`` (one per line). Without a split in
the file, a seeded fraction of the *images* is held out (never single captions, so
no held-out photo was seen in training under another caption).

Pairs reuse :class:`~mmsearch.eval.datasets.RetrievalDataset`: image paths,
captions, and the image of each caption.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mmsearch.errors import DatasetError
from mmsearch.eval.datasets import RetrievalDataset, load_karpathy
from mmsearch.ingest.discover import HEIF_EXTENSIONS, IMAGE_EXTENSIONS

DEFAULT_HOLDOUT = 0.1
TRAIN_SPLITS = ("train", "restval")
HELDOUT_SPLITS = ("val", "test")  # the first one present is held out


@dataclass(frozen=True)
class PairSplit:
    """Training pairs, held-out pairs, and how the hold-out was made (said in reports)."""

    train: RetrievalDataset
    heldout: RetrievalDataset
    how: str


def load_pairs(path: Path, images: Path | None = None, *, holdout: float = DEFAULT_HOLDOUT,
               seed: int = 0, photos_only: bool = False) -> PairSplit:
    """Read pairs from ``path`` (a Karpathy JSON, a .jsonl/.csv, or a folder) and split them.
    ``photos_only``: a folder without caption files gives its photos, with no captions."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"training data not found: {path}")
    if path.is_dir():
        pairs = _folder_pairs(path, photos_only)
        return split_by_image(pairs, holdout, seed)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _karpathy_pairs(path, images or path.parent, holdout, seed)
    if suffix in (".jsonl", ".csv"):
        rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path)
        return split_by_image(_group(path.stem, rows, images or path.parent, str(path)), holdout, seed)
    raise DatasetError(f"{path}: training data must be a Karpathy .json, a .jsonl or .csv of "
                       "image,caption rows, or a folder of photos with .txt captions")


def split_by_image(pairs: RetrievalDataset, holdout: float, seed: int) -> PairSplit:
    """Hold out a seeded ``holdout`` fraction of the images with all their captions."""
    if not 0 < holdout < 1:
        raise DatasetError(f"--holdout must be between 0 and 1, got {holdout}")
    n = pairs.n_images
    n_out = int(round(n * holdout))
    if n_out < 2 or n - n_out < 2:
        raise DatasetError(f"{n} images are too few to hold out {holdout:.0%} of them "
                           "(need at least 2 on each side)")
    order = np.random.default_rng(seed).permutation(n)
    out, keep = np.sort(order[:n_out]), np.sort(order[n_out:])
    how = f"a seeded {holdout:.0%} of the images held out (seed {seed})"
    return PairSplit(subset(pairs, keep, "train"), subset(pairs, out, "heldout"), how)


def subset(pairs: RetrievalDataset, image_ids: np.ndarray, split: str) -> RetrievalDataset:
    """The pairs of these images (in this order), every caption kept."""
    position = np.full(pairs.n_images, -1, dtype=np.int64)
    position[image_ids] = np.arange(len(image_ids))
    owners = position[pairs.caption_image]
    kept = np.flatnonzero(owners >= 0)
    return RetrievalDataset(pairs.name, split, [pairs.image_paths[i] for i in image_ids],
                            [pairs.captions[c] for c in kept], owners[kept])


def _karpathy_pairs(path: Path, images: Path, holdout: float, seed: int) -> PairSplit:
    splits = _split_counts(path)
    train = [s for s in TRAIN_SPLITS if splits.get(s)]
    held = next((s for s in HELDOUT_SPLITS if splits.get(s)), None)
    if not train or held is None:  # no usable split: hold out by image over everything
        every = [load_karpathy(path, images, split=s, max_captions_per_image=None) for s in splits]
        return split_by_image(_concat(every, "all"), holdout, seed)
    parts = [load_karpathy(path, images, split=s, max_captions_per_image=None) for s in train]
    heldout = load_karpathy(path, images, split=held)
    return PairSplit(_concat(parts, "+".join(train)), heldout,
                     f"the file's {'+'.join(train)} split trained, its {held} split held out")


def _split_counts(path: Path) -> Counter[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Counter(str(entry.get("split", "")) for entry in data["images"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: not a Karpathy caption file ({type(exc).__name__})") from exc


def _concat(parts: list[RetrievalDataset], split: str) -> RetrievalDataset:
    paths, captions, owners = [], [], []
    for part in parts:
        owners.append(part.caption_image + len(paths))
        paths += part.image_paths
        captions += part.captions
    return RetrievalDataset(parts[0].name, split, paths, captions, np.concatenate(owners))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
                yield str(row["image"]), str(row["caption"]), where
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{where}: expected {{\"image\": ..., \"caption\": ...}} "
                                   f"({type(exc).__name__})") from exc


def _csv_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: the CSV needs a header with 'image' and 'caption' columns")
        for number, row in enumerate(reader, 2):
            yield row["image"] or "", row["caption"] or "", f"{path}:{number}"


def _group(name: str, rows: Iterator[tuple[str, str, str]], root: Path,
           where: str) -> RetrievalDataset:
    """Rows of (image, caption) -> pairs; an image's rows may be anywhere in the file."""
    index: dict[Path, int] = {}
    captions, owners = [], []
    for image, caption, line in rows:
        if not image.strip() or not caption.strip():
            raise DatasetError(f"{line}: empty image or caption")
        path = (root / image).expanduser()
        if path not in index:
            if not path.is_file():
                raise DatasetError(f"{line}: image not found: {path}")
            index[path] = len(index)
        captions.append(caption.strip())
        owners.append(index[path])
    if not index:
        raise DatasetError(f"{where}: no image-caption rows")
    return RetrievalDataset(name, "all", list(index), captions, np.asarray(owners, dtype=np.int64))


def _folder_pairs(folder: Path, photos_only: bool = False) -> RetrievalDataset:
    """``photo.jpg`` + ``photo.txt`` (one caption per non-empty line), anywhere under ``folder``;
    with ``photos_only``, a folder with no caption file gives every photo and no captions."""
    photos = [p for p in sorted(folder.rglob("*"))
              if p.suffix.lower() in IMAGE_EXTENSIONS | HEIF_EXTENSIONS and p.is_file()]
    if photos_only and not any(p.with_suffix(".txt").is_file() for p in photos):
        if not photos:
            raise DatasetError(f"{folder}: no photos")
        return RetrievalDataset(folder.name, "all", photos, [], np.zeros(0, dtype=np.int64))

    def rows() -> Iterator[tuple[str, str, str]]:
        for image in photos:
            text = image.with_suffix(".txt")
            if text.is_file():
                for line in text.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        yield str(image.relative_to(folder)), line, str(text)
    return _group(folder.name, rows(), folder, f"{folder} (no photo with a .txt caption file)")
