"""Search on a GPU machine: exact search in torch against FAISS on the CPU, and cold queries.

    python benchmarks/bench_gpu_search.py --vectors 1000000 --photos DIR --out results.json

* exact search over N x 512 unit vectors (an exact "flat" index): FAISS on the CPU, one
  query at a time, against the store's torch path (float16 matmul + top-k on the GPU,
  the candidates re-scored in float32), warm; the top-10 ids compared over 100 queries;
* a cold ``mmsearch query "red sports car"`` (a new process: start, open, encode the text,
  search, print), median of 3, with ``--device auto`` (text on the CPU) and ``--device cuda``,
  on an index of the photos in --photos made with a ViT-B-32 checkpoint file (random weights);
  and whether a library text query with ``auto`` started CUDA.

Without CUDA (a dry run on a CPU) the torch path runs on the CPU in float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import header  # noqa: E402


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors (made on the GPU when there is one: 1M x 512 in a second)."""
    import torch

    gen = torch.Generator(device="cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 1 << 17):
        rows = min(1 << 17, n - start)
        x = torch.randn(rows, dim, generator=gen, device=gen.device)
        out[start:start + rows] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    return out


def per_query_ms(search, queries: np.ndarray, repeats: int) -> float:
    """Median milliseconds of one single-query search."""
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        search(queries[i % len(queries):i % len(queries) + 1])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def exact_search(n: int, dim: int = 512) -> dict:
    """FAISS CPU vs the torch path on one exact index of ``n`` vectors."""
    import torch

    from mmsearch.store.vectors import VectorIndex

    vectors, queries = unit_vectors(n, dim, 0), unit_vectors(100, dim, 1)
    index = VectorIndex.create(dim, "flat")
    index.add(np.arange(n, dtype=np.int64), vectors)
    del vectors
    index.gpu = None
    faiss = [index.search(q[None], 10) for q in queries]
    faiss_ms = per_query_ms(lambda q: index.search(q, 10), queries, 20)
    index.gpu = 0 if torch.cuda.is_available() else None
    if index.gpu is None:  # a dry run: the torch path on the CPU, through the same hook
        from mmsearch.store import torchexact as gpu

        gpu.cuda_device, gpu.fits = (lambda setting: "cpu"), (lambda *a: True)
        index.gpu = 0
    t = time.perf_counter()
    index.search(queries[:1], 10)  # builds the device copy
    build_s = time.perf_counter() - t
    ours = [index.search(q[None], 10) for q in queries]
    torch_ms = per_query_ms(lambda q: index.search(q, 10), queries, 200)
    same = np.mean([np.array_equal(a.ids, b.ids) for a, b in zip(ours, faiss)])
    diff = max(float(np.abs(a.scores - b.scores).max()) for a, b in zip(ours, faiss))
    return {"vectors": n, "dim": dim, "faiss_cpu_ms": faiss_ms, "torch_ms": torch_ms,
            "torch_device": str(index._gpu[1].device), "device_copy_s": build_s,
            "same_top10": float(same), "max_score_diff": diff}


def make_checkpoint(work: Path) -> Path:
    """ViT-B-32 with random weights, saved as a file (text queries then skip open_clip)."""
    import torch

    from mmsearch.models import identify, load_embedder

    path = work / "vit-b-32-random.pt"
    if not path.exists():
        emb = load_embedder(identify("ViT-B-32", "none"), "cpu")
        module = getattr(emb, "torch_model", None) or emb._model
        torch.save(module.state_dict(), path)
    return path


def cold_queries(photos: Path, work: Path, runs: int = 3) -> dict:
    """Seconds from process start to printed hits, median of ``runs``, per --device."""
    from mmsearch import Engine

    ckpt = make_checkpoint(work)
    home = work / "home"
    with Engine.open("cold", home=home, model="ViT-B-32", pretrained=str(ckpt)) as engine:
        engine.index([photos])
    import torch

    out: dict = {}
    for device in ("auto", "cuda") if torch.cuda.is_available() else ("auto",):
        cmd = [sys.executable, "-m", "mmsearch", "query", "red sports car", "-k", "5",
               "--home", str(home), "-i", "cold", "--device", device]
        times = []
        for _ in range(runs if device == "auto" else 1):
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if done.returncode:
                out[f"error_{device}"] = done.stderr.strip().splitlines()[-1:]
        out[f"cold_s_{device}"] = statistics.median(times)
    probe = ("import torch; from mmsearch import Engine\n"
             f"with Engine.open('cold', home={str(home)!r}) as e: e.search('red sports car', k=5)\n"
             "print(torch.cuda.is_initialized())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    out["cuda_started_by_text_query"] = done.stdout.strip() or done.stderr.strip()[-200:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--photos", type=Path, help="index these for the cold query (skip: none)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mmsearch-gpu-search-"))
    work.mkdir(parents=True, exist_ok=True)
    print(header())
    result: dict = {"exact": exact_search(args.vectors)}
    e = result["exact"]
    print(f"exact search, {e['vectors']:,} x {e['dim']}: FAISS CPU {e['faiss_cpu_ms']:.2f} ms/query, "
          f"torch on {e['torch_device']} {e['torch_ms']:.3f} ms/query (device copy {e['device_copy_s']:.1f} s); "
          f"same top-10 {e['same_top10']:.0%}, max score diff {e['max_score_diff']:.1e}")
    if args.photos:
        result["cold"] = cold_queries(args.photos, work)
        print("cold `mmsearch query`: " + ", ".join(f"{k} {v}" for k, v in result["cold"].items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
