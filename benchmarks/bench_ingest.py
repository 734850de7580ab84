"""Ingest throughput: mmsearch end to end against a naive loop and the model-only rate.

    python benchmarks/bench_ingest.py                       # ViT-B-32, random weights
    python benchmarks/bench_ingest.py --pretrained /path/to/ViT-B-32.pt --n 1000
    python benchmarks/bench_ingest.py --device cuda --n 1000 --big 0 --batch-size 256 --workers 16
    python benchmarks/bench_ingest.py --photos DIR --big-dir DIR --decoders threads,processes,nvjpeg
    python benchmarks/bench_ingest.py --runtimes torch,onnx,onnx-int8 --n 200 [--recall-model \
        tinyclip.json --recall-pretrained tinyclip.pt]   # -> results/ingest_runtimes.*
    python benchmarks/bench_ingest.py --runtimes torch,onnx,onnx-int8 --rounds 0 \
        --recall-train 600 --stem ingest_runtimes_recall   # -> results/ingest_runtimes_recall.*
    PYTHONPATH=.venv/ort-openvino python benchmarks/bench_ingest.py --stem ingest_openvino \
        --runtimes torch,onnx,onnx-int8,onnx@openvino,onnx-int8@openvino --n 200 --rounds 3

Sets: real Flickr8k photos from ../shared (about 500x375) and the same photos
re-encoded as 12-megapixel JPEGs (4000x3000, quality 90), the size phones make
(or the folders --photos / --big-dir name). For each set it measures images/s of
  * model only  - encode_image on ready float32 tensors from the CPU at the same batch size,
  * on device   - encode_image on uint8 batches already on the model's device, normalised
                  there (the ceiling for an input pipeline that feeds uint8),
  * naive       - one process: PIL open + open_clip preprocess + batched encode_image,
  * mmsearch    - `Engine.index` on a fresh index: walk, hash, decode, embed, store
                  (the decoder `auto` picks),
  * embed_paths - decoding + model alone, once per decoder in --decoders,
with per-stage seconds, and the peak RSS of mmsearch at n and 2n images.
Speed does not depend on the weights, so random weights (--pretrained none) are fine.

``--runtimes`` compares who runs the image tower instead (``--runtime``, models/onnxtower.py),
on the CPU, torch first as the baseline, in one process and alternating round by round
(``--rounds``) so that they share the machine's load: the export time (once, into a fresh
home), the images/s of ``Engine.index`` on a fresh index as the ``index`` summary prints
it, the model alone on one batch, and the cosine of each photo's vector to torch's. With
``--recall-model``/``--recall-pretrained`` (the trained tiny test model, say, or a
``mmsearch finetune`` output folder) it also runs ``mmsearch eval``'s Recall@1/5/10 on
flickr8k-1k per runtime. ``--recall-train STEPS`` makes that model first: the tiny test
model, at chance level on photos, fine-tuned by ``mmsearch finetune --full`` on a seeded
640 of the 1,000 photos (160 more pick the step), then measured per runtime on the 200
held-out photos (generalisation) and on the 640 it was trained on (memorised: a ranking far
from chance for int8 to move), with the cosine of every photo's vector to torch's.
``--rounds 0`` skips the speed rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _machine  # noqa: E402
from _machine import header  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k" / "images"
DATA = ROOT / "indexes" / "bench-data"


def flickr_set(n: int) -> Path:
    """A folder of symlinks to the first n Flickr photos."""
    folder = DATA / f"flickr-{n}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for src in sorted(FLICKR.glob("*.jpg"))[:n]:
            (folder / src.name).symlink_to(src)
    return folder


def big_set(n: int) -> Path:
    """The first n Flickr photos upscaled to 4000x3000 JPEGs (made once, cached)."""
    from PIL import Image

    folder = DATA / f"12mp-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(FLICKR.glob("*.jpg"))[:n]:
        dst = folder / src.name
        if not dst.exists():
            img = Image.open(src).convert("RGB").resize((4000, 3000), Image.BICUBIC)
            img.save(dst, quality=90)
    return folder


def model_only(emb, batch: int, n: int, on_device: bool = False) -> float:
    """encode_images on one batch, repeated: float32 from the CPU, or uint8 on the device."""
    import torch

    size = emb.image_size
    x = torch.randn(batch, 3, size, size)
    if on_device:
        x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=emb.device)
    emb.encode_images(x)  # warm-up
    batches = max(2, -(-n // batch) // 2)
    t = time.perf_counter()
    for _ in range(batches):
        emb.encode_images(x)
    return batches * batch / (time.perf_counter() - t)


def naive(emb, files: list[Path], batch: int) -> tuple[float, dict[str, float]]:
    """What popular tools do: decode, preprocess, encode, one image after another."""
    import torch
    from PIL import Image

    stages = {"decode": 0.0, "preprocess": 0.0, "model": 0.0}
    start = time.perf_counter()
    for i in range(0, len(files), batch):
        tensors = []
        for f in files[i:i + batch]:
            t0 = time.perf_counter()
            img = Image.open(f).convert("RGB")
            t1 = time.perf_counter()
            tensors.append(emb.preprocess(img))
            stages["decode"] += t1 - t0
            stages["preprocess"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        emb.encode_images(torch.stack(tensors))
        stages["model"] += time.perf_counter() - t2
    return len(files) / (time.perf_counter() - start), stages


def mmsearch_run(folder: Path, emb, args: argparse.Namespace) -> tuple[float, dict[str, dict]]:
    """Engine.index on a fresh index (images/s), then embed_paths alone per decoder."""
    from mmsearch import Engine

    home = Path(tempfile.mkdtemp(prefix="mmsearch-bench-"))
    try:
        with Engine.open("bench", home=home, model=args.model, pretrained=args.pretrained,
                         batch_size=args.batch_size, workers=args.workers, draft=args.draft,
                         device=args.device) as e:
            e._embedder = emb  # the model loaded once, outside the timed run, as naive does
            t = time.perf_counter()
            report = e.index([folder])
            rate = report.embedded / (time.perf_counter() - t)
            files = sorted(folder.iterdir())
            decoders = {d: embed_rate(e.embedder, files, d, args) for d in args.decoders}
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return rate, decoders


def vectors_vs_cpu(emb, files: list[Path], args: argparse.Namespace) -> dict:
    """The lowest cosine between this device's vectors (decoder auto) and the CPU path's
    (threads, float32) for the same weights, over ``files``."""
    from mmsearch.ingest.embed import embed_paths
    from mmsearch.models import identify, load_embedder

    cpu = load_embedder(identify(args.model, args.pretrained), "cpu")
    module = lambda e: getattr(e, "torch_model", None) or e._model  # noqa: E731
    module(cpu).load_state_dict(module(emb).state_dict())

    def vectors(e, decoder: str) -> tuple[list[Path], np.ndarray]:
        batches = list(embed_paths(e, files, batch_size=args.batch_size, draft=args.draft,
                                   decoder=decoder))
        return ([p for b in batches for p in b.paths],
                np.concatenate([b.vectors for b in batches if len(b.paths)]))

    paths, ours = vectors(emb, "auto")
    cpu_paths, theirs = vectors(cpu, "threads")
    assert paths == cpu_paths
    cos = (ours * theirs).sum(axis=1)
    return {"images": len(paths), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def decode_rate(emb, files: list[Path], decoder: str, args: argparse.Namespace) -> float:
    """Images/s of one decoder with no model: the input pipeline's own limit (batches made
    as for the model: uint8, on its device)."""
    from mmsearch.ingest import embed

    kind = embed.choose_decoder(decoder, emb)
    workers = embed.decode_workers(kind, args.workers)
    ahead = max(2 * args.batch_size, 4 * workers)
    source = embed._open_source(kind, emb, emb.image_size if args.draft else None, workers, {},
                                ahead)
    times, done = embed.StageTimes(), 0
    t = time.perf_counter()
    try:
        prepared = embed._prefetch(source.submit, files, ahead=min(ahead, getattr(source, "slots", ahead)))
        for chunk in embed._batches(prepared, args.batch_size):
            paths, _, batch = source.collate(chunk, times)
            if batch is not None and batch.dtype.is_floating_point is False:
                batch[:1, :1, :1].cpu()  # (wait for the device)
            done += len(paths)
    finally:
        source.close()
    return done / (time.perf_counter() - t)


def embed_rate(emb, files: list[Path], decoder: str, args: argparse.Namespace) -> dict:
    """embed_paths alone with one decoder: images/s and stage seconds."""
    from mmsearch.ingest.embed import StageTimes, choose_decoder, embed_paths

    times = StageTimes()
    t = time.perf_counter()
    for _ in embed_paths(emb, files, batch_size=args.batch_size, workers=args.workers,
                         draft=args.draft, times=times, decoder=decoder):
        pass
    return {"decoder": choose_decoder(decoder, emb), "ips": times.images / (time.perf_counter() - t),
            "decode_only_ips": decode_rate(emb, files, decoder, args),
            "stages_s": {"decode (summed over workers)": times.decode,
                         "prepare (summed over workers)": times.prepare,
                         "tensor decode+resize": times.gpu_decode, "model": times.model}}


def peak_rss_mb(folder: Path, args: argparse.Namespace) -> float:
    """Peak RSS of a fresh process indexing ``folder``."""
    code = (f"from mmsearch import Engine; import tempfile, resource\n"
            f"with Engine.open('b', home=tempfile.mkdtemp(), model={args.model!r}, "
            f"pretrained={args.pretrained!r}, batch_size={args.batch_size}, "
            f"draft={args.draft!r}, device={args.device!r}) as e:\n    e.index([{str(folder)!r}])\n"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_set(name: str, folder: Path, emb, args: argparse.Namespace) -> dict:
    files = sorted(folder.iterdir())
    only = model_only(emb, args.batch_size, len(files))
    on_device = model_only(emb, args.batch_size, len(files), on_device=True)
    base, base_stages = naive(emb, files[:args.naive_n or len(files)], args.batch_size)
    ours, decoders = mmsearch_run(folder, emb, args)
    return {"set": name, "images": len(files), "model_only_ips": only,
            "model_on_device_ips": on_device, "naive_ips": base, "mmsearch_ips": ours,
            "vs_naive": ours / base, "vs_model_only": ours / only,
            "vs_model_on_device": ours / on_device, "naive_stages_s": base_stages,
            "embed_paths": decoders}


def runtime_round(runtime: str, folder: Path, home: Path, name: str, args: argparse.Namespace,
                  check: list[Path]) -> dict:
    """One fresh index through ``runtime`` (``onnx@openvino``: on that --device; the CPU by
    default): the model loaded (and exported) first, untimed."""
    from mmsearch import Engine

    runtime, device = on_device(runtime)
    with Engine.open(name, home=home, model=args.model, pretrained=args.pretrained,
                     batch_size=args.batch_size, workers=args.workers, draft=args.draft,
                     device=device, runtime=runtime) as e:
        t = time.perf_counter()
        emb = e.embedder
        load_s = time.perf_counter() - t
        report = e.index([folder])
        out = {"runtime": emb.runtime.runtime, "load_s": round(load_s, 2),
               "export_s": emb.runtime.export_seconds, "note": emb.runtime.note,
               "index_ips": round(report.images_per_second, 2), "embedded": report.embedded,
               "model_only_ips": round(model_only(emb, args.batch_size, 2 * args.batch_size), 2)}
        from mmsearch.ingest.decode import load_image

        out["vectors"] = emb.encode_images(emb.collate([emb.prepare(load_image(p)) for p in check]))
    return out


def on_device(entry: str) -> tuple[str, str]:
    """``runtime[@device]`` of --runtimes -> (runtime, device); the CPU when none is named."""
    runtime, _, device = entry.partition("@")
    return runtime, device or "cpu"


def runtimes(args: argparse.Namespace) -> dict:
    """--runtimes: each runtime's export, index and model rates, torch's in the same run."""
    folder = args.photos or flickr_set(args.n)
    check = sorted(folder.iterdir())[:args.check_n]
    homes = {rt: Path(tempfile.mkdtemp(prefix=f"mmsearch-bench-{rt}-")) for rt in args.runtimes}
    rounds: dict[str, list[dict]] = {rt: [] for rt in args.runtimes}
    try:
        for r in range(args.rounds):
            for rt in args.runtimes:
                print(f"  round {r + 1}: {rt}", file=sys.stderr, flush=True)
                rounds[rt].append(runtime_round(rt, folder, homes[rt], f"r{r}", args, check))
    finally:
        for h in homes.values():
            shutil.rmtree(h, ignore_errors=True)
    ref = rounds[args.runtimes[0]][0]["vectors"]
    out = {}
    for rt, rs in rounds.items():
        cos = (rs[0]["vectors"] * ref).sum(1)
        out[rt] = {"runtime_used": rs[0]["runtime"], "export_s": rs[0]["export_s"], "note": rs[0]["note"],
                   "index_ips": [x["index_ips"] for x in rs],
                   "index_ips_median": float(np.median([x["index_ips"] for x in rs])),
                   "model_only_ips": [x["model_only_ips"] for x in rs],
                   "model_only_ips_median": float(np.median([x["model_only_ips"] for x in rs])),
                   "cosine_to_baseline_min": round(float(cos.min()), 5),
                   "cosine_to_baseline_mean": round(float(cos.mean()), 5)}
    return out


SPLIT = {"train": 640, "val": 160, "test": 200}  # --recall-train's seeded split of the 1,000


def split_json(folder: Path, seed: int = 0) -> Path:
    """flickr8k-1k's captions with a seeded split: 640 photos train, 160 ``val`` pick the
    step and the WiSE alpha, 200 ``test`` choose nothing."""
    data = json.loads((FLICKR.parent / "dataset_flickr8k_1k.json").read_text())
    order = np.random.default_rng(seed).permutation(len(data["images"]))
    names = [name for name, count in SPLIT.items() for _ in range(count)]
    if len(names) != len(order):
        sys.exit(f"expected {len(names)} photos in flickr8k-1k, found {len(order)}")
    for rank, i in enumerate(order):
        data["images"][i]["split"] = names[rank]
    path = folder / "flickr8k_1k_split.json"
    path.write_text(json.dumps(data))
    return path


def train_recall_model(args: argparse.Namespace, folder: Path) -> tuple[Path, dict]:
    """--recall-train: the tiny test model (tests/tinyclip.py) fine-tuned by `mmsearch
    finetune --full` on split_json's train photos; (the split file, what the run reported)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tinyclip

    config, checkpoint = tinyclip.train_tiny_clip(ROOT / ".pytest_cache" / "d" / "tinyclip")
    data = split_json(folder, args.recall_seed)
    cmd = ["finetune", str(data), "--images", str(FLICKR), "--out", str(folder / "finetuned"),
           "--model", str(config), "--pretrained", str(checkpoint), "--device", "cpu", "--full",
           "--lr", str(args.recall_lr), "--steps", str(args.recall_train),
           "--seed", str(args.recall_seed),
           "--reference", str(data), "--reference-images", str(FLICKR), "--json"]
    print(f"  fine-tuning the tiny test model, {args.recall_train} steps", file=sys.stderr, flush=True)
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mmsearch", *cmd], capture_output=True, text=True,
                         env={**os.environ, "MMSEARCH_HOME": str(folder / "home")})
    if run.returncode:
        sys.exit(f"mmsearch finetune failed: {run.stderr.strip()[-2000:]}")
    report = json.loads(run.stdout)
    report.pop("out")  # a temporary folder
    report["seconds"] = round(time.perf_counter() - t, 1)
    report["split_seed"] = args.recall_seed
    report["command"] = ("mmsearch finetune SPLIT.json --images flickr8k-1k/images --model "
                         "tinyclip-test.json --pretrained tinyclip-test.pt --device cpu --full "
                         f"--lr {args.recall_lr:g} --steps {args.recall_train} --seed "
                         f"{args.recall_seed} --reference "
                         "SPLIT.json --reference-images flickr8k-1k/images")
    return data, report


def recall_sets(args: argparse.Namespace, folder: Path) -> tuple[str, str | None, dict, dict]:
    """(model, pretrained, {label: dataset}, training report) for --recall-*: the whole
    flickr8k-1k, or with --recall-train its 200 held-out and 640 trained photos."""
    from mmsearch.eval.datasets import load_karpathy

    if not args.recall_train:
        pretrained = str(args.recall_pretrained) if args.recall_pretrained else None
        model = (f"local-dir:{args.recall_model}" if args.recall_model.is_dir()
                 else str(args.recall_model))
        whole = load_karpathy(FLICKR.parent / "dataset_flickr8k_1k.json", FLICKR)
        return model, pretrained, {"all photos": whole}, {}
    data, report = train_recall_model(args, folder)
    sets = {"held out (the test photos: they chose nothing; generalisation)":
            load_karpathy(data, FLICKR, split="test"),
            "trained on (the train photos: memorised, a ranking far from chance)":
            load_karpathy(data, FLICKR, split="train")}
    return f"local-dir:{folder / 'finetuned'}", None, sets, report


def image_vectors(emb, paths: list[Path], batch: int) -> np.ndarray:
    from mmsearch.ingest.decode import load_image

    return np.concatenate([emb.encode_images(emb.collate([emb.prepare(load_image(p))
                                                          for p in paths[i:i + batch]]))
                           for i in range(0, len(paths), batch)])


def recalls(args: argparse.Namespace, model: str, pretrained: str | None, sets: dict) -> dict:
    """Recall@1/5/10 per set and runtime (each runtime in a fresh home: an eval index is
    reused by model, and an index holds one precision), and the cosine of every photo's
    vector to the first runtime's."""
    from bench_finetune import chance_rsum
    from mmsearch.eval.evaluate import evaluate
    from mmsearch.models import identify, load_embedder
    from mmsearch.settings import resolve

    out = {label: {"photos": ds.n_images, "captions": ds.n_captions,
                   "chance_rsum": round(chance_rsum(ds), 1), "runtimes": {}}
           for label, ds in sets.items()}
    ref: dict[str, np.ndarray] = {}
    for rt in args.runtimes:
        print(f"  recall: {rt}", file=sys.stderr, flush=True)
        home = Path(tempfile.mkdtemp(prefix=f"mmsearch-eval-{rt}-"))
        runtime, device = on_device(rt)
        try:
            settings = resolve(home=home, model=model, device=device, pretrained=pretrained,
                               runtime=runtime)
            emb = load_embedder(identify(settings.model, settings.pretrained), device,
                                runtime=runtime, home=home)
            for label, ds in sets.items():
                res = evaluate(ds, settings=settings)
                vecs = image_vectors(emb, sorted(ds.image_paths), args.batch_size)
                cos = (vecs * ref.setdefault(label, vecs)).sum(1)
                out[label]["runtimes"][rt] = {
                    "t2i": res.t2i, "i2t": res.i2t, "rsum": round(res.rsum, 2),
                    "images_per_second": round(res.images_per_second, 1),
                    "cosine_to_baseline_min": round(float(cos.min()), 5),
                    "cosine_to_baseline_mean": round(float(cos.mean()), 5)}
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return out


def runtimes_report(res: dict) -> str:
    what = (f"{res['model']} / {res['pretrained']}, CPU, batch {res['batch_size']}, {res['n']} "
            f"Flickr photos per index, {res['rounds']} rounds alternating the runtimes"
            if res["rounds"] else f"Recall@K only (--rounds 0), CPU, batch {res['batch_size']}")
    L = [f"# bench_ingest --runtimes: {what}; baseline {res['baseline']}",
         _machine.machine_text(res["machine"])] + [""] * bool(res["runtimes"])
    base = res["runtimes"].get(res["baseline"])
    for rt, r in res["runtimes"].items():
        export = f"exported in {r['export_s']:.1f}s (once)" if r["export_s"] else "no export"
        L.append(f"  {rt:<10} index {r['index_ips_median']:6.2f} images/s {r['index_ips']} "
                 f"({r['index_ips_median'] / base['index_ips_median']:.2f}x), model alone "
                 f"{r['model_only_ips_median']:6.2f}/s ({r['model_only_ips_median'] / base['model_only_ips_median']:.2f}x), "
                 f"cosine to {res['baseline']} min {r['cosine_to_baseline_min']:.5f} mean "
                 f"{r['cosine_to_baseline_mean']:.5f} ({res['check_n']} photos); {export}"
                 + (f"; NOTE {r['note']}" if r["note"] else ""))
    if res.get("training"):
        L += training_lines(res["training"])
    for label, s in res.get("recall", {}).items():
        L += recall_lines(label, s, res["recall_model"], res["baseline"])
    L += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(L) + "\n"


def training_lines(t: dict) -> list[str]:
    log = ", ".join(f"{e['step']}: {e['heldout']['rsum']:.1f}" for e in t["training"]["log"])
    return ["", "# the model: the tiny test model (tests/tinyclip.py: a ModifiedResNet image "
            "tower at 32 px and a 2-layer text tower, pre-trained on drawn shapes) fine-tuned in "
            f"{t['seconds']:.0f} s by", f"#   {t['command']}",
            "#   SPLIT.json: flickr8k-1k's captions, photos split by a seeded permutation (seed "
            f"{t['split_seed']}) "
            "into 640 train, 160 val (pick the step and the WiSE alpha), 200 test (choose nothing)",
            f"#   val rsum {_rsum(t['before']):.1f} -> {_rsum(t['after']):.1f}, test rsum "
            f"{_rsum(t['reference_before']):.1f} -> {_rsum(t['reference_after']):.1f} (torch, the "
            f"trainer's own recall); WiSE alpha {t['alpha']:g}; {t['training']['steps']} steps, "
            f"best at {t['training']['best_step']}; val rsum by step: {log}"]


def _rsum(r: dict) -> float:
    return sum(r["text_to_image"].values()) + sum(r["image_to_text"].values())


def recall_lines(label: str, s: dict, model: str, baseline: str) -> list[str]:
    L = ["", f"# Recall@K (%) on flickr8k-1k, {label}: {s['photos']:,} photos, "
         f"{s['captions']:,} captions; model {model}; chance rsum {s['chance_rsum']:.1f}"]
    base = s["runtimes"][baseline]
    for rt, r in s["runtimes"].items():
        t2i = " ".join(f"R@{k} {v:.2f}" for k, v in r["t2i"].items())
        i2t = " ".join(f"R@{k} {v:.2f}" for k, v in r["i2t"].items())
        L.append(f"  {rt:<10} text->image {t2i} | image->text {i2t} | rsum {r['rsum']:.2f} | "
                 f"cosine to {baseline} min {r['cosine_to_baseline_min']:.5f} mean "
                 f"{r['cosine_to_baseline_mean']:.5f} ({s['photos']} photos)")
        if rt != baseline:
            L.append(f"  {'':<10} change vs {baseline}: text->image {_change(r, base, 't2i')} | "
                     f"image->text {_change(r, base, 'i2t')} | rsum {r['rsum'] - base['rsum']:+.2f}")
    return L


def _change(r: dict, base: dict, key: str) -> str:
    return " ".join(f"R@{k} {v - base[key][k]:+.2f}" for k, v in r[key].items())


def main_runtimes(args: argparse.Namespace) -> None:
    info = _machine.machine_info()
    res = {"benchmark": "bench_ingest --runtimes", "model": args.model, "pretrained": args.pretrained,
           "batch_size": args.batch_size, "n": args.n, "rounds": args.rounds, "check_n": args.check_n,
           "baseline": args.runtimes[0], "machine": info,
           "command": " ".join(["python", "benchmarks/bench_ingest.py", *sys.argv[1:]])}
    res["runtimes"] = runtimes(args) if args.rounds else {}
    if args.recall_model or args.recall_train:
        with tempfile.TemporaryDirectory(prefix="mmsearch-recall-") as tmp:
            model, pretrained, sets, res["training"] = recall_sets(args, Path(tmp))
            res["recall"] = recalls(args, model, pretrained, sets)
        res["recall_model"] = (f"tinyclip-test fine-tuned (--full, lr {args.recall_lr:g}, "
                               f"{args.recall_train} steps, seed {args.recall_seed})"
                               if args.recall_train
                               else Path(args.recall_model).stem)
        res["notes"] = recall_notes(args)
    res["machine"]["load_avg_end"] = _machine.load_avg()
    text = runtimes_report(res)
    _machine.write_results(args.stem, text, res)
    print(text)


def recall_notes(args: argparse.Namespace) -> list[str]:
    if not args.recall_train:
        return ["the tiny test model is trained on drawn shapes, not photos: on "
                "flickr8k-1k its recall is at chance level (R@10 ~1% text->image), so "
                "these rows show only whether int8 moves the ranking, not a real model's "
                "loss; the cosines are to its own torch vectors on real photos"]
    return ["held out: photos the fine-tuning never saw nor chose anything on; their recall is "
            "this tiny model's weak generalisation, above chance; trained on: the photos it was "
            "fine-tuned on, so their recall is memorisation, not generalisation -- what they "
            "measure is how much int8 moves a ranking that is far from chance",
            "int8 runs the fine-tuned model's image tower (text queries are fp32 in every row); "
            "on 200 photos one image->text R@1 hit is 0.5 points and one text->image hit 0.1; "
            "on 640 photos 0.16 and 0.03",
            "cosine: every photo of the set, its vector from each runtime against the baseline's",
            "the fine-tuning decodes photos with the JPEG draft (as `mmsearch index` does), "
            "`mmsearch eval` decodes them in full, so eval's torch recall is below the "
            "trainer's own; every runtime sees the same pixels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--n", type=int, default=256, help="Flickr-sized photos")
    parser.add_argument("--big", type=int, default=64, help="12-megapixel photos (0: skip that set)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda ... (as `mmsearch index`)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no-draft", dest="draft", action="store_false")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS at n and 2n")
    parser.add_argument("--check-vectors", type=int, default=0,
                        help="compare this many images' vectors with the CPU path's")
    parser.add_argument("--photos", type=Path, help="a folder of Flickr-sized JPEGs instead")
    parser.add_argument("--big-dir", type=Path, help="a folder of 12 MP JPEGs instead")
    parser.add_argument("--naive-n", type=int, default=0, help="naive loop on this many (0: all)")
    parser.add_argument("--decoders", type=lambda s: s.split(","), default=["auto"],
                        help="embed_paths alone with each: auto,threads,processes,nvjpeg")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--runtimes", type=lambda s: s.split(","), default=None,
                        help="compare image-tower runtimes instead, the first the baseline: "
                             "torch,onnx,onnx-int8; runtime@device for another --device than "
                             "the CPU (onnx@openvino)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--runtimes: rounds per runtime (0: recall only)")
    parser.add_argument("--check-n", type=int, default=64, help="--runtimes: photos compared")
    parser.add_argument("--recall-model", type=Path,
                        help="--runtimes: model config (or a finetune --out folder) for Recall@K")
    parser.add_argument("--recall-pretrained", type=Path, help="--runtimes: its checkpoint")
    parser.add_argument("--recall-train", type=int, default=0, metavar="STEPS",
                        help="--runtimes: fine-tune the tiny test model on flickr8k-1k first "
                             "(mmsearch finetune --full, this many steps) and measure Recall@K "
                             "on its 200 held-out and 640 trained photos")
    parser.add_argument("--recall-lr", type=float, default=1e-3, help="--recall-train's lr")
    parser.add_argument("--recall-seed", type=int, default=0,
                        help="--recall-train's seed: the split and the fine-tuning")
    parser.add_argument("--stem", default="ingest_runtimes", help="--runtimes: results file stem")
    args = parser.parse_args()
    if args.runtimes:
        return main_runtimes(args)
    if not FLICKR.is_dir() and not (args.photos and (args.big_dir or not args.big)):
        sys.exit(f"photos not found: {FLICKR} (see ../shared/README.md)")
    from mmsearch.models import identify, load_embedder

    emb = load_embedder(identify(args.model, args.pretrained), args.device)
    print(header())
    print(f"# model {args.model} / {args.pretrained}, device {emb.device}, batch {args.batch_size}, "
          f"draft {args.draft}")
    results = [bench_set("flickr (~500x375)", args.photos or flickr_set(args.n), emb, args)]
    if args.big:
        results.append(bench_set("12 MP (4000x3000)", args.big_dir or big_set(args.big), emb, args))
    for r in results:
        print_set(r)
    if args.check_vectors:
        files = sorted((args.photos or flickr_set(args.n)).iterdir())[:args.check_vectors]
        check = vectors_vs_cpu(emb, files, args)
        print(f"\nvectors vs the CPU path ({check['images']} images): min cosine "
              f"{check['min_cosine']:.5f}, mean {check['mean_cosine']:.5f}")
        results.append({"vectors_vs_cpu": check})
    if args.rss and args.big:
        rss = {n: peak_rss_mb(big_set(n), args) for n in (args.big, 2 * args.big)}
        print("\npeak RSS indexing 12 MP photos: " +
              ", ".join(f"{n} images {mb:.0f} MB" for n, mb in rss.items()))
        results.append({"peak_rss_mb_12mp": rss})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def print_set(r: dict) -> None:
    print(f"\n{r['set']}: {r['images']} images")
    print(f"  model only  {r['model_only_ips']:7.2f} images/s (float32 from the CPU)")
    print(f"  on device   {r['model_on_device_ips']:7.2f} images/s (uint8 already on the device)")
    print(f"  naive       {r['naive_ips']:7.2f} images/s   stages {_fmt(r['naive_stages_s'])}")
    print(f"  mmsearch    {r['mmsearch_ips']:7.2f} images/s   (Engine.index, decoder auto)")
    for asked, d in r["embed_paths"].items():
        print(f"  embed_paths {d['ips']:7.2f} images/s   decoder {asked} -> {d['decoder']} "
              f"(decoding alone {d['decode_only_ips']:.0f}/s), stages {_fmt(d['stages_s'])}")
    print(f"  mmsearch / naive = {r['vs_naive']:.2f}x   mmsearch / model only = "
          f"{r['vs_model_only']:.0%}   mmsearch / on device = {r['vs_model_on_device']:.0%}")


def _fmt(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in stages.items() if v)


if __name__ == "__main__":
    main()
