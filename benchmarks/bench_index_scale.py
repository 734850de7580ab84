"""Index scale: build time, memory per vector, QPS and recall@10 against exact search.

    python benchmarks/bench_index_scale.py --n 1000000 [--dim 512] \
        [--types flat,hnsw,ivf,ivfsq,ivfpq] [--queries 200] [--stem index_scale_1M]

Data: a clustered synthetic distribution (real embeddings at this scale need
pretrained weights and millions of photos). ``--clusters`` Gaussian
clusters with log-normal sizes; centres and within-cluster noise are drawn from
one anisotropic Gaussian whose per-direction variance falls as 1/(j+1) (like the
decaying PCA spectrum of real embeddings), in randomly rotated axes; a point is
``normalise(centre + spread * noise)`` with E|noise| = 1, so it lies at cosine
~1/sqrt(1+spread^2) from its centre. Queries are fresh draws from the same
mixture (not in the database). Everything is generated in deterministic chunks
and never held whole (10M x 512 float32 is 20 GB).

For each type: the vectors are added in chunks to an index trained on the first
``train_size(n)`` points (what the engine trains on), then saved to
``indexes/bench_scale_<n>/``; a fresh child process then measures the index as
the engine would open it (memory-mapped and read whole), QPS at 1 thread and at
all threads over a sweep of search efforts, and recall@10 against the exact top
10 (chunked brute force over the same data). The exact QPS is the Flat index's
in the same run; at sizes where Flat is skipped, it is extrapolated from the
Flat result of a smaller run (labelled so) and the chunked brute force's own
throughput is given as a measured lower bound.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
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


# -- data ---------------------------------------------------------------------------
class Mixture:
    """Deterministic clustered unit vectors, generated chunk by chunk."""

    def __init__(self, dim: int, clusters: int, spread: float, seed: int) -> None:
        self.dim, self.clusters, self.spread, self.seed = dim, clusters, spread, seed
        rng = np.random.default_rng([seed, 0])
        self.scale = (1.0 / np.arange(1, dim + 1)).astype(np.float32)
        self.scale = np.sqrt(self.scale / self.scale.sum()).astype(np.float32)  # E|scale*z|^2 = 1
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.rotation = q.astype(np.float32)
        centres = self._anisotropic(rng, clusters)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        weights = np.exp(rng.standard_normal(clusters))
        self.cdf = np.cumsum(weights / weights.sum())

    def describe(self) -> str:
        return (f"{self.clusters} Gaussian clusters, log-normal(0,1) cluster sizes, anisotropic "
                f"(variance of direction j ~ 1/(j+1), random rotation), spread {self.spread} "
                f"(cos to centre ~{1 / math.sqrt(1 + self.spread ** 2):.2f}), L2-normalised, "
                f"seed {self.seed}")

    def _anisotropic(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.dim), dtype=np.float32) * self.scale
        return z @ self.rotation.T

    def draw(self, stream: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, stream])
        which = np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.clusters - 1)
        x = self.centres[which] + self.spread * self._anisotropic(rng, n)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, i: int, size: int, n: int) -> np.ndarray:
        """Rows [i*size, min(n, (i+1)*size)) of the database."""
        return self.draw(i, min(size, n - i * size))

    def queries(self, nq: int) -> np.ndarray:
        rng_stream = (1 << 31) - 1  # never a database chunk
        return self.draw(rng_stream, nq)


def chunks(n: int, size: int):
    for i in range(math.ceil(n / size)):
        yield i, i * size, min(n, (i + 1) * size)


# -- ground truth ---------------------------------------------------------------------
def ground_truth(mix: Mixture, n: int, size: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact top-K ids and scores by chunked brute force; and the seconds spent searching."""
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.full((len(q), K), -1, np.int64)
    searching = 0.0
    for i, lo, hi in chunks(n, size):
        x = mix.chunk(i, size, n)
        t = time.perf_counter()
        s = q @ x.T
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + lo], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        searching += time.perf_counter() - t
        progress(f"exact ground truth {hi:,}/{n:,}")
    return best_i, best_s, searching


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- building -------------------------------------------------------------------------
def build(mix: Mixture, n: int, size: int, kind: str, path: Path, ntrain: int) -> dict:
    from mmsearch.store.vectors import VectorIndex, factory_string

    desc = factory_string(kind, n, mix.dim)
    rss0 = _machine.rss_mib()
    t0 = time.perf_counter()
    import faiss

    train, parts = None, []
    if not faiss.index_factory(mix.dim, desc, faiss.METRIC_INNER_PRODUCT).is_trained:
        have = 0
        for i, lo, hi in chunks(n, size):
            if have >= ntrain:
                break
            parts.append(mix.chunk(i, size, n)[: ntrain - have])
            have += len(parts[-1])
        train = np.concatenate(parts)
    gen = time.perf_counter() - t0
    t = time.perf_counter()
    index = VectorIndex.create(mix.dim, kind, expected=n, train=train)
    train_s = time.perf_counter() - t
    ntrained = 0 if train is None else len(train)
    del train, parts
    add_s = 0.0
    for i, lo, hi in chunks(n, size):
        x = mix.chunk(i, size, n)
        t = time.perf_counter()
        index.add(np.arange(lo, hi, dtype=np.int64), x)
        add_s += time.perf_counter() - t
        progress(f"{kind}: added {hi:,}/{n:,} ({add_s:.0f}s)")
    peak = _machine.rss_mib() - rss0
    t = time.perf_counter()
    index.save(path)
    save_s = time.perf_counter() - t
    return {"type": kind, "factory": desc, "described": index.description, "train_points": ntrained,
            "train_s": round(train_s, 2), "add_s": round(add_s, 2),
            "build_s": round(train_s + add_s, 2), "train_sample_gen_s": round(gen, 2),
            "save_s": round(save_s, 2), "build_rss_delta_mib": round(peak, 1),
            "file_bytes": path.stat().st_size}


# -- measuring (in a fresh child process) --------------------------------------------------
def measure(path: Path, gt_path: Path, efforts: list[int] | None, threads: int) -> dict:
    import faiss

    from mmsearch.store.vectors import VectorIndex, default_effort

    data = np.load(gt_path)
    q, truth = data["queries"], data["ids"]
    out: dict = {}
    # 1. opened memory-mapped, as a query process would
    rss0 = _machine.rss_mib()
    t = time.perf_counter()
    mapped = VectorIndex.load(path, mmap=True)
    out["open_mmap_s"] = round(time.perf_counter() - t, 4)
    out["mmap_active"] = mapped.mapped
    out["open_mmap_rss_mib"] = round(_machine.rss_mib() - rss0, 1)
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    mapped.search(q[:1], K)
    out["first_query_after_mmap_s"] = round(time.perf_counter() - t, 4)
    del mapped
    gc.collect()
    # 2. read whole: its memory is the index's memory
    rss0 = _machine.rss_mib()
    t = time.perf_counter()
    index = VectorIndex.load(path)
    out["open_read_s"] = round(time.perf_counter() - t, 3)
    out["rss_mib"] = round(_machine.rss_mib() - rss0, 1)
    out["ntotal"] = index.ntotal
    default = default_effort(index._index)
    out["default_effort"] = default
    sweep = [None] if default is None else sorted(set((efforts or []) + [default]))
    rows = []
    for effort in sweep:
        row = {"effort": effort, "default": effort == default}
        for nt in sorted({1, threads}):
            faiss.omp_set_num_threads(nt)
            index.search(q[:5], K, effort=effort)  # warm
            t = time.perf_counter()
            got = index.search(q, K, effort=effort).ids
            row[f"qps_{nt}t"] = round(len(q) / (time.perf_counter() - t), 2)
        row["recall@10"] = round(recall(got, truth), 4)
        if effort == default:  # one query at a time, as a user's search runs
            faiss.omp_set_num_threads(1)
            lat = []
            for i in range(min(len(q), 100)):
                t = time.perf_counter()
                index.search(q[i:i + 1], K, effort=effort)
                lat.append(time.perf_counter() - t)
            row["latency_1t_p50_ms"] = round(float(np.percentile(lat, 50)) * 1e3, 3)
            row["latency_1t_p99_ms"] = round(float(np.percentile(lat, 99)) * 1e3, 3)
        rows.append(row)
        progress(f"{path.stem}: effort {effort}: recall@10 {row['recall@10']:.3f}, "
                 f"{row['qps_1t']:.1f} QPS (1 thread)")
    out["sweep"] = rows
    return out


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / K for a, b in zip(got, truth)]))


# -- report -----------------------------------------------------------------------------
def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def report(res: dict) -> str:
    n, dim = res["n"], res["dim"]
    lines = [f"# bench_index_scale: n={n:,} vectors, dim={dim}, {res['queries']} queries, k={K}",
             _machine.machine_text(res["machine"]),
             f"# data: {res['distribution']}",
             f"# exact ground truth: chunked numpy brute force, {res['gt_search_s']:.1f}s of search "
             f"for {res['queries']} queries = {res['gt_qps']:.2f} QPS (all threads, batch, data "
             "generated on the fly; excluded from that time)",
             f"# exact baseline for the ratios: {res['baseline']['what']}",
             f"# the engine's automatic choice at this size (factory_string('auto', n, dim)): "
             f"{res.get('auto')}; training sample: vectors.train_size(n) = {res.get('train_size'):,} "
             "(the first vectors generated: an i.i.d. sample)", ""]
    head = (f"{'type':<7} {'factory':<24} {'build s':>8} {'(train':>7} {'add)':>7} "
            f"{'file B/vec':>10} {'RSS B/vec':>9} {'open read':>9} {'open mmap':>9} "
            f"{'effort':>6} {'recall@10':>9} {'QPS 1t':>8} {'QPS all':>8} {'x exact':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7}")
    lines += [head, "-" * len(head)]
    base = res["baseline"]["qps_1t"]
    for r in res["types"]:
        m = r.get("measure")
        if m is None:
            lines.append(f"{r['type']:<7} {r.get('factory', ''):<24} skipped: {r.get('skipped')}")
            continue
        for j, row in enumerate(m["sweep"]):
            first = j == 0
            eff = "-" if row["effort"] is None else str(row["effort"]) + ("*" if row["default"] else "")
            lines.append(
                (f"{r['type']:<7} {r['factory']:<24} {r['build_s']:>8.1f} {r['train_s']:>7.1f} "
                 f"{r['add_s']:>7.1f} {r['file_bytes'] / n:>10.1f} "
                 f"{m['rss_mib'] * 2**20 / n:>9.1f} {m['open_read_s']:>8.3f}s {m['open_mmap_s']:>8.3f}s"
                 if first else " " * 99)
                + f" {eff:>6} {row['recall@10']:>9.3f} {row['qps_1t']:>8.1f} "
                  f"{row.get('qps_' + str(res['threads']) + 't', row['qps_1t']):>8.1f} "
                  f"{row['qps_1t'] / base:>7.1f} "
                  f"{row.get('latency_1t_p50_ms', float('nan')):>7.2f} "
                  f"{row.get('latency_1t_p99_ms', float('nan')):>7.2f}")
    lines += ["", "columns: build = train + add (s); file B/vec = index file size / n; RSS B/vec = "
              "resident memory added by reading the file whole / n; open read / open mmap = "
              "VectorIndex.load() without / with mmap=True (fresh process, file in page cache); "
              "effort = nprobe (IVF) or efSearch (HNSW), * = the default; recall@10 = overlap "
              "of the top 10 with the exact top 10; QPS = a batch of all queries at 1 thread "
              f"and at {res['threads']} threads; x exact = QPS (1 thread) / exact QPS (1 thread); "
              "p50/p99 = one query at a time, 1 thread, default effort. RSS can undercount "
              "a little where the allocator reuses memory freed by the mmap pass before it."]
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--types", default="flat,hnsw,ivf,ivfsq,ivfpq",
                    help="named types (flat, hnsw, ivf, ivfsq, ivfpq, auto) or FAISS factory strings, "
                         "separated by ';' when a factory string holds commas")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--spread", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--ivf-efforts", default="4,8,16,32,64,128,256")
    ap.add_argument("--hnsw-efforts", default="16,32,64,128,256")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stem", default=None, help="results file stem (default index_scale_<n>)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--flat-from", type=Path, default=None,
                    help="a smaller run's JSON whose Flat QPS is extrapolated (when flat is not run)")
    ap.add_argument("--keep", action="store_true", help="keep the index files")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report")
    ap.add_argument("--renote", type=Path, default=None,
                    help="rewrite a results JSON's report with --note lines added (no measuring)")
    ap.add_argument("--measure", nargs=4, metavar=("INDEX", "GT", "EFFORTS", "THREADS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.renote:
        res = json.loads(args.renote.read_text())
        res["notes"] = list(dict.fromkeys(res.get("notes", []) + args.note))
        _machine.write_results(args.renote.stem, report(res), res)
        return
    if args.measure:
        idx, gt, efforts, threads = args.measure
        print(json.dumps(measure(Path(idx), Path(gt), [int(e) for e in efforts.split(",") if e],
                                 int(threads))))
        return

    from mmsearch.store.vectors import factory_string, train_size

    n, dim = args.n, args.dim
    label = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (f"{n // 1000}k" if n % 1000 == 0 else str(n))
    stem = args.stem or f"index_scale_{label}"
    work = args.workdir or ROOT / "indexes" / f"bench_scale_{label}"
    work.mkdir(parents=True, exist_ok=True)
    info = _machine.machine_info()
    mix = Mixture(dim, args.clusters, args.spread, args.seed)
    q = mix.queries(args.queries)
    res: dict = {"benchmark": "bench_index_scale", "n": n, "dim": dim, "queries": args.queries,
                 "k": K, "threads": args.threads, "machine": info, "distribution": mix.describe(),
                 "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "types": [],
                 "notes": list(args.note)}
    progress(f"ground truth over {n:,} x {dim}")
    truth, truth_s, gt_search = ground_truth(mix, n, args.chunk, q)
    res["gt_search_s"], res["gt_qps"] = round(gt_search, 2), round(len(q) / gt_search, 3)
    gt_path = work / "ground_truth.npz"
    np.savez(gt_path, queries=q, ids=truth, scores=truth_s)
    res["auto"], res["train_size"] = factory_string("auto", n, dim), train_size(n, "auto", dim)
    kinds = [t for t in (args.types.split(";") if ";" in args.types else args.types.split(",")) if t]
    for kind in kinds:
        desc = factory_string(kind, n, dim)
        ntrain = train_size(n, kind, dim)
        path = work / (kind.replace(",", "_").replace("(", "").replace(")", "") + ".faiss")
        progress(f"building {kind} = {desc} (training on {ntrain:,})")
        try:
            row = build(mix, n, args.chunk, kind, path, ntrain)
        except MemoryError as exc:
            res["types"].append({"type": kind, "factory": desc, "skipped": f"out of memory: {exc}"})
            continue
        gc.collect()
        efforts = args.hnsw_efforts if desc.startswith("HNSW") else args.ivf_efforts
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), str(gt_path), efforts, str(args.threads)],
            capture_output=True, text=True)
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            raise SystemExit(f"measuring {kind} failed")
        sys.stderr.write(child.stderr)
        row["measure"] = json.loads(child.stdout.strip().splitlines()[-1])
        res["types"].append(row)
        if not args.keep:
            path.unlink()
        _save(res, stem, args)
    _save(res, stem, args, final=True)
    print(report(res))


def _baseline(res: dict, args: argparse.Namespace) -> dict:
    flat = next((r for r in res["types"] if r.get("factory") == "Flat" and "measure" in r), None)
    if flat is not None:
        row = flat["measure"]["sweep"][0]
        return {"what": f"Flat measured in this run: {row['qps_1t']:.2f} QPS at 1 thread",
                "qps_1t": row["qps_1t"], "measured": True}
    if args.flat_from and args.flat_from.is_file():
        small = json.loads(args.flat_from.read_text())
        f = next(r for r in small["types"] if r.get("factory") == "Flat")
        qps = f["measure"]["sweep"][0]["qps_1t"] * small["n"] / res["n"]
        return {"what": f"Flat NOT run at this size (its {res['n'] * res['dim'] * 4 / 2**30:.0f} GiB "
                        f"of float32 would not fit beside the rest); EXTRAPOLATED from the Flat "
                        f"measured at n={small['n']:,} ({f['measure']['sweep'][0]['qps_1t']:.2f} QPS "
                        f"at 1 thread, scaled by n): {qps:.3f} QPS at 1 thread",
                "qps_1t": qps, "measured": False}
    return {"what": f"chunked brute force throughput in this run (all threads, batch): "
                    f"{res['gt_qps']:.3f} QPS", "qps_1t": res["gt_qps"], "measured": True}


def _save(res: dict, stem: str, args: argparse.Namespace, final: bool = False) -> None:
    if final:
        res["machine"]["load_avg_end"] = _machine.load_avg()
    res["baseline"] = _baseline(res, args)
    _machine.write_results(stem, report(res), res)


if __name__ == "__main__":
    main()
