"""`mmsearch finetune` and `mmsearch distill`: adapt a model to your pictures, or make its
image tower smaller; both print the before/after recalls on held-out pairs."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mmsearch.cli.common import (DeviceOpt, HomeOpt, IndexOpt, JsonOpt, ModelOpt, PretrainedOpt,
                                 handle_errors)
from mmsearch.settings import DEVICE, DISTILL_DEFAULTS, FINETUNE_DEFAULTS

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.train.forward import Recalls

DataArg = Annotated[Path, typer.Argument(
    help="Pairs: a Karpathy JSON (train+restval train, val or test held out), a .jsonl or .csv "
    "of image,caption rows, or a folder where photo.jpg has its captions in photo.txt "
    "(distill also takes a folder of photos without captions).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model to "
                                      "(open_clip's local-dir layout; must not exist yet).")]
ImagesOpt = Annotated[Optional[Path], typer.Option(
    help="Folder the image names in DATA are relative to (default: DATA's folder).")]
HoldoutOpt = Annotated[float, typer.Option(help="Share of the photos held out when DATA has no "
                                           "split (by photo, never by caption).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for the hold-out, the batches and the init.")]
StepsOpt = Annotated[Optional[int], typer.Option(
    help=f"Optimizer steps to run (default: at least {FINETUNE_DEFAULTS.min_steps}, in whole "
    "epochs); --patience may stop the run earlier.")]
EpochsOpt = Annotated[Optional[int], typer.Option(
    help="Epochs to run instead of the step budget (not with --steps); --patience may stop "
    "the run earlier.")]
EvalEveryOpt = Annotated[Optional[int], typer.Option(
    help=f"Optimizer steps between held-out evaluations (default: {FINETUNE_DEFAULTS.evaluations} "
    "evaluations over the run); the best one's weights are kept.")]
PatienceOpt = Annotated[int, typer.Option(
    help="Stop after this many held-out evaluations without a better score (0: never early).")]


@handle_errors
def finetune_command(
    data: DataArg, out: OutOpt, images: ImagesOpt = None,
    index: IndexOpt = None, home: HomeOpt = None, model: ModelOpt = None,
    pretrained: PretrainedOpt = None, device: DeviceOpt = DEVICE,
    loss: Annotated[str, typer.Option(help="infonce (CLIP's, with temperature) or triplet "
                                      "(hardest in-batch negative).")] = "infonce",
    margin: Annotated[float, typer.Option(help="Triplet margin.")] = 0.2,
    fixed_temperature: Annotated[Optional[float], typer.Option(
        help="Keep the InfoNCE temperature fixed at this value (default: learnt, clamped at "
        "1/100 as open_clip does).")] = None,
    unlock_text_layers: Annotated[Optional[int], typer.Option(
        help="Train only the last N text blocks, with the final norm and projection (0: the "
        "projection alone; default: the whole text tower).")] = None,
    unlock_image_layers: Annotated[int, typer.Option(
        help="Also train the last N image layer groups (default 0: image tower frozen, so an "
        "index built with the base model stays valid).")] = 0,
    full: Annotated[bool, typer.Option("--full", help="Train every layer of both towers.")] = False,
    lr: Annotated[float, typer.Option(help="AdamW learning rate, peak after a warm-up of "
                                      f"{FINETUNE_DEFAULTS.warmup:.0%} of the steps (the "
                                      "default suits a real CLIP).")] = FINETUNE_DEFAULTS.lr,
    weight_decay: Annotated[float, typer.Option(
        help="AdamW weight decay.")] = FINETUNE_DEFAULTS.weight_decay,
    steps: StepsOpt = None, epochs: EpochsOpt = None, eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = FINETUNE_DEFAULTS.patience,
    batch_size: Annotated[int, typer.Option(
        help="Pairs per contrastive batch.")] = FINETUNE_DEFAULTS.batch_size,
    accum: Annotated[int, typer.Option(help="Split each batch into this many forward passes "
                                       "(cached features: same loss, less memory).")] = 1,
    holdout: HoldoutOpt = 0.1, seed: SeedOpt = 0,
    reference: Annotated[Optional[Path], typer.Option(
        help="A Karpathy JSON whose test split is also measured before and after, so a loss "
        "of general ability shows.")] = None,
    reference_images: Annotated[Optional[Path], typer.Option(
        help="Folder of --reference's images.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the model on image-caption pairs; held-out recalls before and after.

    By default only the text tower trains (LiT-style): the photos' vectors stay those of
    the base model, so an index built with it takes the new model for queries at once.
    WiSE-FT then mixes base and tuned weights, alpha chosen on the held-out split.
    """
    from mmsearch.train.finetune import FinetuneOptions, finetune_to_folder
    from mmsearch.train.towers import Unlocked

    options = FinetuneOptions(
        loss=loss, margin=margin, temperature=fixed_temperature,
        unlocked=Unlocked(unlock_text_layers, unlock_image_layers, full, fixed_temperature is None),
        lr=lr, weight_decay=weight_decay, steps=steps, epochs=epochs, eval_every=eval_every,
        patience=patience, batch_size=batch_size, accum=accum, seed=seed)
    options.check()
    split, ref = _pairs(data, images, holdout, seed), _reference(reference, reference_images)
    with _base(index, home, model, pretrained, device) as (embedder, store), _Bar(as_json) as bar:
        report = finetune_to_folder(embedder, split, options, out, store=store, reference=ref,
                                    progress=bar.update, stop=bar.stop)
    if as_json:
        typer.echo(json.dumps({"out": str(out), "alpha": report.alpha, "improved": report.improved,
                               "towers_changed": report.towers_changed, **report.metrics()},
                              indent=2))
        return
    _finetune_summary(report, out)


@handle_errors
def distill_command(
    data: DataArg, out: OutOpt, images: ImagesOpt = None,
    index: IndexOpt = None, home: HomeOpt = None, model: ModelOpt = None,
    pretrained: PretrainedOpt = None, device: DeviceOpt = DEVICE,
    student: Annotated[str, typer.Option(help="Student image tower: an open_clip architecture "
                                         "(its vision config) or a config JSON.")] = "ViT-S-32",
    init: Annotated[str, typer.Option(help="teacher (copy the teacher's weights where shapes "
                                      "fit, blocks picked evenly) or scratch.")] = "teacher",
    affinity: Annotated[float, typer.Option(help="Weight of the soft-target (image->text KL) "
                                            "loss; 0 for feature distillation only.")] = 1.0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = DISTILL_DEFAULTS.lr,
    steps: StepsOpt = None, epochs: EpochsOpt = None, eval_every: EvalEveryOpt = None,
    patience: PatienceOpt = DISTILL_DEFAULTS.patience,
    batch_size: Annotated[int, typer.Option(
        help="Photos per batch.")] = DISTILL_DEFAULTS.batch_size,
    holdout: HoldoutOpt = 0.1, seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Train a smaller image tower into the teacher's embedding space (the teacher's text
    tower is kept); held-out recalls of student and teacher."""
    from mmsearch.errors import UsageError
    from mmsearch.train.distill import DistillOptions, distill_to_folder

    if init not in ("teacher", "scratch"):
        raise UsageError("--init must be teacher or scratch")
    options = DistillOptions(student=student, from_teacher=init == "teacher", affinity=affinity,
                             lr=lr, steps=steps, epochs=epochs, eval_every=eval_every,
                             patience=patience, batch_size=batch_size, seed=seed)
    options.check()
    split = _pairs(data, images, holdout, seed, photos_only=True)
    with _base(index, home, model, pretrained, device) as (teacher, store), _Bar(as_json) as bar:
        report = distill_to_folder(teacher, split, options, out, store=store,
                                   progress=bar.update, stop=bar.stop)
    if as_json:
        recall = {k: getattr(report, k).to_dict() if getattr(report, k) else None
                  for k in ("teacher", "student_before", "student")}
        typer.echo(json.dumps({"out": str(out), **recall, "cosine": report.cosine,
                               "teacher_params": report.teacher_params,
                               "student_params": report.student_params,
                               "training": report.training.to_dict()}, indent=2))
        return
    if report.teacher is not None:
        typer.echo(_table([("teacher", report.teacher), ("student, untrained",
                                                         report.student_before),
                           ("student", report.student)]))
    else:
        typer.echo("no captions: trained on the teacher's image vectors alone (no recalls)")
    typer.echo(f"image tower: {report.student_params:,} parameters against the teacher's "
               f"{report.teacher_params:,}; initialised {report.initialised}; mean cosine to the "
               f"teacher on held-out photos {report.cosine:.3f}")
    typer.echo(f"training: {report.training.describe()}")
    typer.echo(f"wrote {out}: a new model (its image tower changed): index with "
               f"--model local-dir:{out}")


def _pairs(data: Path, images: Path | None, holdout: float, seed: int,
           photos_only: bool = False) -> Any:
    from mmsearch.train.pairs import load_pairs

    return load_pairs(data, images, holdout=holdout, seed=seed, photos_only=photos_only)


def _reference(path: Path | None, images: Path | None) -> Any:
    if path is None:
        return None
    from mmsearch.eval.datasets import load_karpathy

    return load_karpathy(path, images or path.parent, split="test")


class _base:
    """The model to start from: the index's (whose stored vectors are reused) or --model's."""

    def __init__(self, index: str | None, home: Path | None, model: str | None,
                 pretrained: str | None, device: str) -> None:
        self.args = dict(index=index, home=home, model=model, pretrained=pretrained, device=device)
        self.engine: Any = None

    def __enter__(self) -> tuple[Any, Any]:
        from mmsearch.cli.common import open_engine
        from mmsearch.models.backends import load_embedder
        from mmsearch.models.identity import identify

        if self.args["index"] is not None:
            self.engine = open_engine(**self.args)
            return self.engine.embedder, self.engine.store
        return load_embedder(identify(self.args["model"], self.args["pretrained"]),
                             self.args["device"]), None

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.close()


class _Bar:
    """The progress bar, and Ctrl-C as "stop after this step, keep the best so far"."""

    def __init__(self, quiet: bool) -> None:
        from mmsearch.cli.interrupt import stop_on_sigint
        from mmsearch.progress import ProgressBar

        self.stop = threading.Event()
        self.bar = ProgressBar(enabled=not quiet)
        self.signals = stop_on_sigint(self.stop)
        self.update = self.bar.update

    def __enter__(self) -> "_Bar":
        self.bar.__enter__()
        self.signals.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.signals.__exit__(*exc)
        self.bar.__exit__(*exc)


def _finetune_summary(report: Any, out: Path) -> None:
    typer.echo(f"held out: {report.heldout_images} photos ({report.split}); trained on "
               f"{report.train_images} photos, {report.towers_changed and ' and '.join(report.towers_changed)} "
               f"tower{'s' if len(report.towers_changed) > 1 else ''}")
    rows = [("base", report.before), (f"fine-tuned (WiSE alpha {report.alpha:g})", report.after)]
    if report.reference_before is not None:
        rows += [("reference, base", report.reference_before),
                 ("reference, fine-tuned", report.reference_after)]
    typer.echo(_table(rows))
    wise = ", ".join(f"{a:g}: {r.rsum:.1f} / {r.r1:.2f}" for a, r in report.by_alpha.items())
    typer.echo(f"held-out rsum / mean R@1 by WiSE alpha: {wise}")
    typer.echo(f"training: {report.training.describe()}")
    for note in report.unreadable:
        typer.echo(f"note: {note}", err=True)
    if report.interrupted:
        typer.echo("interrupted: the best weights so far were kept (no WiSE search)", err=True)
    if not report.improved:
        typer.echo(f"not better: the held-out recall did not improve (rsum "
                   f"{report.before.rsum:.1f} -> {report.after.rsum:.1f}, mean R@1 "
                   f"{report.before.r1:.2f} -> {report.after.r1:.2f}); {out} is written for "
                   "inspection and marked improved: false in its manifest; keep using the base "
                   "model", err=True)
    use = (f"queries on an index built with the base model: --model local-dir:{out} (images are "
           "not re-embedded)" if report.towers_changed == ["text"] else
           f"a new model (the image tower changed): index again with --model local-dir:{out}")
    typer.echo(f"wrote {out}; {use}")


def _table(rows: list[tuple[str, "Recalls"]]) -> str:
    width = max(len(name) for name, _ in rows) + 2
    head = f"{'':<{width}}text->image R@1   R@5  R@10   image->text R@1   R@5  R@10"
    lines = [head]
    for name, r in rows:
        t, i = r.text_to_image, r.image_to_text
        lines.append(f"{name:<{width}}{t[1]:>15.1f}{t[5]:>6.1f}{t[10]:>6.1f}"
                     f"{i[1]:>18.1f}{i[5]:>6.1f}{i[10]:>6.1f}")
    return "\n".join(lines)
