"""How fast `mmsearch.ingest.video.sample` turns videos into frames, against the model's rate.

    python benchmarks/bench_video.py            # a 10-minute 1080p video and 10 phone-like clips
    python benchmarks/bench_video.py --quick    # a 1-minute video, 3 clips, one model batch

Inputs, made once with PyAV and cached outside the repository (``--cache``, default
``~/.cache/mmsearch-bench/video``):

* a long 1080p H.264 video, 30 fps, x264 ``preset=ultrafast`` (its defaults: no B-frames,
  a keyframe every 250 frames), panning over mosaics of the Flickr sample photos (random
  texture without them) with a little grain, a new mosaic every 20 s;
* phone-like clips: 1080x1920 as shown (stored 1920x1080 with a 90-degree display
  matrix, as phones write them), 30 fps, 10-19 s, a keyframe every second, x264
  ``preset=superfast`` (B-frames, so skipping non-reference frames has something to skip).

Measured, for each decoding strategy (`mmsearch.ingest.video.Strategy`) at the default
rate (1 frame/s): sampled frames per wall-clock second, video seconds per wall-clock
second, and CPU seconds (all threads).  The long video is decoded in full with the
default strategy (an hour is extrapolated from it, and said so); the other strategies on
its first ``--prefix`` seconds, best of ``--rounds`` alternating rounds.  For comparison,
ViT-B-32 with random weights (speed does not depend on them) on CPU, 2 torch threads,
batch 32: images per second of the forward pass alone; the decoder / model ratio must be
above 1 for decoding not to be what limits an index run.  Decoder and model are timed
apart; in a run they share the same cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmsearch-bench" / "video"
FPS = 30
SCENE_SECONDS = 20
GRAIN = 4  # the two low bits of luma flip at random: grain that costs bits, as a sensor's does
VERSION = 1  # bump when the way inputs are made changes


def strategies():
    from mmsearch.ingest.video import DEFAULT_STRATEGY, Strategy

    return {
        "decode all, full-size PIL image + resize": Strategy(seek=False, skip_nonref=False,
                                                             scale_in_decoder=False),
        "decode all, scaled in the decoder": Strategy(seek=False, skip_nonref=False),
        "decode all + skip NONREF": Strategy(seek=False, skip_nonref=True),
        "seek to keyframes": Strategy(seek=True, skip_nonref=False),
        "seek + skip NONREF (default)": DEFAULT_STRATEGY,
    }


# -- inputs -------------------------------------------------------------------------

def mosaics(count: int, width: int, height: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """``count`` (Y, Cb, Cr) planes of twice the frame size: 2x4 photos each, else noise."""
    from PIL import Image

    photos = sorted(FLICKR.glob("*.jpg"))
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        canvas = Image.new("RGB", (2 * width, 2 * height))
        for i in range(8):
            tile = (width // 2, height)
            if photos:
                img = Image.open(photos[int(rng.integers(len(photos)))]).convert("RGB").resize(tile)
            else:
                img = Image.fromarray(rng.integers(0, 255, (tile[1] // 8, tile[0] // 8, 3),
                                                   dtype=np.uint8)).resize(tile)
            canvas.paste(img, ((i % 4) * tile[0], (i // 4) * tile[1]))
        y, cb, cr = (np.asarray(p) for p in canvas.convert("YCbCr").split())
        half = lambda a: a.reshape(height, 2, width, 2).mean(axis=(1, 3)).astype(np.uint8)  # noqa: E731
        out.append((y, half(cb), half(cr)))
    return out


def frame_planes(textures, grain, i: int, width: int, height: int) -> np.ndarray:
    """Frame ``i`` as one yuv420p array: a slow pan over the scene's mosaic, with grain."""
    t = i / FPS
    y, cb, cr = textures[int(t // SCENE_SECONDS) % len(textures)]
    x0 = int(width / 2 * (1 + math.sin(2 * math.pi * t / 17))) & ~1
    y0 = int(height / 2 * (1 + math.sin(2 * math.pi * t / 11))) & ~1
    out = np.empty((height * 3 // 2, width), np.uint8)
    np.bitwise_xor(y[y0:y0 + height, x0:x0 + width], grain[i % len(grain)], out=out[:height])
    q = height // 4
    out[height:height + q] = cb[y0 // 2:y0 // 2 + height // 2, x0 // 2:x0 // 2 + width // 2].reshape(q, width)
    out[height + q:] = cr[y0 // 2:y0 // 2 + height // 2, x0 // 2:x0 // 2 + width // 2].reshape(q, width)
    return out


def encode(path: Path, seconds: float, *, size=(1920, 1080), preset="ultrafast", crf=18, gop=None,
           rotate=0, seed=0) -> Path:
    """Write the moving-mosaic video to ``path`` (through a temporary name) unless it exists."""
    import av

    if path.exists():
        return path
    width, height = size
    textures = mosaics(min(6, max(2, math.ceil(seconds / SCENE_SECONDS))),
                       width, height, seed)
    rng = np.random.default_rng(seed)
    grain = [rng.integers(0, GRAIN, (height, width), dtype=np.uint8) for _ in range(4)]
    part = path.with_name(f".{path.name}.part")
    with av.open(str(part), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS, options={"preset": preset, "crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if rotate:
            stream.set_display_rotation(-rotate)
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(frame_planes(textures, grain, i, width, height),
                                               format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    part.rename(path)
    return path


def inputs(cache: Path, minutes: float, clips: int) -> tuple[Path, list[Path]]:
    cache.mkdir(parents=True, exist_ok=True)
    long = encode(cache / f"long-1080p-{minutes:g}min-v{VERSION}.mp4", minutes * 60, seed=1)
    phone = [encode(cache / f"phone-{k:02d}-v{VERSION}.mp4", 10 + k % 10, preset="superfast",
                    gop=FPS, rotate=90, seed=100 + k) for k in range(clips)]
    return long, phone


# -- measuring --------------------------------------------------------------------------

def decode(paths: list[Path], strategy, limit: float | None = None) -> dict:
    """Sample ``paths`` (each up to ``limit`` seconds of video) with ``strategy``."""
    from mmsearch.ingest.video import Sampling

    frames, shots, seconds = 0, 0, 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with Sampling(path, strategy=strategy) as sampling:
            for frame in sampling:
                frames, shots = frames + 1, shots + frame.shot
                if limit is not None and frame.time >= limit:
                    break
            seconds += min(limit or math.inf, sampling.info.duration)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"frames": frames, "shots": shots, "video_s": seconds, "wall_s": wall, "cpu_s": cpu,
            "frames_per_s": frames / wall, "video_s_per_s": seconds / wall}


def best_of(rounds: int, paths: list[Path], limit: float | None) -> dict[str, dict]:
    """Each strategy's fastest of ``rounds`` alternating runs."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, strategy in strategies().items():
            run = decode(paths, strategy, limit)
            if name not in best or run["wall_s"] < best[name]["wall_s"]:
                best[name] = run
    return best


def model_rate(batches: int) -> dict:
    """ViT-B-32 (random weights) forward images/s on CPU, batch 32, 2 torch threads."""
    import open_clip
    import torch

    torch.set_num_threads(2)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    x = torch.randn(32, 3, 224, 224)
    with torch.inference_mode():
        model.encode_image(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model.encode_image(x)
        seconds = time.perf_counter() - start
    return {"images_per_s": 32 * batches / seconds, "batches": batches, "seconds": seconds}


# -- report ------------------------------------------------------------------------------

def row(name: str, r: dict) -> str:
    return (f"  {name:44s} {r['frames_per_s']:8.1f} frames/s {r['video_s_per_s']:8.1f} video-s/s"
            f"  ({r['frames']} frames, {r['shots']} shot starts, {r['video_s']:.0f} video-s in"
            f" {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU)")


def report(info: dict, args, data: dict) -> str:
    long, clips, model = data["long_full"], data["clips"], data["model"]
    default = "seek + skip NONREF (default)"
    lines = [f"# bench_video: mmsearch.ingest.video.sample at its default rate (1 frame/s, max_side"
             f" 512){' -- QUICK run' if args.quick else ''}",
             machine_text(info), "",
             f"long video: {data['long_desc']}",
             f"  default strategy, whole file: {row('', long).strip()}",
             f"  an hour of such video: about {long['wall_s'] * 3600 / long['video_s'] / 60:.1f} min"
             f" (extrapolated from the {long['video_s'] / 60:.0f}-minute file, not measured)",
             f"  strategies on its first {args.prefix:g} s (best of {args.rounds}):"]
    lines += [row(n, r) for n, r in data["long_prefix"].items()]
    lines += [f"clips: {data['clips_desc']}", f"  strategies (best of {args.rounds}):"]
    lines += [row(n, r) for n, r in clips.items()]
    rate = model["images_per_s"]
    lines += ["", f"model: ViT-B-32, random weights, CPU, 2 torch threads, batch 32, forward only:"
              f" {rate:.1f} images/s ({model['batches']} batches after a warm-up)",
              f"decoder / model: long video {long['frames_per_s'] / rate:.1f}x, clips"
              f" {clips[default]['frames_per_s'] / rate:.1f}x (sampled frames/s of the default strategy"
              f" / the model's images/s; above 1: decoding is not the limit)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-minute video, 3 clips, 1 model batch")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--prefix", type=float, default=None, help="seconds of the long video per strategy")
    args = parser.parse_args()
    minutes, n_clips = (1, 3) if args.quick else (10, 10)
    args.rounds = args.rounds or 1
    args.prefix = args.prefix or (20 if args.quick else 120)
    info = machine_info()
    info["pyav"], info["ffmpeg"] = _pyav_versions()
    long, clips = inputs(args.cache, minutes, n_clips)
    data = {"long_desc": f"{minutes} min, 1920x1080, {FPS} fps, H.264 ultrafast (keyframe every 250"
                         f" frames, no B-frames), {long.stat().st_size / 2**20:.0f} MiB",
            "clips_desc": f"{n_clips} clips, 1080x1920 shown (1920x1080 + rotation 90), {FPS} fps,"
                          f" 10-{9 + min(n_clips, 10)} s, keyframe every second, H.264 superfast"
                          f" (B-frames), {sum(p.stat().st_size for p in clips) / 2**20:.0f} MiB"}
    from mmsearch.ingest.video import DEFAULT_STRATEGY

    data["long_full"] = decode([long], DEFAULT_STRATEGY)
    data["long_prefix"] = best_of(args.rounds, [long], args.prefix)
    data["clips"] = best_of(args.rounds, clips, None)
    data["model"] = model_rate(1 if args.quick else 3)
    info["load_avg_end"] = load_avg()
    text = report(info, args, data)
    print(text)
    if not args.quick:
        write_results("video_decode", text, {"machine": info, **data})


def _pyav_versions() -> tuple[str, str]:
    import av

    ffmpeg = getattr(av, "ffmpeg_version_info", None) or "-"
    return av.__version__, str(ffmpeg)


if __name__ == "__main__":
    main()
