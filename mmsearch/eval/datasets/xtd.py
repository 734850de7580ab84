"""XTD10 (Aggarwal & Kale 2020): 1,000 COCO images captioned in ten languages.

The set is two line-aligned text files, ``test_image_names.txt`` (one image
file name per line) and ``test_1kcaptions_<lang>.txt`` (one caption per line:
caption ``i`` describes image ``i``), plus the COCO images themselves in a
folder.  :func:`load_xtd10` reads one language into a
:class:`RetrievalDataset`; a missing language's error lists the ones present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmsearch.errors import DatasetError
from mmsearch.eval.datasets.base import (RetrievalDataset, check_image_files, check_plain_name,
                                         iter_lines)


def _read_lines(path: Path, what: str) -> list[str]:
    """Stripped lines of an XTD10 file; blank lines are errors, except trailing ones."""
    lines = [(lineno, line.strip()) for lineno, line in iter_lines(path)]
    while lines and not lines[-1][1]:
        lines.pop()
    for lineno, line in lines:
        if not line:
            raise DatasetError(f"{path}:{lineno}: empty {what} line")
    return [line for _, line in lines]


def _languages(root: Path) -> str:
    """``"de, en, zh"``: the caption languages present in an XTD10 folder."""
    prefix, suffix = "test_1kcaptions_", ".txt"
    found = sorted(p.name[len(prefix) : -len(suffix)] for p in root.glob(f"{prefix}*{suffix}"))
    return ", ".join(found) or "none"


def load_xtd10(
    root: Path, images: Path, language: str = "zh", name: str | None = None
) -> RetrievalDataset:
    """Load XTD10 (Aggarwal & Kale 2020): 1,000 COCO images captioned in ten languages.

    ``{root}/test_image_names.txt`` lists one image file name per line and
    ``{root}/test_1kcaptions_{language}.txt`` one caption per line, aligned:
    caption ``i`` describes image ``i``.  Image ``i`` is ``images / name``.
    Images keep file order; a name listed twice is one image with both
    captions.  Split is ``"test"``; name defaults to ``"xtd10-<language>"``.

    Raises:
        DatasetError: a file is missing (the message lists the languages
            present), a line is blank, the two files' line counts differ, the
            files are empty, or image files are missing.
        UsageError: ``language`` is not a plain name.
    """
    check_plain_name(language, "language")
    root, images = Path(root), Path(images)
    names_path = root / "test_image_names.txt"
    captions_path = root / f"test_1kcaptions_{language}.txt"
    if names_path.is_file() and not captions_path.is_file():
        raise DatasetError(
            f"dataset file not found: {captions_path} "
            f"(languages present: {_languages(root)})"
        )
    names = _read_lines(names_path, "image name")
    captions = _read_lines(captions_path, "caption")
    if len(names) != len(captions):
        raise DatasetError(
            f"{names_path.name} has {len(names)} lines but "
            f"{captions_path.name} has {len(captions)}; "
            f"caption i must describe image i"
        )
    if not names:
        raise DatasetError(f"{names_path}: no image names (the dataset is empty)")
    index: dict[str, int] = {}
    owners = [index.setdefault(n, len(index)) for n in names]
    image_paths = [images / n for n in index]
    check_image_files(image_paths, images)
    return RetrievalDataset(
        name=name or f"xtd10-{language}",
        split="test",
        image_paths=image_paths,
        captions=captions,
        caption_image=np.asarray(owners, dtype=np.int64),
    )
