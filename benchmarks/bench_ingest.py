"""Ingest throughput: mmsearch end to end against a naive loop and the model-only rate.

    python benchmarks/bench_ingest.py                       # ViT-B-32, random weights
    python benchmarks/bench_ingest.py --pretrained /path/to/ViT-B-32.pt --n 1000
    python benchmarks/bench_ingest.py --device cuda --n 1000 --big 0 --batch-size 256 --workers 16

Sets: real Flickr8k photos from ../shared (about 500x375) and the same photos
re-encoded as 12-megapixel JPEGs (4000x3000, quality 90), the size phones make.
For each set it measures images/s of
  * model only  - encode_image on ready tensors at the same batch size,
  * naive       - one process: PIL open + open_clip preprocess + batched encode_image,
  * mmsearch    - `Engine.index` on a fresh index: walk, hash, decode, embed, store,
with per-stage seconds, and the peak RSS of mmsearch at n and 2n images.
Speed does not depend on the weights, so random weights (--pretrained none) are fine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import header  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"
DATA = ROOT / "indexes" / "bench-data"


def flickr_set(n: int) -> Path:
    """A folder of symlinks to the first n Flickr photos."""
    folder = DATA / f"flickr-{n}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for src in sorted(FLICKR.glob("*.jpg"))[:n]:
            (folder / src.name).symlink_to(src)
    return folder


def big_set(n: int) -> Path:
    """The first n Flickr photos upscaled to 4000x3000 JPEGs (made once, cached)."""
    from PIL import Image

    folder = DATA / f"12mp-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(FLICKR.glob("*.jpg"))[:n]:
        dst = folder / src.name
        if not dst.exists():
            img = Image.open(src).convert("RGB").resize((4000, 3000), Image.BICUBIC)
            img.save(dst, quality=90)
    return folder


def model_only(emb, batch: int, n: int) -> float:
    import torch

    x = torch.randn(batch, 3, emb.image_size, emb.image_size)
    emb.encode_images(x)  # warm-up
    batches = max(2, -(-n // batch) // 2)
    t = time.perf_counter()
    for _ in range(batches):
        emb.encode_images(x)
    return batches * batch / (time.perf_counter() - t)


def naive(emb, files: list[Path], batch: int) -> tuple[float, dict[str, float]]:
    """What popular tools do: decode, preprocess, encode, one image after another."""
    import torch
    from PIL import Image

    stages = {"decode": 0.0, "preprocess": 0.0, "model": 0.0}
    start = time.perf_counter()
    for i in range(0, len(files), batch):
        tensors = []
        for f in files[i:i + batch]:
            t0 = time.perf_counter()
            img = Image.open(f).convert("RGB")
            t1 = time.perf_counter()
            tensors.append(emb.preprocess(img))
            stages["decode"] += t1 - t0
            stages["preprocess"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        emb.encode_images(torch.stack(tensors))
        stages["model"] += time.perf_counter() - t2
    return len(files) / (time.perf_counter() - start), stages


def mmsearch_run(folder: Path, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    from mmsearch import Engine
    from mmsearch.ingest.embed import StageTimes, embed_paths

    home = Path(tempfile.mkdtemp(prefix="mmsearch-bench-"))
    try:
        with Engine.open("bench", home=home, model=args.model, pretrained=args.pretrained,
                         batch_size=args.batch_size, workers=args.workers, draft=args.draft,
                         device=args.device) as e:
            e.embedder  # load the model outside the timed run, as naive does
            t = time.perf_counter()
            report = e.index([folder])
            rate = report.embedded / (time.perf_counter() - t)
            times = StageTimes()
            files = sorted(folder.iterdir())
            for _ in embed_paths(e.embedder, files, batch_size=args.batch_size,
                                 workers=args.workers, draft=args.draft, times=times):
                pass
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rate, {"decode (summed over threads)": times.decode,
                  "prepare (summed over threads)": times.prepare, "model": times.model}


def peak_rss_mb(folder: Path, args: argparse.Namespace) -> float:
    """Peak RSS of a fresh process indexing ``folder``."""
    code = (f"from mmsearch import Engine; import tempfile, resource\n"
            f"with Engine.open('b', home=tempfile.mkdtemp(), model={args.model!r}, "
            f"pretrained={args.pretrained!r}, batch_size={args.batch_size}, "
            f"draft={args.draft!r}, device={args.device!r}) as e:\n    e.index([{str(folder)!r}])\n"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_set(name: str, folder: Path, emb, args: argparse.Namespace) -> dict:
    files = sorted(folder.iterdir())
    only = model_only(emb, args.batch_size, len(files))
    base, base_stages = naive(emb, files, args.batch_size)
    ours, our_stages = mmsearch_run(folder, args)
    return {"set": name, "images": len(files), "model_only_ips": only, "naive_ips": base,
            "mmsearch_ips": ours, "vs_naive": ours / base, "vs_model_only": ours / only,
            "naive_stages_s": base_stages, "mmsearch_stages_s": our_stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--n", type=int, default=256, help="Flickr-sized photos")
    parser.add_argument("--big", type=int, default=64, help="12-megapixel photos (0: skip that set)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ... (as `mmsearch index`)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no-draft", dest="draft", action="store_false")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS at n and 2n")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not FLICKR.is_dir():
        sys.exit(f"photos not found: {FLICKR} (see ../shared/README.md)")
    from mmsearch.models import identify, load_embedder

    emb = load_embedder(identify(args.model, args.pretrained), args.device)
    print(header())
    print(f"# model {args.model} / {args.pretrained}, device {emb.device}, batch {args.batch_size}, "
          f"draft {args.draft}")
    results = [bench_set("flickr (~500x375)", flickr_set(args.n), emb, args)]
    if args.big:
        results.append(bench_set("12 MP (4000x3000)", big_set(args.big), emb, args))
    for r in results:
        print(f"\n{r['set']}: {r['images']} images")
        print(f"  model only  {r['model_only_ips']:7.2f} images/s")
        print(f"  naive       {r['naive_ips']:7.2f} images/s   stages {_fmt(r['naive_stages_s'])}")
        print(f"  mmsearch    {r['mmsearch_ips']:7.2f} images/s   stages {_fmt(r['mmsearch_stages_s'])}")
        print(f"  mmsearch / naive = {r['vs_naive']:.2f}x   mmsearch / model only = "
              f"{r['vs_model_only']:.0%}")
    if args.rss and args.big:
        rss = {n: peak_rss_mb(big_set(n), args) for n in (args.big, 2 * args.big)}
        print(f"\npeak RSS indexing 12 MP photos: " +
              ", ".join(f"{n} images {mb:.0f} MB" for n, mb in rss.items()))
        results.append({"peak_rss_mb_12mp": rss})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def _fmt(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in stages.items())


if __name__ == "__main__":
    main()
