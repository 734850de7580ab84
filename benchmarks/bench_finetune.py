"""Fine-tuning and distillation: recalls before/after and wall time, on Flickr8k-1k.

    python benchmarks/bench_finetune.py            # ~6 min on 2 cores

Fine-tuning: the tests' tiny CLIP (trained on synthetic shapes; no real weights can be
downloaded here) adapted to the real Flickr8k-1k photos and captions. Split: 640 photos
train, 160 held out (the step and the WiSE alpha are chosen there) and 200 *reference*
photos that choose nothing -- the honest figure. Every recipe runs the default schedule
(at least 500 optimizer steps at batch 128, stopped early on the held-out split) except
the row that replays the old default (5 epochs: 25 steps). Compared in the same run: the
base model (the baseline), the old and new schedule, learning rates, InfoNCE vs triplet,
learnt vs fixed temperature, the text tower only vs partial vs full fine-tuning, and the
held-out recall by WiSE alpha.

Distillation: (1) quality -- the tiny teacher into a ViT student a quarter of its size
on captioned synthetic shapes, with and without the soft-target loss; (2) speed -- the
image tower of ViT-B-32 against a ViT-S-32 student in ViT-B-32's space (random weights:
speed does not depend on them), images/s of the model alone on this CPU.
With real weights, the same commands run on a machine that has them (README).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _machine import load_avg, machine_info, machine_text, write_results  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k-1k"
RECIPES = [  # (name, options); the first is the headline: the defaults, a fitting lr
    ("defaults, lr 3e-3", dict(lr=3e-3)),
    ("old default: 5 epochs, lr 3e-3", dict(lr=3e-3, epochs=5, eval_every=5, patience=2)),
    ("defaults, lr 1e-3", dict(lr=1e-3)),
    ("defaults, lr 1e-2", dict(lr=1e-2)),
    ("triplet, lr 3e-3", dict(lr=3e-3, loss="triplet")),
    ("fixed T=0.07, lr 3e-3", dict(lr=3e-3, temperature=0.07)),
    ("last text block, lr 3e-3", dict(lr=3e-3, unlocked=("text_layers", 1))),
    ("+ last 2 image groups, lr 1e-3", dict(lr=1e-3, unlocked=("image_layers", 2))),
    ("full, lr 3e-4", dict(lr=3e-4, unlocked=("full", True))),
]


def chance_rsum(pairs) -> float:
    """The rsum of random vectors on these pairs: text->image R@K is K/n; image->text R@K
    is the chance that one of an image's c captions is among K drawn from all N."""
    import numpy as np

    n, total = pairs.n_images, pairs.n_captions
    counts = np.bincount(pairs.caption_image, minlength=n)
    rsum = 0.0
    for k in (1, 5, 10):
        miss = np.ones(n)
        for j in range(k):
            miss *= (total - counts - j) / (total - j)
        rsum += 100 * (k / n + float(np.mean(1 - miss)))
    return rsum


def finetune_rows(engine, split, reference) -> list[dict]:
    from mmsearch.models.backends import load_embedder
    from mmsearch.train.finetune import FinetuneOptions, finetune
    from mmsearch.train.towers import Unlocked

    rows = []
    for name, recipe in RECIPES:
        recipe = dict(recipe)
        unlocked = Unlocked(**dict([recipe.pop("unlocked")])) if "unlocked" in recipe else Unlocked()
        options = FinetuneOptions(unlocked=unlocked, **recipe)
        embedder = load_embedder(engine.identity, "cpu")
        t0 = time.perf_counter()
        r = finetune(embedder, split, options, store=engine.store, reference=reference)
        t = r.training
        rows.append({"name": name, "seconds": time.perf_counter() - t0, "alpha": r.alpha,
                     "towers": r.towers_changed, "improved": r.improved,
                     "steps": t.steps, "planned": t.plan.total, "stopped": t.stopped,
                     "best_step": t.best_step, "eval_every": t.plan.eval_every,
                     "held": (r.before.r1, r.after.r1, r.before.rsum, r.after.rsum),
                     "ref": (r.reference_before.r1, r.reference_after.r1,
                             r.reference_before.rsum, r.reference_after.rsum),
                     "wise": {a: (round(x.rsum, 2), round(x.r1, 2)) for a, x in r.by_alpha.items()},
                     "log": [(e.step, round(e.loss, 4), e.heldout) for e in t.log]
                     if not rows else None})  # the headline row's measurements
        print(f"  {name}: {rows[-1]['seconds']:.1f} s, {t.describe()}", flush=True)
    return rows


def distill_quality(teacher_ident, tmp: Path) -> list[dict]:
    from conftest import draw_shapes
    from mmsearch.models.backends import load_embedder
    from mmsearch.train.distill import DistillOptions, distill
    from mmsearch.train.pairs import load_pairs

    folder = tmp / "shapes"
    for path, caption in draw_shapes(folder, per_combo=40).items():
        path.with_suffix(".txt").write_text(caption + "\n")
    config = tmp / "student.json"
    config.write_text(json.dumps({"vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64,
                                                 "layers": 2, "head_width": 32, "mlp_ratio": 2}}))
    rows = []
    for affinity in (1.0, 0.0):
        teacher = load_embedder(teacher_ident, "cpu")
        t0 = time.perf_counter()
        _, _, r = distill(teacher, load_pairs(folder, holdout=0.2), DistillOptions(
            student=str(config), lr=3e-3, batch_size=32, affinity=affinity))
        rows.append({"affinity": affinity, "seconds": time.perf_counter() - t0,
                     "teacher": r.teacher.rsum, "student": r.student.rsum,
                     "untrained": r.student_before.rsum, "cosine": r.cosine,
                     "params": (r.teacher_params, r.student_params),
                     "steps": r.training.steps, "planned": r.training.plan.total,
                     "stopped": r.training.stopped, "best_step": r.training.best_step})
    return rows


def distill_speed(batches: int = 4, batch: int = 32) -> dict:
    import torch

    from mmsearch.models.backends import load_embedder
    from mmsearch.models.identity import identify
    from mmsearch.train.distill import DistillOptions, build_student

    teacher = load_embedder(identify("ViT-B-32", "none"), "cpu")
    student = build_student(teacher, DistillOptions(student="ViT-S-32", from_teacher=False))[0]
    out = {}
    for name, model in (("ViT-B-32", teacher.torch_model), ("ViT-S-32 student", student.torch_model)):
        x = torch.randn(batch, 3, 224, 224)
        times = []
        with torch.inference_mode():
            model.encode_image(x)  # warm-up
            for _ in range(batches):
                t0 = time.perf_counter()
                model.encode_image(x)
                times.append(time.perf_counter() - t0)
        out[name] = {"images_per_s": batch / min(times),  # the fastest batch: least contention
                     "images_per_s_mean": batches * batch / sum(times),
                     "params": sum(p.numel() for p in model.visual.parameters())}
    return out


def main() -> None:
    import torch

    import tinyclip
    from mmsearch.engine import Engine
    from mmsearch.eval.datasets import load_karpathy
    from mmsearch.models.identity import identify
    from mmsearch.train.pairs import split_by_image

    torch.set_num_threads(1)  # as the tests: 2 cores, no OpenMP spinning
    info = machine_info()
    config, checkpoint = tinyclip.train_tiny_clip(ROOT / ".pytest_cache" / "d" / "tinyclip")
    everything = load_karpathy(FLICKR / "dataset_flickr8k_1k.json", FLICKR / "images")
    outer = split_by_image(everything, 0.2, seed=1)
    split, reference = split_by_image(outer.train, 0.2, seed=0), outer.heldout
    with tempfile.TemporaryDirectory() as tmp:
        with Engine.open("ft", home=tmp, model=str(config), pretrained=str(checkpoint),
                         device="cpu") as engine:
            t0 = time.perf_counter()
            engine.index([FLICKR / "images"])
            index_s = time.perf_counter() - t0
            print("fine-tuning", flush=True)
            rows = finetune_rows(engine, split, reference)
            chance = {"held": chance_rsum(split.heldout), "ref": chance_rsum(reference)}
        print("distillation", flush=True)
        quality = distill_quality(identify(str(config), str(checkpoint)), Path(tmp))
    torch.set_num_threads(2)
    speed = distill_speed()
    info["load_avg_end"] = load_avg()
    text = report(rows, quality, speed, index_s, chance, info)
    print(text)
    write_results("finetune", text, {"machine": info, "finetune": rows, "distill_quality": quality,
                                     "distill_speed": speed, "index_seconds": index_s,
                                     "chance_rsum": chance})


def report(rows, quality, speed, index_s, chance, info) -> str:
    from mmsearch.settings import FINETUNE_DEFAULTS

    base = rows[0]
    lines = ["# mmsearch finetune / distill on Flickr8k-1k (tiny CLIP pre-trained on shapes)",
             machine_text(info), "",
             f"split: 640 train / 160 held out (chooses the step and alpha) / 200 reference "
             f"(chooses nothing); base vectors read from an index of the 1,000 photos "
             f"(built in {index_s:.1f} s); batch 128 (5 steps an epoch), seed 0; default "
             f"schedule: {base['planned']} steps planned, held-out measured every "
             f"{base['eval_every']} steps, stop after {FINETUNE_DEFAULTS.patience} measurements "
             "without a better score",
             "", f"{'recipe':<32}{'held rsum':>10}{'held R@1':>9}{'ref rsum':>9}{'ref R@1':>8}"
             f"{'alpha':>6}{'steps':>10}{'best':>5}  {'stopped':<11}{'time s':>7}",
             f"{'base model (baseline)':<32}{base['held'][2]:>10.1f}{base['held'][0]:>9.2f}"
             f"{base['ref'][2]:>9.1f}{base['ref'][0]:>8.2f}{'-':>6}{'-':>10}{'-':>5}  "
             f"{'-':<11}{'-':>7}"]
    for r in rows:
        lines.append(f"{r['name']:<32}{r['held'][3]:>10.1f}{r['held'][1]:>9.2f}{r['ref'][3]:>9.1f}"
                     f"{r['ref'][1]:>8.2f}{r['alpha']:>6g}{r['steps']:>5}/{r['planned']:<4}"
                     f"{r['best_step']:>5}  {r['stopped']:<11}{r['seconds']:>7.1f}")
    lines += ["", "rsum: the six R@1/5/10 summed (%), the held-out score that picks the step and "
              "alpha; R@1: mean of text->image and image->text R@1 (%).",
              f"chance level (random vectors): held-out rsum {chance['held']:.1f}, reference "
              f"rsum {chance['ref']:.1f}.",
              "reference rsum, ratio to the base: " + ", ".join(
                  f"{r['name']}: {r['ref'][3] / base['ref'][2]:.2f}x" for r in rows),
              "", "held-out rsum / R@1 by WiSE alpha:"]
    lines += [f"  {r['name']:<32}" + "  ".join(f"{a:g}: {v[0]:.1f}/{v[1]:.2f}"
                                               for a, v in r["wise"].items()) for r in rows]
    head = rows[0]
    lines += ["", f"held-out score at each measurement, {head['name']} (step: rsum/R@1, "
              "training loss):", "  " + ", ".join(
                  f"{s}: {h['rsum']:.1f}/{h['r1']:.2f} ({loss:.2f})" for s, loss, h in head["log"])]
    lines += ["", "distillation, quality (synthetic shapes, 480 photos, 20% held out, the default "
              "schedule at batch 32, lr 3e-3; rsum with the teacher's text tower):"]
    for q in quality:
        lines.append(f"  soft-target weight {q['affinity']:g}: teacher rsum {q['teacher']:.1f}, "
                     f"student {q['student']:.1f} ({q['student'] / q['teacher']:.0%} of it; "
                     f"untrained {q['untrained']:.1f}), cosine to teacher {q['cosine']:.3f}, "
                     f"{q['steps']} of {q['planned']} steps ({q['stopped']}, best at step "
                     f"{q['best_step']}), image tower {q['params'][1]:,} vs {q['params'][0]:,} "
                     f"parameters, {q['seconds']:.1f} s")
    t, s = speed["ViT-B-32"], speed["ViT-S-32 student"]
    lines += ["", "distillation, speed (image tower alone, batch 32 at 224 px, 2 threads, random "
              "weights; the fastest of 4 batches, the mean in brackets):",
              f"  ViT-B-32: {t['images_per_s']:.1f} images/s ({t['images_per_s_mean']:.1f}; "
              f"{t['params']:,} parameters)",
              f"  ViT-S-32 student: {s['images_per_s']:.1f} images/s ({s['images_per_s_mean']:.1f}; "
              f"{s['params']:,} parameters) -- {s['images_per_s'] / t['images_per_s']:.2f}x the "
              "teacher"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
