"""Shared fixtures: a tiny trained open_clip checkpoint, photo folders, a private data dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tinyclip  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k-1k"


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of the tiny CLIP; trained once, cached in .pytest_cache."""
    out = Path(request.config.cache.mkdir("tinyclip"))
    return tinyclip.train_tiny_clip(out)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config JSON alone (use with pretrained='none' for random weights)."""
    return tinyclip.write_config(tmp_path_factory.mktemp("cfg") / f"{tinyclip.MODEL_NAME}.json")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private MMSEARCH_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("MMSEARCH_HOME", str(path))
    monkeypatch.delenv("MMSEARCH_INDEX", raising=False)
    return path


def draw_shapes(folder: Path, per_combo: int = 2, fmt: str = "png") -> dict[Path, str]:
    """Held-out shape images written to ``folder``; returns path -> caption."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for color, shape in tinyclip.combos():
        for seed in range(per_combo):
            path = folder / f"{color}_{shape}_{seed}.{fmt}"
            tinyclip.draw_shape(color, shape, seed=seed).save(path)
            out[path] = tinyclip.caption(color, shape)
    return out


@pytest.fixture
def shapes(tmp_path: Path) -> dict[Path, str]:
    return draw_shapes(tmp_path / "shapes")


@pytest.fixture(scope="session")
def flickr_images() -> list[Path]:
    images = sorted((FLICKR / "images").glob("*.jpg"))
    if not images:
        pytest.skip(f"real photos not found at {FLICKR} (see ../shared/README.md)")
    return images
