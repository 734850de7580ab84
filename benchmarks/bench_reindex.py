"""Re-index cost: a no-op re-run over an already indexed tree, against the first run.

    python benchmarks/bench_reindex.py --files 20000

Builds a tree of small distinct JPEGs (made once under indexes/bench-data/),
indexes it with the tiny open_clip test model (random weights: the first run
is then dominated by walk, hash, decode and store, not by the model), then
re-runs `index` on the unchanged tree. It reports both runs, whether the
re-run loaded a model, and the first-run time a ViT-B-32 would need at its
model-only rate on this machine (measured here), to put the ratio in context.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _machine import header  # noqa: E402

DATA = ROOT / "indexes" / "bench-data"


def make_tree(n: int) -> Path:
    """n distinct 64x48 JPEGs in folders of 500."""
    from PIL import Image

    root = DATA / f"tree-{n}"
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"d{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:06d}.jpg", quality=80)
    marker.write_text("ok")
    return root


def vit_b32_rate() -> float:
    import torch

    from mmsearch.models import identify, load_embedder

    emb = load_embedder(identify("ViT-B-32", "none"))
    x = torch.randn(32, 3, 224, 224)
    emb.encode_images(x)
    t = time.perf_counter()
    for _ in range(3):
        emb.encode_images(x)
    return 96 / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    args = parser.parse_args()
    import tinyclip

    from mmsearch import Engine

    tree = make_tree(args.files)
    work = Path(tempfile.mkdtemp(prefix="mmsearch-reindex-"))
    config = tinyclip.write_config(work / f"{tinyclip.MODEL_NAME}.json")
    print(header())
    with Engine.open("tree", home=work / "home", model=str(config), pretrained="none") as e:
        t = time.perf_counter()
        first = e.index([tree])
        first_s = time.perf_counter() - t
    with Engine.open("tree", home=work / "home") as e:  # a new process would start like this
        t = time.perf_counter()
        again = e.index([tree])
        again_s = time.perf_counter() - t
        loaded = e._embedder is not None
    rate = vit_b32_rate()
    vit_first = args.files / rate
    print(f"# tree: {args.files} distinct 64x48 JPEGs; first run with the tiny test model")
    print(f"first run        {first_s:8.2f} s  (added {first.added}, embedded {first.embedded})")
    print(f"no-op re-run     {again_s:8.2f} s  (unchanged {again.unchanged}, embedded "
          f"{again.embedded}, model loaded: {loaded})")
    print(f"re-run / first run (tiny model)          = {again_s / first_s:.1%}")
    print(f"ViT-B-32 model-only rate here            = {rate:.1f} images/s -> a first run "
          f">= {vit_first:.0f} s")
    print(f"re-run / first run (ViT-B-32, lower bound) = {again_s / vit_first:.2%}")


if __name__ == "__main__":
    main()
