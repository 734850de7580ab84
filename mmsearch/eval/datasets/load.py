"""One entry point for every layout: :func:`load_dataset` picks the loader from the path.

A ``.json`` file is Karpathy's format (an object) or video captions (an array of objects),
a ``.csv`` file video captions, a folder holding ``MSRVTT_JSFUSION_{split}.csv`` MSR-VTT's,
a folder holding ``{split}_texts.jsonl`` Chinese-CLIP's, and a folder holding
``test_image_names.txt`` XTD10.
Whether the images folder is required, and which splits exist, is decided
here; a path in none of the layouts is a :class:`UsageError` that lists them
(with a hint when the path is close to one).
"""

from __future__ import annotations

from pathlib import Path

from mmsearch.errors import DatasetError, UsageError
from mmsearch.eval.datasets.base import RetrievalDataset
from mmsearch.eval.datasets.chinese import load_chinese_clip
from mmsearch.eval.datasets.karpathy import load_karpathy
from mmsearch.eval.datasets.msrvtt import find_jsfusion, is_caption_list, load_msrvtt
from mmsearch.eval.datasets.xtd import load_xtd10


#: The layouts :func:`load_dataset` recognises, for its error message.
_FORMATS = (
    "a Karpathy split .json file (needs images)",
    "a Chinese-CLIP folder with {split}_texts.jsonl (images from a folder or {split}_imgs.tsv)",
    "an XTD10 folder with test_image_names.txt and test_1kcaptions_<lang>.txt (needs images)",
    "an MSR-VTT folder with MSRVTT_JSFUSION_{split}.csv or msrvtt_data/MSRVTT_JSFUSION_{split}.csv "
    "(videos in videos/all, videos or --videos)",
    "a .csv or a .json array of video_id,caption rows (videos in videos/all, videos, beside "
    "it or --videos)",
)


def _need_images(images: Path | None, layout: str) -> Path:
    """``images``, which ``layout`` cannot do without."""
    if images is None:
        raise UsageError(f"{layout} needs an images folder")
    return Path(images)


def _unrecognised(path: Path, split: str) -> UsageError:
    """The error for a path in none of the known layouts, with a hint where one helps."""
    formats = "; ".join(f.replace("{split}", split) for f in _FORMATS)
    hint = ""
    if path.is_dir():
        splits = sorted(p.name[: -len("_texts.jsonl")] for p in path.glob("*_texts.jsonl"))
        if splits:
            hint = f" (Chinese-CLIP splits present: {', '.join(splits)})"
    elif path.name.endswith("_texts.jsonl"):
        hint = " (for Chinese-CLIP, pass the folder holding this file)"
    return UsageError(f"{path}: unrecognised dataset layout{hint}; expected {formats}")


def load_dataset(
    path: Path,
    images: Path | None,
    split: str = "test",
    name: str | None = None,
    language: str = "zh",
) -> RetrievalDataset:
    """Load a retrieval dataset, choosing the loader from what ``path`` is.

    * a ``.json`` file holding an object: :func:`load_karpathy` (``images`` required);
    * a folder holding ``{split}_texts.jsonl``: :func:`load_chinese_clip`
      (``images`` optional: ``None`` reads ``{split}_imgs.tsv``);
    * a folder holding ``test_image_names.txt``: :func:`load_xtd10` with
      ``language`` (``images`` required; only split ``"test"`` exists);
    * a ``.csv`` file, a ``.json`` file holding an array of objects, or a folder holding
      ``MSRVTT_JSFUSION_{split}.csv`` (at its top or in ``msrvtt_data/``): the videos of
      :func:`load_msrvtt` (``images`` is the videos folder; optional).

    ``language`` is used by XTD10 only.

    Raises:
        DatasetError: ``path`` does not exist, or the chosen loader's errors.
        UsageError: ``path`` is in none of the layouts (the message lists
            them), ``images`` is missing where required, or a split other than
            ``"test"`` is asked of XTD10.
    """
    path = Path(path)
    if not path.exists() and path.suffix.lower() != ".json":
        raise DatasetError(f"dataset path not found: {path}")
    suffix = path.suffix.lower()
    if path.is_file() and (suffix == ".csv" or (suffix == ".json" and is_caption_list(path))):
        return load_msrvtt(path, images, split=split, name=name)
    if path.is_dir() and (jsfusion := find_jsfusion(path, split)) is not None:
        return load_msrvtt(jsfusion, images, split=split, name=name)
    if path.suffix.lower() == ".json" and not path.is_dir():
        json_images = _need_images(images, "a Karpathy JSON file")
        return load_karpathy(path, json_images, split=split, name=name)
    if path.is_dir() and (path / f"{split}_texts.jsonl").is_file():
        return load_chinese_clip(path, images, split=split, name=name)
    if path.is_dir() and (path / "test_image_names.txt").is_file():
        if split != "test":
            raise UsageError(f"XTD10 has only a 'test' split, got {split!r}")
        return load_xtd10(path, _need_images(images, "XTD10"), language=language, name=name)
    raise _unrecognised(path, split)
