"""The Ray runner against the local runner, and a FAISS index built in parts against one process.

    python benchmarks/bench_ray.py                         # 256 Flickr photos, ViT-B-32; 1M vectors
    python benchmarks/bench_ray.py --photos 1000 --vectors 10000000 --shards 100

1. Ingest: the same Flickr photos indexed by `Engine.index` (local runner) and by
   `Engine.index(runner="ray")` on a local Ray started once beforehand (as a cluster
   would already run), into an index stored in the catalog and one stored as shards:
   images/s end to end, the Ray run's fixed start cost (a run of 16 photos), the
   largest difference between the two runners' vectors, the catalogs' sizes.
2. Build: synthetic unit vectors (512-d) written as clip-retrieval shards (float16
   npy + parquet ids, made once under indexes/bench-data/), then for each index type a
   trained index (trained once, on the driver) filled (a) in one process, shard after
   shard, and (b) in Ray tasks, one part per shard, merged in memory (and for IVF also
   merged on disk with merge_ondisk). Each build runs in its own process: seconds,
   peak RSS of the building process (and of the whole Ray process tree, sampled), and
   whether 100 queries return the same ids and scores.
Random weights (--pretrained none) by default: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ingest import DATA, flickr_set  # noqa: E402
from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

DIM = 512
QUERIES = 100


def _vectors(engine) -> dict[str, np.ndarray]:
    ids, vecs = engine.store.image_vectors()
    paths = engine.store.read.image_paths(ids)
    return {Path(paths[int(i)]).name: v for i, v in zip(ids, vecs)}


def ingest(args: argparse.Namespace) -> dict:
    """Local runner, then the Ray runner on a Ray started once: images/s and vectors."""
    import ray

    from mmsearch import Engine

    home = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    opts = {"home": home, "model": args.model, "pretrained": args.pretrained}
    out: dict = {"photos": args.photos, "model": args.model, "ray_cpus": args.ray_cpus}
    try:
        folder, small = flickr_set(args.photos), flickr_set(16)
        with Engine.open("local", **opts) as e:
            rep = e.index([folder])
            out["local_s"], out["local_ips"] = rep.seconds, rep.images_per_second
            local = _vectors(e)
        t = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=1 << 30)
        out["ray_init_s"] = time.perf_counter() - t
        for name in ("ray_cold_16_s", "ray_16_s"):  # workers start (imports), then warm
            with Engine.open(name.replace("_", "-"), **opts) as e:
                out[name] = e.index([small], runner="ray").seconds
        with Engine.open("ray", **opts) as e:
            rep = e.index([folder], runner="ray", storage="catalog")
            out["ray_s"], out["ray_ips"] = rep.seconds, rep.images_per_second
            got = _vectors(e)
        out["max_abs_diff"] = float(max(np.abs(got[k] - v).max() for k, v in local.items()))
        out["same_files"] = sorted(got) == sorted(local)
        with Engine.open("ray-shards", **opts) as e:
            rep = e.index([folder], runner="ray", storage="shards")
            out["shards_s"], out["shards_ips"] = rep.seconds, rep.images_per_second
            got = _vectors(e)
        # (closed: the write-ahead log is checkpointed into the file)
        out["shards_catalog_bytes"] = (home / "ray-shards" / "catalog.sqlite").stat().st_size
        out["local_catalog_bytes"] = (home / "local" / "catalog.sqlite").stat().st_size
        out["shards_max_abs_diff"] = float(max(np.abs(got[k] - v).max() for k, v in local.items()))
        out["shards_same_files"] = sorted(got) == sorted(local)
        ray.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    out["ratio"] = out["ray_ips"] / out["local_ips"]
    out["shards_ratio"] = out["shards_ips"] / out["local_ips"]
    steady = (args.photos - 16) / max(out["ray_s"] - out["ray_16_s"], 1e-9)
    out["ray_steady_ips"] = steady
    return out


# -- the build half ----------------------------------------------------------------------

def shard_set(n: int, shards: int) -> list[tuple[Path, Path]]:
    """n random unit vectors as clip-retrieval shards (made once): (npy, parquet) pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = DATA / f"ray-shards-{n}-{shards}"
    pairs = [(folder / "img_emb" / f"img_emb_{k}.npy", folder / "metadata" / f"metadata_{k}.parquet")
             for k in range(shards)]
    if all(m.is_file() for _, m in pairs):
        return pairs
    for d in ("img_emb", "metadata"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for k, (npy, meta) in enumerate(pairs):
        rows = min(per, n - k * per)
        x = np.random.default_rng(k).standard_normal((rows, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(npy, x.astype(np.float16))
        ids = np.arange(k * per, k * per + rows, dtype=np.int64) + 1
        pq.write_table(pa.table({"id": ids, "image_path": [f"img_{i}.jpg" for i in ids]}), meta)
    return pairs


def train(factory: str, pairs: list[tuple[Path, Path]], n: int, out: Path) -> float:
    """Train ``factory`` once on a sample of the shards (as a build would); saves the blob."""
    from mmsearch.distributed.shards import read_vectors
    from mmsearch.store import sharded
    from mmsearch.store.vectors import plan_index

    plan = plan_index(factory, n, DIM)
    t = time.perf_counter()
    sample = None
    if plan.needs_training:
        per = -(-plan.train_size // len(pairs))
        sample = np.vstack([read_vectors(*p)[1][:per] for p in pairs])
    np.save(out, sharded.trained(plan, sample))
    return time.perf_counter() - t


def child(args: argparse.Namespace) -> None:
    """One build in this process (--child single|sharded|ondisk); prints a JSON line."""
    from mmsearch.distributed.shards import read_vectors
    from mmsearch.store import sharded

    pairs = [tuple(Path(p) for p in pair.split(",")) for pair in args.pairs]
    blob = np.load(args.blob)
    queries = read_vectors(*pairs[0])[1][:QUERIES]
    sampler = _TreeRss()
    t = time.perf_counter()
    info: dict = {}
    if args.child == "single":
        index = sharded.deserialize(blob)
        for npy, meta in pairs:
            index.add(*read_vectors(npy, meta))
    else:
        import ray

        from mmsearch.distributed.build import build_from_shards

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store)
        info["ray_init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        on_disk = Path(args.out).with_suffix(".faiss") if args.child == "ondisk" else None
        index = build_from_shards(ray, pairs, blob, on_disk=on_disk)
    info["build_s"] = time.perf_counter() - t
    res = index.search(queries, 10)
    info["search_s"] = time.perf_counter() - t - info["build_s"]
    info["ntotal"] = index.ntotal
    info["peak_rss_mib"] = _status_mib("self", "VmHWM")  # (ru_maxrss survives exec)
    info["tree_peak_rss_mib"] = sampler.stop()
    np.savez(args.out, ids=res.ids, scores=res.scores)
    print(json.dumps(info), flush=True)


class _TreeRss:
    """Peak summed RSS of this process and its descendants (Ray's workers), sampled."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import os

        me = os.getpid()
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(me)))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return out


def _rss(pid: int) -> float:
    return _status_mib(str(pid), "VmRSS")


def _status_mib(pid: str, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def build(args: argparse.Namespace) -> list[dict]:
    pairs = shard_set(args.vectors, args.shards)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-build-", dir=DATA))
    rows = []
    try:
        for factory in args.factories.split(";"):
            blob = tmp / "trained.npy"
            row = {"factory": factory, "train_s": train(factory, pairs, args.vectors, blob)}
            modes = ["single", "sharded"] + (["ondisk"] if factory.startswith("IVF") else [])
            for mode in modes:
                row[mode] = _run_child(args, mode, pairs, blob, tmp / f"{mode}.npz")
            ref = np.load(tmp / "single.npz")
            for mode in modes[1:]:
                got = np.load(tmp / f"{mode}.npz")
                row[mode]["same_ids"] = bool((got["ids"] == ref["ids"]).all())
                row[mode]["max_score_diff"] = float(np.abs(got["scores"] - ref["scores"]).max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _run_child(args, mode: str, pairs, blob: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--blob", str(blob), "--out", str(out),
           "--ray-cpus", str(args.ray_cpus), "--object-store", str(args.object_store),
           "--pairs", *[f"{n},{m}" for n, m in pairs]]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{mode} build failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def report(info: dict, ing: dict | None, rows: list[dict]) -> str:
    lines = ["# bench_ray: the Ray runner vs the local runner; a FAISS index built in parts",
             machine_text(info), ""]
    if ing:
        lines += [f"ingest: {ing['photos']} Flickr photos, {ing['model']} (random weights), "
                  f"local Ray with {ing['ray_cpus']} logical CPUs (ray.init {ing['ray_init_s']:.1f} s, "
                  "not counted)",
                  f"  local runner   {ing['local_ips']:6.1f} images/s ({ing['local_s']:.1f} s)",
                  f"  Ray runner     {ing['ray_ips']:6.1f} images/s ({ing['ray_s']:.1f} s) = "
                  f"{ing['ratio']:.2f}x the local runner (storage catalog)",
                  f"  Ray runner     {ing['shards_ips']:6.1f} images/s ({ing['shards_s']:.1f} s) = "
                  f"{ing['shards_ratio']:.2f}x the local runner (storage shards); catalog "
                  f"{ing['shards_catalog_bytes'] / 1e6:.2f} MB vs {ing['local_catalog_bytes'] / 1e6:.2f} "
                  f"MB locally; largest |vector difference| {ing['shards_max_abs_diff']:.2e} "
                  f"(float16), same files: {ing['shards_same_files']}",
                  f"  Ray, 16 photos {ing['ray_16_s']:.1f} s (the fixed cost of a run: the actor "
                  f"starts, imports torch + open_clip, loads the model; {ing['ray_cold_16_s']:.1f} s "
                  f"for the first run, whose decode workers import them too); beyond it "
                  f"{ing['ray_steady_ips']:.1f} images/s",
                  f"  storage catalog: same files: {ing['same_files']}; largest |vector difference| "
                  f"{ing['max_abs_diff']:.2e}", ""]
    for row in rows:
        lines.append(f"build {row['factory']}: {rows and row['single']['ntotal']} vectors, "
                     f"trained once on the driver in {row['train_s']:.1f} s")
        for mode in ("single", "sharded", "ondisk"):
            if mode in row:
                r = row[mode]
                same = "" if mode == "single" else \
                    f", same ids as one process: {r['same_ids']} (|score diff| {r['max_score_diff']:.1e})"
                lines.append(f"  {mode:<8} build {r['build_s']:6.1f} s, peak RSS {r['peak_rss_mib']:7.0f} MiB "
                             f"(process tree {r['tree_peak_rss_mib']:7.0f} MiB){same}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=256)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--factories", default="Flat;IVF256,Flat")
    p.add_argument("--object-store", type=int, default=3 << 30)
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--child", choices=("single", "sharded", "ondisk"))
    p.add_argument("--blob")
    p.add_argument("--out")
    p.add_argument("--pairs", nargs="*")
    args = p.parse_args()
    if args.child:
        return child(args)
    info = machine_info()
    ing = None if args.skip_ingest else ingest(args)
    if ing:
        print(json.dumps(ing), flush=True)
    rows = [] if args.skip_build else build(args)
    info["load_avg_end"] = load_avg()
    text = report(info, ing, rows)
    print(text)
    write_results("ray", text, {"machine": info, "ingest": ing, "build": rows})


if __name__ == "__main__":
    main()
