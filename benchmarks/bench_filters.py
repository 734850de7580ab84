"""Filtered search: latency and recall@10 of date filters against unfiltered search.

    python benchmarks/bench_filters.py --n 100000 [--queries 100]
    python benchmarks/bench_filters.py --n 1000000

Data: ``--n`` synthetic clustered 512-d vectors (the ``bench_index_scale``
mixture: no real embeddings at this scale exist offline) written through the
store under fake paths, each with a date taken spread evenly over 2020-2024;
the FAISS index is the automatic type (exact up to 65k, HNSW above). Queries are
fresh draws from the mixture; times are ``search.search_images`` (the engine's
search after the text encoding: the filter's SQL, the ranking, the hits' rows),
one query at a time, warm (every query is run once unfiltered first, so the
memory-mapped index is in the page cache). Filters: a selective one (~1% of the photos: 18 days)
and a broad one (~50%: 2020-01 .. 2022-06). Each is measured on the path the
engine takes and, as a comparison, forced through the other path (exact ranking
of the selected vectors read from the catalog vs FAISS restricted to the
selection with an IDSelector). Recall@10: overlap with the exact top 10 of
exactly the selected vectors (numpy). Baseline in the same run: unfiltered search.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402
from bench_index_scale import Mixture  # noqa: E402

DIM, CHUNK = 512, 20_000
EXACT_FORCED_MAX = 200_000  # the forced exact path is skipped above this many selected vectors
FIRST, DAYS = date(2020, 1, 1), 1827  # 2020-01-01 .. 2024-12-31
FILTERS = {"none": {}, "1% (18 days)": {"after": "2022-03-01", "before": "2022-03-18"},
           "50% (2020-01..2022-06)": {"after": "2020-01", "before": "2022-06"}}


def taken(i: int) -> str:
    return (FIRST + timedelta(days=(i * 7919) % DAYS)).isoformat() + "T12:00:00"


def build(root: Path, n: int, mix: Mixture):
    """The store at ``root`` holding ``n`` vectors with dates (built once, then reused)."""
    from mmsearch.models.identity import ModelIdentity
    from mmsearch.store import ImageFile, Store

    if (root / "bench_built").is_file():
        return Store.open(root, create=False)
    if root.exists():  # a build that was interrupted: start again
        import shutil

        shutil.rmtree(root)
    store = Store.open(root, create=True)
    store.lock()
    store.set_model(ModelIdentity("synthetic", "none", "none"), DIM)
    t0 = time.perf_counter()
    for start in range(0, n, CHUNK):
        vecs = mix.draw(start // CHUNK, min(CHUNK, n - start))
        files = [ImageFile(f"/bench/{i:07d}.jpg", 1000, 0, f"h{i:07d}",
                           {"taken": taken(i), "taken_source": "exif", "ext": "jpg"})
                 for i in range(start, start + len(vecs))]
        store.put_images(files, vecs)
        print(f"  catalog {start + len(vecs):,}/{n:,}", file=sys.stderr, flush=True)
    store.retype("auto")
    store.flush()
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    (root / "bench_built").write_text("ok")
    store.unlock()
    return store


def exact_top(store, queries: np.ndarray, selected: np.ndarray | None) -> list[set[int]]:
    """The exact top-10 ids per query among ``selected`` (all when None), by numpy."""
    best: list[list[tuple[float, int]]] = [[] for _ in queries]
    for ids, vecs in store.read.vector_chunks("images", DIM, 100_000):
        if selected is not None:
            keep = np.isin(ids, selected)
            ids, vecs = ids[keep], vecs[keep]
        scores = queries @ vecs.T
        for row, found in zip(scores, best):
            top = np.argsort(-row)[:10]
            found += [(float(row[j]), int(ids[j])) for j in top]
    return [{i for _, i in sorted(found, reverse=True)[:10]} for found in best]


def measure(store, queries: np.ndarray, filters, truth: list[set[int]], force: str | None,
            repeat: bool = False) -> dict:
    """p50/p95 ms and recall@10; ``repeat``: the filter's selection stays cached between
    queries (a page scrolling through results), else it is computed for every query."""
    from mmsearch.search import search as engine_search

    saved = engine_search.BRUTE_FORCE_MAX, engine_search.BRUTE_FORCE_SHARE
    if force == "faiss":
        engine_search.BRUTE_FORCE_MAX, engine_search.BRUTE_FORCE_SHARE = 0, 1 << 40
    elif force == "exact":
        engine_search.BRUTE_FORCE_MAX = 1 << 40
    try:
        engine_search.search_images(store, queries[:1], 10, filters)  # warm
        times, recall = [], []
        for q, want in zip(queries, truth):
            if not repeat:
                store._selections.clear()
            t0 = time.perf_counter()
            hits = engine_search.search_images(store, q[None], 10, filters)[0]
            times.append((time.perf_counter() - t0) * 1000)
            recall.append(len({h.id for h in hits} & want) / max(1, min(10, len(want))))
    finally:
        engine_search.BRUTE_FORCE_MAX, engine_search.BRUTE_FORCE_SHARE = saved
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "recall@10": float(np.mean(recall))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--home", type=Path, default=ROOT / "indexes")
    args = parser.parse_args()
    from mmsearch.search.filters import Filters
    from mmsearch.search.search import selected_ids

    info = machine_info()
    mix = Mixture(DIM, max(10, min(10_000, args.n // 100)), 0.75, 1)
    store = build(args.home / f"bench_filters_{args.n}", args.n, mix)
    queries = mix.draw(10**6, args.queries)
    from mmsearch.search.search import search_images

    for q in queries:  # a warm page cache: the index file is memory-mapped
        search_images(store, q[None], 10)
    rows = []
    for name, spec in FILTERS.items():
        filters = Filters(**spec)
        selected = selected_ids(store, filters) if filters.selects else None
        truth = exact_top(store, queries, selected)
        share = 1.0 if selected is None else len(selected) / args.n
        runs = [(None, False)] if selected is None else [
            (None, False), (None, True), ("exact", False), ("faiss", False)]
        for force, repeat in runs:
            if force == "exact" and share * args.n > EXACT_FORCED_MAX:
                continue  # reading that many vectors per query is what the engine avoids
            path = (force or "engine") + (", repeat" if repeat else "")
            row = {"filter": name, "selected": share, "path": path, **measure(
                store, queries, filters, truth, force, repeat)}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    info["load_avg_end"] = load_avg()
    report(args, store, info, rows)


def report(args, store, info: dict, rows: list[dict]) -> None:
    base = rows[0]["p50_ms"]
    lines = [f"# bench_filters: {args.n:,} vectors of {DIM}-d ({store.image_index}), "
             f"{args.queries} queries, k=10, dates over 2020-2024", machine_text(info),
             f"# baseline: unfiltered search_images p50 {base:.2f} ms (same run)", "",
             f"{'filter':<24}{'selected':>9}  {'path':<15}{'p50 ms':>9}{'p95 ms':>9}"
             f"{'x unfiltered':>14}{'recall@10':>11}"]
    for r in rows:
        lines.append(f"{r['filter']:<24}{r['selected']:>9.2%}  {r['path']:<15}{r['p50_ms']:>9.2f}"
                     f"{r['p95_ms']:>9.2f}{r['p50_ms'] / base:>14.2f}{r['recall@10']:>11.3f}")
    lines += ["", "path: engine = what search_images chooses (exact ranking of the selection -- its "
              "vectors reconstructed from the index, or read from the catalog for compressed "
              "types -- when it "
              "holds at most max(20,000, n/50) images, else FAISS with an IDSelector and the "
              "search effort raised by n/selected), the filter's SQL selection computed for each query; "
              "engine, repeat = the same with the selection cached (the store keeps the last 8 "
              "while nothing is committed: a page scrolling through one filter's results); "
              "exact / faiss = that path forced (exact skipped above "
              f"{EXACT_FORCED_MAX:,} selected vectors)."]
    text = "\n".join(lines)
    print(text)
    label = f"{args.n // 1_000_000}M" if args.n >= 1_000_000 else f"{args.n // 1000}k"
    write_results(f"filters_{label}", text, {"machine": info, "n": args.n, "rows": rows,
                                             "index": store.image_index})


if __name__ == "__main__":
    main()
