"""Exact re-ranking of compressed indexes: recall@10 and latency with and without it.

    python benchmarks/bench_rerank.py [--types ivfsq,ivfpq] [--queries 200]

IVF-SQ8 and IVF-PQ keep lossy codes, so their ranking (and their scores) are
approximate. The engine (``search.search_images``) asks such an index for a pool
of max(100, 10 k) candidates and re-scores them with the exact vectors the
catalog keeps. This measures both on the index ``bench_query.py`` builds
(``indexes/bench_query_1M``: 1M synthetic clustered 512-d vectors), with each
type built in memory by ``Store.rebuild`` (nothing on disk changes). Queries:
stored vectors with Gaussian noise (sigma 0.02 per dimension), renormalised, so
each has real neighbours. Baseline, in the same run: exact search by numpy over
all vectors. Times are one query at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _machine  # noqa: E402

K = 10


def exact_top(store, queries: np.ndarray) -> np.ndarray:
    """Exact top-K ids by numpy, a catalog chunk at a time."""
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.full((len(queries), K), -1, np.int64)
    for ids, vecs in store.read.vector_chunks("images", store.dim):
        s = np.concatenate([best_s, queries @ vecs.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])), 4)


def measure(store, kind: str, queries: np.ndarray, truth: np.ndarray) -> dict:
    from mmsearch.search import search_images

    t = time.perf_counter()
    index = store.rebuild("images", index_type=kind)
    built = time.perf_counter() - t
    raw, raw_t, ours, ours_t = [], [], [], []
    for q in queries:
        t = time.perf_counter()
        raw.append(index.search(q, K).ids[0])
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours.append([h.id for h in search_images(store, q, K)[0]])
        ours_t.append(time.perf_counter() - t)
    ms = lambda xs: round(statistics.median(xs) * 1e3, 2)  # noqa: E731
    return {"type": kind, "index": index.description, "build_s": round(built, 1),
            "recall_raw": recall(np.array(raw), truth), "recall_reranked": recall(np.array(ours), truth),
            "p50_raw_ms": ms(raw_t), "p50_reranked_ms": ms(ours_t)}


def report(res: dict) -> str:
    L = [f"# bench_rerank: {res['n']:,} catalog vectors of 512-d (indexes/bench_query_1M, synthetic "
         f"clustered), {res['queries']} queries, k={K}", _machine.machine_text(res["machine"]),
         f"# baseline: exact numpy search over all vectors, {res['exact_s']} s for all queries "
         "(batched, chunked reads)", "",
         f"{'type':<7} {'index':<22} {'build s':>8} {'recall@10 raw':>14} {'reranked':>9} "
         f"{'p50 raw ms':>11} {'p50 reranked ms':>16}"]
    for r in res["rows"]:
        L.append(f"{r['type']:<7} {r['index']:<22} {r['build_s']:>8} {r['recall_raw']:>14} "
                 f"{r['recall_reranked']:>9} {r['p50_raw_ms']:>11} {r['p50_reranked_ms']:>16}")
    L += ["", "raw = the FAISS index alone (top 10 by its approximate scores); reranked = the "
          "engine's search_images: a pool of max(100, 10k) candidates re-scored with the "
          "catalog's exact vectors (one SQLite read per query). recall@10 = overlap with the "
          "exact top 10. p50 reranked is search_images whole: it also reads the hits' paths "
          "from the catalog, which a search needs anyway."]
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "indexes" / "bench_query_1M")
    ap.add_argument("--types", default="ivfsq,ivfpq")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    if not (args.root / "catalog.sqlite").is_file():
        raise SystemExit(f"{args.root} not found: run benchmarks/bench_query.py first")
    from mmsearch.store import Store

    store = Store.open(args.root, create=False)
    rng = np.random.default_rng(0)
    all_ids = store.read.all_image_ids()
    _, base = store.image_vectors(rng.choice(all_ids, args.queries, replace=False))
    queries = base + 0.02 * rng.standard_normal(base.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    t = time.perf_counter()
    truth = exact_top(store, queries)
    res: dict = {"benchmark": "bench_rerank", "n": int(all_ids.size), "queries": args.queries,
                 "machine": _machine.machine_info(), "exact_s": round(time.perf_counter() - t, 1),
                 "command": " ".join(["python"] + sys.argv), "rows": []}
    for kind in [t for t in args.types.split(",") if t]:
        print(f"  [{time.strftime('%H:%M:%S')}] {kind}", file=sys.stderr, flush=True)
        res["rows"].append(measure(store, kind, queries, truth))
    store.close()
    res["machine"]["load_avg_end"] = _machine.load_avg()
    _machine.write_results("rerank", report(res), res)
    print(report(res))


if __name__ == "__main__":
    main()
