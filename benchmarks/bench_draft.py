"""What `mmsearch eval --draft` changes: scores, rankings and speed on Flickr photos upscaled 2x.

    python benchmarks/bench_draft.py                     # 1,000 photos; ViT-B-32 speed on 96
    python benchmarks/bench_draft.py --n 200 --speed-n 64

The 1,000 Flickr8k photos of ../shared (about 500x375) are upscaled 2x (about 1000x750,
JPEG quality 95) into a temporary folder outside the repository: at least twice a
224-px model's input, so Pillow's draft decodes them at a reduced DCT scale.

Each photo is embedded twice through the product's own decode + embed path
(``embed_paths``): in full (eval's default) and with the draft (``--draft``).

* Scores and rankings: the tiny CLIP the tests train (tests/tinyclip.py, 32-px input) on
  all photos and their 5 captions each: Recall@1/5/10 both ways for each decoding, the
  largest change of a caption-image score, and how many top-1s changed. The tiny model
  knows coloured shapes, not Flickr: its recall is near chance (R@1 about 0.1 % / 0.5 %
  by chance), so the recalls only show the same protocol ran; the score and rank changes
  are what the draft did. With a 32-px input the draft decodes at 1/8 scale; a 224-px
  model's draft on these photos is 1/2 scale, so its pixels move less (input pixels below).
* Input pixels: the mean and largest change of the model's uint8 input (its resize +
  crop: 224x224 for ViT-B-32, 32x32 for the tiny one) between the two decodings, on the
  first --speed-n photos; no weights involved. With it, the CPU time one thread spends
  decoding + resizing a photo either way (little moved by other load on the machine).
* Speed: decode + embed images/s (wall clock) of ViT-B-32 with random weights (speed does
  not depend on the weights) on --speed-n photos, best of --repeats alternating rounds,
  and of the tiny model on all of them (one round each), in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _machine import describe  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
TINY_CACHE = ROOT / "indexes" / "bench-data" / "tinyclip"
RESULTS = ROOT / "benchmarks" / "results"
MODES = {"full": False, "draft": True}


def _upscale_one(job: tuple[Path, Path]) -> None:
    from PIL import Image

    src, dst = job
    with Image.open(src) as photo:
        big = photo.convert("RGB").resize((2 * photo.width, 2 * photo.height),
                                          Image.Resampling.BICUBIC)
    big.save(dst, quality=95)


def upscaled(n: int, folder: Path):
    """The first ``n`` images of the Flickr sample (with their captions), upscaled 2x into
    ``folder``: the dataset over the copies."""
    from mmsearch.eval.datasets import RetrievalDataset, load_karpathy

    data = load_karpathy(FLICKR / "dataset_flickr8k_1k.json", FLICKR / "images")
    keep = data.caption_image < n
    copies = [folder / p.name for p in data.image_paths[:n]]
    with ProcessPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(_upscale_one, zip(data.image_paths[:n], copies), chunksize=16))
    return RetrievalDataset(data.name, data.split, copies,
                            [c for c, k in zip(data.captions, keep) if k], data.caption_image[keep])


def embed(emb, paths: list[Path], draft: bool, batch_size: int) -> tuple[np.ndarray, dict]:
    """Vectors of ``paths`` through ``embed_paths``, and its images/s and stage seconds."""
    from mmsearch.ingest.embed import StageTimes, embed_paths

    times = StageTimes()
    start = time.perf_counter()
    batches = list(embed_paths(emb, paths, batch_size=batch_size, draft=draft, times=times,
                               decoder="threads"))
    seconds = time.perf_counter() - start
    assert [p for b in batches for p in b.paths] == list(paths), "some photos failed to decode"
    return (np.concatenate([b.vectors for b in batches]),
            {"images_per_s": len(paths) / seconds, "seconds": seconds,
             "decode_ms_per_image": 1000 * times.decode / len(paths),
             "model_s": times.model})


def speed(emb, paths: list[Path], batch_size: int,
          repeats: int) -> tuple[dict, dict[str, np.ndarray]]:
    """Best decode + embed rate per decoding over ``repeats`` alternating rounds (after a
    warm-up), and each decoding's vectors."""
    best: dict[str, dict] = {}
    vectors: dict[str, np.ndarray] = {}
    embed(emb, paths[:2 * batch_size], False, batch_size)
    for _ in range(repeats):
        for mode, draft in MODES.items():
            vectors[mode], run = embed(emb, paths, draft, batch_size)
            if mode not in best or run["images_per_s"] > best[mode]["images_per_s"]:
                best[mode] = run
    best["draft_speedup"] = best["draft"]["images_per_s"] / best["full"]["images_per_s"]
    return best, vectors


def top1(sim: np.ndarray) -> np.ndarray:
    return np.argmax(sim, axis=1)


def ranking_changes(dataset, texts: np.ndarray, images: dict[str, np.ndarray]) -> dict:
    """Recalls per decoding, and how far the draft moved scores and top-1s."""
    from mmsearch.eval.metrics import recalls_from_similarity

    sims = {mode: texts @ vecs.T for mode, vecs in images.items()}
    out: dict = {"recall": {}}
    for mode, sim in sims.items():
        t2i, i2t = recalls_from_similarity(sim, dataset.caption_image)
        out["recall"][mode] = {"t2i": {f"R@{k}": v for k, v in t2i.items()},
                               "i2t": {f"R@{k}": v for k, v in i2t.items()}}
    full, draft = sims["full"], sims["draft"]
    moved = np.abs(draft - full)
    own = moved[np.arange(len(full)), dataset.caption_image]
    cos = np.sum(images["full"] * images["draft"], axis=1)
    out.update({
        "max_score_change": float(moved.max()), "mean_score_change": float(moved.mean()),
        "max_own_caption_score_change": float(own.max()),
        "min_image_vector_cosine": float(cos.min()),
        "t2i_top1_changed": int((top1(full) != top1(draft)).sum()),
        "i2t_top1_changed": int((top1(full.T) != top1(draft.T)).sum()),
        "captions": len(full), "images": full.shape[1]})
    return out


def decoded(emb, path: Path, draft: bool) -> tuple[np.ndarray, tuple[int, int], float]:
    """The model's uint8 input for ``path`` (decode + resize + crop), the decoded size, and
    the CPU seconds this thread spent on it (unlike wall time, barely moved by other load)."""
    from mmsearch.ingest.decode import load_image

    start = time.thread_time()
    image = load_image(path, draft_size=emb.image_size if draft else None)
    pixels = np.asarray(emb.prepare(image), dtype=np.int16)
    return pixels, image.size, time.thread_time() - start


def input_pixels(emb, paths: list[Path]) -> dict:
    """How far the draft moves the model's uint8 input, per pixel value, and what decode +
    resize + crop costs in CPU time either way."""
    diffs, scales, shorts, cpu = [], set(), [], {mode: 0.0 for mode in MODES}
    for path in paths:
        (full, size, cpu_full), (small, small_size, cpu_draft) = (
            decoded(emb, path, draft) for draft in MODES.values())
        cpu["full"] += cpu_full
        cpu["draft"] += cpu_draft
        scales.add(round(size[0] / small_size[0]))
        shorts.append(min(small_size))
        diffs.append(np.abs(small - full))
    d = np.stack(diffs)
    return {"input_size": emb.image_size, "mean_abs": float(d.mean()), "max_abs": int(d.max()),
            "p99_abs": float(np.percentile(d, 99)), "draft_scales": sorted(scales),
            "draft_short_side": [min(shorts), max(shorts)], "photos": len(paths),
            "decode_cpu_ms": {mode: 1000 * t / len(paths) for mode, t in cpu.items()}}


def run(args: argparse.Namespace, folder: Path) -> dict:
    import tinyclip
    from mmsearch.models import identify, load_embedder

    start = time.perf_counter()
    dataset = upscaled(args.n, folder)
    out: dict = {"images": dataset.n_images, "captions": dataset.n_captions,
                 "upscale_s": time.perf_counter() - start, "load_avg_at_start": os.getloadavg()}
    config, checkpoint = tinyclip.train_tiny_clip(TINY_CACHE)
    tiny = load_embedder(identify(str(config), str(checkpoint)), "cpu")
    captions = dataset.captions  # (encode_texts keeps at most 1,024 texts in one call)
    texts = np.concatenate([tiny.encode_texts(captions[i:i + 512])
                            for i in range(0, len(captions), 512)])
    tiny_speed, images = speed(tiny, dataset.image_paths, args.batch_size, 1)
    out["tiny"] = {"model": "tinyclip-test (tests/tinyclip.py, trained on synthetic shapes)",
                   **ranking_changes(dataset, texts, images),
                   "input_pixels": input_pixels(tiny, dataset.image_paths[:args.speed_n]),
                   "speed": tiny_speed}
    vit = load_embedder(identify("ViT-B-32", "none"), "cpu")
    paths = dataset.image_paths[:args.speed_n]
    out["vit_b_32"] = {"model": "ViT-B-32, random weights", "input_pixels": input_pixels(vit, paths),
                       "speed": speed(vit, paths, args.batch_size, args.repeats)[0]}
    out["seconds"] = time.perf_counter() - start
    return out


def report(r: dict, args: argparse.Namespace, machine: dict[str, str]) -> str:
    t = r["tiny"]
    lines = [f"# bench_draft: Flickr8k sample upscaled 2x ({r['images']} photos, about 1000x750, "
             f"{r['captions']} captions), decode + embed by embed_paths (threads), batch "
             f"{args.batch_size}, CPU", *(f"# {k}: {v}" for k, v in machine.items()), "",
             f"{t['model']}: recall is near chance (it never saw photos); the changes are the draft's",
             f"{'':<8}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}{'i2t R@1':>9}{'R@5':>7}{'R@10':>7}"]
    for mode, rec in t["recall"].items():
        lines.append(f"{mode:<8}" + "".join(f"{v:>{9 if i % 3 == 0 else 7}.2f}" for i, v in
                                            enumerate([*rec["t2i"].values(), *rec["i2t"].values()])))
    lines += [f"largest score change {t['max_score_change']:.4f} (mean {t['mean_score_change']:.5f};"
              f" own caption {t['max_own_caption_score_change']:.4f}); lowest cosine between an "
              f"image's two vectors {t['min_image_vector_cosine']:.4f}",
              f"top-1 changed: {t['t2i_top1_changed']} of {t['captions']} captions (text->image), "
              f"{t['i2t_top1_changed']} of {t['images']} images (image->text)", ""]
    for key in ("tiny", "vit_b_32"):
        m, px = r[key], r[key]["input_pixels"]
        scales = ", ".join(f"1/{k}" for k in px["draft_scales"])
        lines.append(f"{m['model']}, {px['input_size']} px input: the draft decodes at {scales} "
                     f"scale (short side {px['draft_short_side'][0]}-{px['draft_short_side'][1]} "
                     f"px); over {px['photos']} photos the model's uint8 input moved by "
                     f"{px['mean_abs']:.2f} on average, 99th percentile {px['p99_abs']:.0f}, "
                     f"at most {px['max_abs']} (of 255)")
        for mode in MODES:
            s = m["speed"][mode]
            lines.append(f"  {mode:<6} {s['images_per_s']:7.1f} images/s decode + embed "
                         f"(decode {s['decode_ms_per_image']:.1f} ms/image summed over threads)")
        lines.append(f"  draft / full = {m['speed']['draft_speedup']:.2f}x; decode + resize + "
                     f"crop alone, CPU time of one thread: {px['decode_cpu_ms']['full']:.1f} vs "
                     f"{px['decode_cpu_ms']['draft']:.1f} ms/image "
                     f"({px['decode_cpu_ms']['full'] / px['decode_cpu_ms']['draft']:.1f}x)")
    load = " / ".join(f"{x:.1f}" for x in r["load_avg_at_start"])
    lines.append(f"\nwhole run {r['seconds']:.0f} s (upscaling {r['upscale_s']:.0f} s); load average "
                 f"(1/5/15 min) {load} after upscaling, {machine['load_avg_1m']} at the end, on "
                 f"{machine['cores']} cores (a load above the core count means other work "
                 f"competed): images/s are wall clock and move with it, a thread's CPU ms barely do")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="photos (and their captions)")
    parser.add_argument("--speed-n", type=int, default=96,
                        help="photos ViT-B-32 embeds (and input pixels are compared on)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="ViT-B-32 timed rounds (best kept)")
    parser.add_argument("--out", type=Path, default=RESULTS / "draft",
                        help="writes OUT.txt and OUT.json")
    args = parser.parse_args()
    if not (FLICKR / "dataset_flickr8k_1k.json").is_file():
        sys.exit(f"photos not found: {FLICKR} (see ../shared/README.md)")
    folder = Path(tempfile.mkdtemp(prefix="mmsearch-draft-"))
    try:
        result = run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    machine = describe()
    text = report(result, args, machine)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "bench_draft", "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
         "machine": machine, "result": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
