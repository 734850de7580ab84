"""`mmsearch serve --watch`: query latency while the watcher indexes a 500-photo batch,
against the same server idle, in one run; and how long until the batch is searchable.

    python benchmarks/bench_watch.py                      # 500 + 500 photos, ViT-B-32
    python benchmarks/bench_watch.py --base 100 --batch 100 --queries 10   # a quick check

Index: the first ``--base`` photos of Flickr8k-1k copied to ``<tmp>/photos/a/`` and indexed
with ViT-B-32 with random weights (``--pretrained none``: no weights offline; the speed is
the same) on the CPU. Then, in this process, the server's engine
(``SearchService(resolve(home, index, device="cpu"))``, model warm) with its watcher
started as ``serve --watch`` starts it (production settings: 2 s of quiet or 500 changes).

Idle: ``--queries`` searches ``service.search(parse(caption), 10, 0, Filters())``, one at
a time, distinct Flickr8k captions, the watcher idle. Batch: the next ``--batch`` photos
are copied into ``<tmp>/photos/b/``; from the end of the copy the same searches run back
to back until the index holds them all; a search counts as *during the batch* when the
watcher reported ``indexing`` both when it was sent and when it was answered. Reported:
p50/p99 of both (ms), the batch's run time and photos/s, the time from the end of the
copy until all of them are searchable, the watcher's batch lines, and the peak RSS.
Results: results/watch.{txt,json}, with the machine (benchmarks/_machine.py). The
queries and the batch share the same cores: the figures say what a user searching
during an import sees.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import describe, header  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
ARCH, WEIGHTS = "ViT-B-32", "none"


def captions() -> list[str]:
    data = json.loads((FLICKR / "dataset_flickr8k_1k.json").read_text())
    return [s["raw"] for img in data["images"] for s in img["sentences"]]


def ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values) * 1000
    return {"n": len(values), "p50": round(float(np.percentile(arr, 50)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1), "max": round(float(arr.max()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--queries", type=int, default=100, help="idle searches")
    args = ap.parse_args()

    from mmsearch import Engine
    from mmsearch.search.filters import Filters
    from mmsearch.search.syntax import parse
    from mmsearch.serve.service import SearchService
    from mmsearch.settings import resolve

    photos = sorted((FLICKR / "images").glob("*.jpg"))
    assert len(photos) >= args.base + args.batch, "not enough Flickr8k-1k photos"
    texts = captions()
    tmp = Path(tempfile.mkdtemp(prefix="bench_watch_"))
    try:
        home, root = tmp / "home", tmp / "photos"
        (root / "a").mkdir(parents=True)
        for src in photos[:args.base]:
            shutil.copy(src, root / "a" / src.name)
        with Engine.open("watch", home=home, model=ARCH, pretrained=WEIGHTS, device="cpu") as e:
            e.index([root])

        service = SearchService(resolve(home=home, index="watch", device="cpu"))
        lines: list[str] = []
        service.watch(lines.append)
        search = lambda q: service.search(parse(q), 10, 0, Filters())  # noqa: E731
        for q in texts[:5]:
            search(q)  # warm
        idle = []
        for q in texts[5:5 + args.queries]:
            t0 = time.perf_counter()
            search(q)
            idle.append(time.perf_counter() - t0)

        (root / "b").mkdir()
        for src in photos[args.base:args.base + args.batch]:
            shutil.copy(src, root / "b" / src.name)
        copied = time.perf_counter()
        during, n = [], 5 + args.queries
        total = args.base + args.batch
        while service.engine.store.read.image_count() < total:
            if time.perf_counter() - copied > 900:
                raise SystemExit("the batch was not searchable within 15 minutes")
            before = service.watch_state()["state"]
            t0 = time.perf_counter()
            search(texts[n % len(texts)])
            took = time.perf_counter() - t0
            n += 1
            if before == "indexing" and service.watch_state()["state"] == "indexing":
                during.append(took)
        searchable = time.perf_counter() - copied
        state = service.watch_state()
        service.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    last = state["last"] or {}
    result = {
        "machine": describe(), "model": f"{ARCH}/{WEIGHTS}", "device": "cpu",
        "base_photos": args.base, "batch_photos": args.batch,
        "idle_ms": ms(idle), "during_batch_ms": ms(during),
        "batch_seconds": last.get("seconds"), "batches": state["batches"],
        "batch_photos_per_s": (round(args.batch / last["seconds"], 1)
                               if last.get("seconds") else None),
        "searchable_after_copy_s": round(searchable, 1), "watcher_lines": lines,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    text = "\n".join([
        header(), f"# model {ARCH}/{WEIGHTS}, device cpu; {args.base} photos indexed, then "
        f"{args.batch} copied in while serving (serve --watch, production settings)", "",
        f"query latency idle           p50 {result['idle_ms'].get('p50')} ms  "
        f"p99 {result['idle_ms'].get('p99')} ms  (n={len(idle)})",
        f"query latency during batch   p50 {result['during_batch_ms'].get('p50')} ms  "
        f"p99 {result['during_batch_ms'].get('p99')} ms  (n={len(during)})",
        f"batch: {state['batches']} run(s), the last {last.get('seconds')} s "
        f"({result['batch_photos_per_s']} photos/s)",
        f"all {args.batch} searchable {result['searchable_after_copy_s']} s after the copy ended",
        f"peak RSS {result['peak_rss_mb']} MB (server engine + watcher's engine, two models)",
        "", *[f"  {line}" for line in lines]])
    print(text)
    out = HERE / "results"
    (out / "watch.txt").write_text(text + "\n")
    (out / "watch.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
