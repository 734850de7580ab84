"""Settings, resolved once (flags > environment > defaults) and passed down.

Nothing here is global state: :func:`resolve` returns a frozen :class:`Settings`
that the CLI builds from its flags and the library receives as an argument.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from mmsearch.errors import UsageError

DEFAULT_INDEX = "default"
_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_home() -> Path:
    """Where indexes live when neither --home nor MMSEARCH_HOME says otherwise."""
    env = os.environ.get("MMSEARCH_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "mmsearch"


DECODERS = ("auto", "threads", "processes", "nvjpeg")
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")  # who runs the image tower (models/onnxtower.py)

# The defaults of a run, declared here only: Settings, the shells' flags and the library's
# keywords all read these names.
DEVICE = "auto"
BATCH_SIZE = 32
WORKERS = 0
DRAFT = True
DEDUP_THRESHOLD = 0.95
VIDEO_FPS = 1.0         # frames sampled per second of video (plus the first of each shot)
MAX_VIDEO_FPS = 30.0


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, fixed before any work starts.

    ``model``/``pretrained`` of ``None`` mean "what the index was built with",
    or the registry default for a new index.
    """

    home: Path
    index: str = DEFAULT_INDEX
    model: str | None = None
    pretrained: str | None = None
    device: str = DEVICE          # "auto" -> cuda when available, else cpu
    batch_size: int = BATCH_SIZE
    workers: int = WORKERS        # decode threads; 0 -> chosen from the core count
    draft: bool = DRAFT           # JPEG reduced-size DCT decoding before the resize
    decoder: str = "auto"         # threads | processes | nvjpeg | auto (see ingest/embed.py)
    index_type: str | None = None  # None: keep the index's; "auto", "flat", "hnsw", "ivf",
                                   # "ivfsq", "ivfpq" or a FAISS factory string
    dedup_threshold: float = DEDUP_THRESHOLD  # cosine at or above which photos are near-duplicates
    runtime: str = "auto"         # image tower: auto | torch | onnx | onnx-int8 (models/onnxtower.py)
    video_fps: float = VIDEO_FPS  # frames sampled per second of video (ingest/videos.py)

    @property
    def index_dir(self) -> Path:
        return self.home / self.index

    def with_(self, **changes: object) -> "Settings":
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainingDefaults:
    """The default recipe of ``mmsearch finetune`` / ``distill``: their options dataclasses
    and flags read it from here. A run lasts at least ``min_steps`` optimizer steps, in
    whole epochs, unless --steps or --epochs says otherwise; the held-out split is measured
    ``evaluations`` times over the run, and it stops after ``patience`` measurements
    without a better score (see mmsearch/train/schedule.py)."""

    lr: float
    weight_decay: float
    warmup: float  # fraction of the planned steps: linear warm-up, then cosine to 0
    batch_size: int
    min_steps: int = 500
    evaluations: int = 20
    patience: int = 5


# a real CLIP's text tower forgets quickly above ~1e-5; a new student tower needs more
FINETUNE_DEFAULTS = TrainingDefaults(lr=1e-5, weight_decay=0.1, warmup=0.05, batch_size=128)
DISTILL_DEFAULTS = TrainingDefaults(lr=1e-4, weight_decay=0.05, warmup=0.05, batch_size=64)


def check_index_name(name: str) -> str:
    if not _INDEX_NAME.match(name):
        raise UsageError(
            f"invalid index name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
        )
    return name


def resolve(
    *,
    home: str | Path | None = None,
    index: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    draft: bool | None = None,
    index_type: str | None = None,
    decoder: str | None = None,
    runtime: str | None = None,
    video_fps: float | None = None,
) -> Settings:
    """Build :class:`Settings` from explicit values, then the environment, then defaults."""
    name = index or os.environ.get("MMSEARCH_INDEX") or DEFAULT_INDEX
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if decoder is not None and decoder not in DECODERS:
        raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if runtime is not None and runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if workers is not None and workers < 0:
        raise UsageError("--workers must be 0 (auto) or more")
    if video_fps is not None and not 0 < video_fps <= MAX_VIDEO_FPS:
        raise UsageError(f"--video-fps must be above 0 and at most {MAX_VIDEO_FPS:g}, "
                         f"got {video_fps:g}")
    settings = Settings(home=Path(home).expanduser() if home else default_home(),
                        index=check_index_name(name))
    changes = {
        "model": model, "pretrained": pretrained, "device": device,
        "batch_size": batch_size, "workers": workers, "draft": draft, "index_type": index_type,
        "decoder": decoder, "runtime": runtime, "video_fps": video_fps,
    }
    return settings.with_(**{k: v for k, v in changes.items() if v is not None})
