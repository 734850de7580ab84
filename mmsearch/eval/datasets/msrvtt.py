"""MSR-VTT-style video-text retrieval: a folder of videos and rows of (video id, caption).

MSR-VTT's 1k-A test split ("JSFusion", Yu et al. 2018), the split zero-shot video retrieval
is reported on, is distributed as ``msrvtt_data/MSRVTT_JSFUSION_test.csv`` (columns
``key,vid_key,video_id,sentence``; 1,000 rows, one caption per video) beside MSR-VTT's
videos (``videos/all/video7010.mp4``...). :func:`load_msrvtt` reads that CSV, any CSV whose
header names ``video_id`` and ``caption`` (or ``sentence``), and a JSON array of
``{"video_id": ..., "caption": ...}`` objects. A video may have several captions (rows with
the same id). Video ``v`` is the file ``<v>.<ext>`` in the videos folder, ``<ext>`` any
video extension the indexer reads. Videos keep the order of their first row, captions the
order of the rows. Pure Python + numpy.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import DatasetError
from mmsearch.eval.datasets.base import RetrievalDataset, json_type_name, short_repr, some_names
from mmsearch.ingest.discover import VIDEO_EXTENSIONS, is_video

#: The 1k-A test split's caption file, as CLIP4Clip's ``msrvtt_data.zip`` names it.
JSFUSION = "MSRVTT_JSFUSION_{split}.csv"
#: Where a dataset folder keeps that file: at its top, or in ``msrvtt_data/``.
JSFUSION_PLACES = (".", "msrvtt_data")
#: Where a dataset folder keeps its videos, first found wins (MSR-VTT's zip: ``videos/all``).
VIDEO_FOLDERS = ("videos/all", "videos", ".")
#: The column (CSV) or key (JSON) holding a caption, first present wins.
CAPTION_KEYS = ("caption", "sentence")


@dataclass(frozen=True, eq=False)
class VideoRetrievalDataset(RetrievalDataset):
    """A video-text split: ``image_paths`` are the video files, ``caption_image`` maps each
    caption to its video. Evaluated by mean-pooling each video's frames
    (:mod:`mmsearch.eval.video`)."""


def find_jsfusion(folder: Path, split: str) -> Path | None:
    """The JSFusion caption file of ``split`` in a dataset folder, or None."""
    for place in JSFUSION_PLACES:
        path = Path(folder) / place / JSFUSION.format(split=split)
        if path.is_file():
            return path
    return None


def is_caption_list(path: Path) -> bool:
    """Whether a ``.json`` file's top level is an array of objects (video captions), not an
    object (Karpathy's format); reads its first bytes only."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return re.match(rb"(\xef\xbb\xbf)?\s*\[\s*\{", head) is not None


def load_msrvtt(captions: Path, videos: Path | None = None, *, split: str = "test",
                name: str | None = None) -> VideoRetrievalDataset:
    """Read ``captions`` (a ``.csv`` or a ``.json`` array) and find each video in ``videos``.

    ``videos`` None: the first of :data:`VIDEO_FOLDERS` under the captions' dataset folder
    (the folder holding ``msrvtt_data/``, else the file's own). ``name`` defaults to
    ``"msrvtt"`` for the JSFusion file, else the file's stem; ``split`` is a label.

    Raises:
        DatasetError: the file or videos folder is missing, a row or the structure is wrong
            (the message names it), the file has no rows, a video file is missing (the
            message names the first few) or two files share a video's name.
    """
    captions = Path(captions)
    rows = _read_rows(captions)
    folder = Path(videos) if videos is not None else default_videos(_dataset_folder(captions))
    index: dict[str, int] = {}
    owners = [index.setdefault(video_id, len(index)) for video_id, _ in rows]
    return VideoRetrievalDataset(
        name=name or _default_name(captions), split=split,
        image_paths=_video_files(folder, list(index)), captions=[text for _, text in rows],
        caption_image=np.asarray(owners, dtype=np.int64))


def default_videos(folder: Path) -> Path:
    """The first of :data:`VIDEO_FOLDERS` under ``folder`` that is a folder."""
    for place in VIDEO_FOLDERS:
        if (folder / place).is_dir():
            return folder / place
    return folder


def _dataset_folder(captions: Path) -> Path:
    parent = captions.parent
    return parent.parent if parent.name in JSFUSION_PLACES[1:] else parent


def _default_name(captions: Path) -> str:
    if captions.name.lower().startswith(JSFUSION.split("{")[0].lower()):
        return "msrvtt"
    return captions.stem


def _read_rows(path: Path) -> list[tuple[str, str]]:
    """(video id, caption) rows of a ``.csv`` or ``.json`` file, in file order."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise DatasetError(f"captions file {what}: {path}")
    reader = _json_rows if path.suffix.lower() == ".json" else _csv_rows
    try:
        rows = reader(path)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not rows:
        raise DatasetError(f"{path}: no captions (the dataset is empty)")
    return rows


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            text_key = _caption_key(columns, f"{path}: the header", "column")
            if "video_id" not in columns:
                raise DatasetError(f"{path}: the header has no 'video_id' column "
                                   f"(columns: {', '.join(columns) or 'none'})")
            return [_row(r.get("video_id"), r.get(text_key), f"{path}:{reader.line_num}")
                    for r in reader]
        except csv.Error as exc:
            raise DatasetError(f"{path}: not valid CSV: {exc}") from exc


def _json_rows(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, "
                           f"column {exc.colno})") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path}: top level must be an array of "
                           f"{{\"video_id\", \"caption\"}} objects, got {json_type_name(data)}")
    return [_json_row(entry, f"{path}: [{i}]") for i, entry in enumerate(data)]


def _json_row(entry: Any, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where} must be an object, got {json_type_name(entry)}")
    return _row(entry.get("video_id"), entry.get(_caption_key(list(entry), where, "key")), where)


def _caption_key(keys: list[str], where: str, kind: str) -> str:
    for key in CAPTION_KEYS:
        if key in keys:
            return key
    raise DatasetError(f"{where} has no {' or '.join(map(repr, CAPTION_KEYS))} {kind}")


def _row(video_id: Any, text: Any, where: str) -> tuple[str, str]:
    """One checked (video id, caption) pair; ids may be JSON numbers."""
    if isinstance(video_id, int) and not isinstance(video_id, bool):
        video_id = str(video_id)
    if not isinstance(video_id, str) or not video_id.strip():
        raise DatasetError(f"{where}: video_id must be a non-empty string, "
                           f"got {short_repr(video_id)}")
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: the caption must be a non-empty string, "
                           f"got {short_repr(text)}")
    return video_id.strip(), text.strip()


def _video_files(folder: Path, ids: list[str]) -> list[Path]:
    """``<id>.<ext>`` in ``folder`` for every id, in order (one listing of the folder)."""
    by_stem = _videos_by_stem(folder)
    missing = [i for i in ids if i not in by_stem]
    if missing:
        exts = ", ".join(sorted(VIDEO_EXTENSIONS))
        raise DatasetError(f"{len(missing)} of {len(ids)} videos missing under {folder}: "
                           f"{some_names(missing)} (looked for <video_id>.<ext>, "
                           f"ext one of {exts})")
    twice = [i for i in ids if len(by_stem[i]) > 1]
    if twice:
        names = ", ".join(sorted(p.name for p in by_stem[twice[0]]))
        raise DatasetError(f"video {twice[0]} has {len(by_stem[twice[0]])} files in {folder}: "
                           f"{names}; keep one")
    return [by_stem[i][0] for i in ids]


def _videos_by_stem(folder: Path) -> dict[str, list[Path]]:
    """The video files directly in ``folder``, by name without extension."""
    if not folder.is_dir():
        raise DatasetError(f"videos folder not found: {folder}")
    by_stem: dict[str, list[Path]] = {}
    try:
        for path in folder.iterdir():
            if is_video(path):
                by_stem.setdefault(path.stem, []).append(path)
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot list: {exc.strerror or exc}") from exc
    return by_stem
