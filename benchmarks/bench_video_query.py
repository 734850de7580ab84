"""Query latency with video frames beside the photos: what collapsing moments costs.

    python benchmarks/bench_video_query.py [--photos 100000] [--videos 2450] [--frames 3600]
        [--queries 200] [--home indexes]

An index of ``--photos`` photos and ``--videos`` videos of ``--frames`` sampled frames
each (the defaults: 100k photos and 2,450 one-hour videos sampled once a second) is
filled with synthetic 512-d vectors straight through ``Store.put_images`` (a video's
frames with its row, as an index run writes them; embedding that much on a CPU would
take days). A video's frames drift around its own centre, in scenes of a few seconds
to a few minutes, so neighbouring frames look alike as in real footage; each video's
frames go through the index run's own ``collapse`` (cosine above 0.97 to the first of a
run: stored once), which leaves about 6 stored frames a minute of this footage, about
0.9M frame vectors beside the photos. The FAISS index is the type the store picks for
that size (``Store.rebuild``).

Timed, in one process, over ``--queries`` query vectors (each near a random stored
frame or photo), the index warm:

* ``search``: ``search_images(store, q, 10)``, what ``mmsearch query`` runs after
  encoding: it ranks 8x as many candidates, collapses each video to its best moment and
  grows each moment's span from the frames around it;
* ``search --moments``: several moments per video;
* ``--type image``: photos only (no collapse);
* the baseline: what the same search costs in an index without videos: the top 10
  (``ranked_ids``) and their catalog records, no collapsing; and FAISS's own top-10
  search alone (``index.search``).

Results: results/video_query.{txt,json}, with the machine (benchmarks/_machine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _machine  # noqa: E402

DIM = 512


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def video_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` frames of one video: scenes (3 s to 3 min) around the video's centre."""
    centre = rng.normal(size=DIM)
    out, t = [], 0
    while t < n:
        length = int(min(n - t, rng.integers(3, 180)))
        scene = centre + rng.normal(size=DIM) * 0.8
        drift = np.cumsum(rng.normal(size=(length, DIM)) * 0.1, axis=0)
        out.append(scene + drift + rng.normal(size=(length, DIM)) * 0.12)
        t += length
    return unit(np.concatenate(out))


def build(root: Path, photos: int, videos: int, frames: int) -> dict:
    from mmsearch.ingest.video import collapse
    from mmsearch.locations import moment
    from mmsearch.models.identity import ModelIdentity
    from mmsearch.store import ImageFile, Store, VideoFile

    done = root / "bench_built.json"
    if done.is_file():
        return json.loads(done.read_text())
    if root.exists():
        import shutil

        shutil.rmtree(root)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    store = Store.open(root, create=True)
    store.lock()
    store.set_model(ModelIdentity("bench", "synthetic", "bench:synthetic"), DIM)
    centres = unit(rng.normal(size=(1000, DIM)))
    for start in range(0, photos, 20_000):
        n = min(20_000, photos - start)
        vecs = unit(centres[rng.integers(0, 1000, n)] + rng.normal(size=(n, DIM)) * 0.05)
        store.put_images([ImageFile(f"/bench/photos/{i:07d}.jpg", 1, 0, f"p{i}",
                                    {"taken_source": "mtime"}) for i in range(start, start + n)],
                         vecs)
    stored = 0
    for v in range(videos):
        path = f"/bench/videos/{v:04d}.mp4"
        sampled = video_frames(rng, frames)
        spans = collapse(np.arange(frames, dtype=np.float64), sampled, float(frames))
        rows = [ImageFile(moment(path, s.time), 1, 0, f"v{v}#t={s.time}",
                          {"start_s": s.start, "end_s": s.end, "time_s": s.time,
                           "taken_source": "mtime", "ext": "mp4"}) for s in spans]
        store.put_images(rows, sampled[[s.index for s in spans]], video=VideoFile(
            path, 1, 0, f"v{v}", {"duration": float(frames), "width": 1920, "height": 1080,
                                  "codec": "h264", "rotation": 0, "frames": len(spans)}))
        stored += len(spans)
        if v % 25 == 0:
            print(f"  video {v}/{videos}", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    index = store.rebuild("images")
    t2 = time.perf_counter()
    info = {"photos": photos, "videos": videos, "sampled_frames": videos * frames,
            "stored_frames": stored, "stored_per_minute": round(stored / (videos * frames / 60), 2),
            "index": index.description, "catalog_s": round(t1 - t0, 1),
            "faiss_build_s": round(t2 - t1, 1)}
    store.close()
    done.write_text(json.dumps(info))
    return info


def timed(fn, queries: np.ndarray) -> dict:
    fn(queries[0])  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(times)}


def plain(store, index, q: np.ndarray) -> list:
    """What a search costs in an index without videos: its top 10 and their records."""
    from mmsearch.search.search import ranked_ids

    result = ranked_ids(store, index, q, 10, None)
    return list(store.image_records(int(i) for i in result.ids[0] if i >= 0).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=100_000)
    ap.add_argument("--videos", type=int, default=2450)
    ap.add_argument("--frames", type=int, default=3600)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--home", type=Path, default=ROOT / "indexes")
    args = ap.parse_args()
    from mmsearch.search.filters import Filters
    from mmsearch.search.search import search_images
    from mmsearch.store import Store

    load0 = list(os.getloadavg())
    root = args.home / f"bench_video_{args.photos // 1000}k_{args.videos}x{args.frames}"
    built = build(root, args.photos, args.videos, args.frames)
    total = args.photos + built["stored_frames"]
    store = Store.open(root, create=False)
    index = store.vectors("images")
    rng = np.random.default_rng(1)
    _, picks = store.image_vectors(rng.choice(store.read.all_image_ids(), args.queries))
    queries = unit(picks + rng.normal(size=picks.shape).astype(np.float32) * 0.02)
    rows = {
        "search (one hit per video)": timed(lambda q: search_images(store, q, 10), queries),
        "search --moments": timed(lambda q: search_images(store, q, 10, Filters(moments=True)),
                                  queries),
        "search --type image": timed(lambda q: search_images(store, q, 10, Filters(type="image")),
                                     queries),
        "BASELINE top-10 as without videos": timed(lambda q: plain(store, index, q), queries),
        "FAISS index.search top-10 alone": timed(lambda q: index.search(q[None], 10), queries),
    }
    hits = search_images(store, queries[0], 10)[0]
    store.close()
    machine = _machine.describe()
    base = rows["BASELINE top-10 as without videos"]["p50_ms"]
    lines = [f"# bench_video_query: {args.photos:,} photos + {args.videos} videos of "
             f"{args.frames} sampled frames, {built['stored_frames']:,} stored after collapsing "
             f"({built['stored_per_minute']} a minute) = {total:,} vectors, dim {DIM}, k=10",
             *(f"# {k}: {v}" for k, v in machine.items()),
             f"# load average (1/5/15 min): {load0} at start, {list(os.getloadavg())} at end "
             "-- 2 cores; a load above that means other processes competed",
             f"# index {built['index']} (catalog filled in {built['catalog_s']} s, FAISS built in "
             f"{built['faiss_build_s']} s); queries: stored vectors plus noise", ""]
    for name, r in rows.items():
        lines.append(f"  {name:<32} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
                     f"({r['p50_ms'] / base:.1f}x the baseline p50)  (n={r['n']})")
    lines.append(f"  first query's hits: {sum(h.kind == 'video' for h in hits)} video moments, "
                 f"{sum(h.kind == 'image' for h in hits)} photos")
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results"
    (out / "video_query.txt").write_text(text)
    (out / "video_query.json").write_text(json.dumps({"machine": machine, "built": built,
                                                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
