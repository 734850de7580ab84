"""Indexing videos end to end: `Engine.index` over video files, decode + model + store.

    python benchmarks/bench_video_index.py [--videos DIR] [--model ViT-B-32]

The videos are those ``bench_video.py`` makes and caches (a 1080p H.264 file and ten
phone-like clips, under ``~/.cache/mmsearch-bench/video``; run it first). Each is indexed
into a fresh index with ViT-B-32 with random weights on the CPU (no weights offline: the
speed is a real model's, the collapsing of alike frames is not -- a random network sees
frames of one scene as near-identical more often than a trained one), at the default
rate (``--video-fps`` 1). Reported per input: minutes of video, wall seconds, seconds per
minute of video and the hour it extrapolates to, frames sampled and embedded, frames
stored after collapsing (per minute of video), and the model's own rate for comparison.
Results: results/video_index.{txt,json}, with the machine (benchmarks/_machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _machine  # noqa: E402

CACHE = Path.home() / ".cache" / "mmsearch-bench" / "video"


def index_once(folder: Path, model: str) -> dict:
    from mmsearch import Engine
    from mmsearch.ingest.video import probe

    minutes = sum(probe(p).duration for p in folder.iterdir()) / 60
    with tempfile.TemporaryDirectory() as home:
        with Engine.open("v", home=home, model=model, pretrained="none", device="cpu") as e:
            e.embedder  # noqa: B018 - the model is loaded before the clock starts
            t0 = time.perf_counter()
            report = e.index([folder])
            wall = time.perf_counter() - t0
    return {"minutes": round(minutes, 2), "wall_s": round(wall, 1),
            "s_per_video_minute": round(wall / minutes, 1),
            "hour_min": round(wall / minutes, 1),  # seconds a minute = minutes an hour
            "sampled": report.embedded, "stored": report.frames,
            "stored_per_minute": round(report.frames / minutes, 1),
            "frames_per_s": round(report.embedded / wall, 2), "skipped": len(report.skipped)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=Path, default=CACHE)
    ap.add_argument("--model", default="ViT-B-32")
    args = ap.parse_args()
    load0 = list(os.getloadavg())
    inputs = {"1-min 1080p H.264": ["long-1080p-1min-v1.mp4"],
              "10 phone clips (1080x1920 rotated, 30 fps)":
                  sorted(p.name for p in args.videos.glob("phone-*.mp4"))}
    rows = {}
    for name, files in inputs.items():
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                if not (args.videos / f).is_file():
                    sys.exit(f"{args.videos / f} is missing: run benchmarks/bench_video.py first")
                os.symlink(args.videos / f, Path(tmp) / f)
            rows[name] = index_once(Path(tmp), args.model)
    machine = _machine.describe()
    lines = [f"# bench_video_index: {args.model} (random weights) on the CPU, --video-fps 1, "
             "a fresh index per input",
             *(f"# {k}: {v}" for k, v in machine.items()),
             f"# load average (1/5/15 min): {load0} at start, {list(os.getloadavg())} at end -- "
             "2 cores; a load above that means other processes competed", ""]
    for name, r in rows.items():
        lines.append(f"  {name}: {r['minutes']} min of video in {r['wall_s']} s = "
                     f"{r['s_per_video_minute']} s a minute (an hour: ~{r['hour_min']} min, "
                     f"extrapolated); {r['sampled']} frames embedded ({r['frames_per_s']}/s), "
                     f"{r['stored']} stored = {r['stored_per_minute']} a minute; "
                     f"skipped {r['skipped']}")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results" / "video_index.txt").write_text(text)
    (HERE / "results" / "video_index.json").write_text(json.dumps(
        {"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
