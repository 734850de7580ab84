"""Fine-tuning and distillation: recalls before/after and wall time, on Flickr8k-1k.

    python benchmarks/bench_finetune.py            # ~5 min on 2 cores

Fine-tuning: the tests' tiny CLIP (trained on synthetic shapes; no real weights can be
downloaded here) adapted to the real Flickr8k-1k photos and captions. Split: 640 photos
train, 160 held out (early stopping and the WiSE alpha are chosen there) and 200
*reference* photos that choose nothing -- the honest figure. Compared in the same run:
the base model (the baseline), InfoNCE vs triplet, learnt vs fixed temperature, the
text tower only vs partial vs full fine-tuning, and the held-out recall by WiSE alpha.

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
RECIPES = [  # (name, options)
    ("InfoNCE, text tower (LiT)", dict(lr=3e-3)),
    ("triplet, text tower", dict(lr=3e-3, loss="triplet")),
    ("InfoNCE fixed T=0.07, text tower", dict(lr=3e-3, temperature=0.07)),
    ("InfoNCE, last text block", dict(lr=3e-3, unlocked=("text_layers", 1))),
    ("InfoNCE, text + last 2 image groups", dict(lr=1e-3, unlocked=("image_layers", 2))),
    ("InfoNCE, full", dict(lr=3e-4, unlocked=("full", True))),
]


def rsum(r) -> float:
    return sum(r.text_to_image.values()) + sum(r.image_to_text.values())


def finetune_rows(engine, split, reference) -> list[dict]:
    from mmsearch.models.backends import load_embedder
    from mmsearch.train.finetune import FinetuneOptions, finetune
    from mmsearch.train.towers import Unlocked

    rows = []
    for name, recipe in RECIPES:
        recipe = dict(recipe)
        unlocked = Unlocked(**dict([recipe.pop("unlocked")])) if "unlocked" in recipe else Unlocked()
        options = FinetuneOptions(epochs=15, batch_size=64, patience=15, unlocked=unlocked, **recipe)
        embedder = load_embedder(engine.identity, "cpu")
        t0 = time.perf_counter()
        r = finetune(embedder, split, options, store=engine.store, reference=reference)
        rows.append({"name": name, "seconds": time.perf_counter() - t0, "alpha": r.alpha,
                     "best_epoch": r.best_epoch, "towers": r.towers_changed,
                     "held": (r.before.r1, r.after.r1, rsum(r.before), rsum(r.after)),
                     "ref": (r.reference_before.r1, r.reference_after.r1,
                             rsum(r.reference_before), rsum(r.reference_after)),
                     "wise": {a: round(x.r1, 2) for a, x in r.by_alpha.items()}})
        print(f"  {name}: {rows[-1]['seconds']:.1f} s", flush=True)
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
            student=str(config), lr=3e-3, epochs=20, batch_size=32, affinity=affinity))
        rows.append({"affinity": affinity, "seconds": time.perf_counter() - t0,
                     "teacher": rsum(r.teacher), "student": rsum(r.student),
                     "untrained": rsum(r.student_before), "cosine": r.cosine,
                     "params": (r.teacher_params, r.student_params)})
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
        with torch.inference_mode():
            model.encode_image(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(batches):
                model.encode_image(x)
        out[name] = {"images_per_s": batches * batch / (time.perf_counter() - t0),
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
        print("distillation", flush=True)
        quality = distill_quality(identify(str(config), str(checkpoint)), Path(tmp))
    torch.set_num_threads(2)
    speed = distill_speed()
    info["load_avg_end"] = load_avg()
    text = report(rows, quality, speed, index_s, info)
    print(text)
    write_results("finetune", text, {"machine": info, "finetune": rows, "distill_quality": quality,
                                     "distill_speed": speed, "index_seconds": index_s})


def report(rows, quality, speed, index_s, info) -> str:
    base = rows[0]
    lines = ["# mmsearch finetune / distill on Flickr8k-1k (tiny CLIP pre-trained on shapes)",
             machine_text(info), "",
             f"split: 640 train / 160 held out (chooses epoch and alpha) / 200 reference "
             f"(chooses nothing); base vectors read from an index of the 1,000 photos "
             f"(built in {index_s:.1f} s); 15 epochs at most, batch 64, seed 0",
             "", f"{'recipe':<38}{'held R@1':>9}{'held rsum':>11}{'ref R@1':>9}{'ref rsum':>10}"
             f"{'alpha':>7}{'best ep':>8}{'time s':>8}",
             f"{'base model (baseline)':<38}{base['held'][0]:>9.2f}{base['held'][2]:>11.1f}"
             f"{base['ref'][0]:>9.2f}{base['ref'][2]:>10.1f}{'-':>7}{'-':>8}{'-':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<38}{r['held'][1]:>9.2f}{r['held'][3]:>11.1f}{r['ref'][1]:>9.2f}"
                     f"{r['ref'][3]:>10.1f}{r['alpha']:>7g}{r['best_epoch']:>8}{r['seconds']:>8.1f}")
    lines += ["", "R@1: mean of text->image and image->text R@1 (%); rsum: the six R@1/5/10 summed.",
              "reference rsum, ratio to the base: " + ", ".join(
                  f"{r['name']}: {r['ref'][3] / base['ref'][2]:.2f}x" for r in rows),
              "", "held-out mean R@1 by WiSE alpha:"]
    lines += [f"  {r['name']:<38}" + "  ".join(f"{a:g}: {v:.2f}" for a, v in r["wise"].items())
              for r in rows]
    lines += ["", "distillation, quality (synthetic shapes, 480 photos, 20% held out; rsum "
              "with the teacher's text tower):"]
    for q in quality:
        lines.append(f"  soft-target weight {q['affinity']:g}: teacher rsum {q['teacher']:.1f}, "
                     f"student {q['student']:.1f} ({q['student'] / q['teacher']:.0%} of it; "
                     f"untrained {q['untrained']:.1f}), cosine to teacher {q['cosine']:.3f}, image "
                     f"tower {q['params'][1]:,} vs {q['params'][0]:,} parameters, {q['seconds']:.1f} s")
    t, s = speed["ViT-B-32"], speed["ViT-S-32 student"]
    lines += ["", "distillation, speed (image tower alone, batch 32 at 224 px, 2 threads, random "
              "weights):",
              f"  ViT-B-32: {t['images_per_s']:.1f} images/s ({t['params']:,} parameters)",
              f"  ViT-S-32 student: {s['images_per_s']:.1f} images/s ({s['params']:,} parameters)"
              f" -- {s['images_per_s'] / t['images_per_s']:.2f}x the teacher"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
