"""Fine-tune a dual-tower model on image-caption pairs, with its evaluation built in.

Each epoch every training photo appears once, with one of its captions drawn at random
(so no two rows of a batch are the same photo); the loss is CLIP's InfoNCE or the
triplet loss (:mod:`.losses`). AdamW, linear warm-up then cosine decay; the contrastive
batch may be larger than what fits in one forward pass (``accum`` micro-batches with
cached features, as open_clip's ``--accum-freq``). The run is sized in optimizer steps
and stopped early on the held-out recall, keeping the best weights (:mod:`.schedule`); at
the end, weight-space ensembling with the base weights (WiSE-FT) picks the alpha that is
best on the held-out split, ties to the smaller one. The model is never reported better
unless its held-out score is (``Recalls.score``: rsum, then mean R@1).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mmsearch.errors import TrainingError
from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.progress import Progress, no_progress
from mmsearch.settings import FINETUNE_DEFAULTS as DEFAULTS
from mmsearch.train import schedule
from mmsearch.train.data import TrainSet, prepare_set
from mmsearch.train.forward import Recalls, image_features, text_features
from mmsearch.train.losses import DEFAULT_MARGIN, LOSSES, info_nce, triplet
from mmsearch.train.pairs import PairSplit
from mmsearch.train.schedule import Training
from mmsearch.train.towers import WISE_ALPHAS, State, Unlocked, set_trainable, snapshot, wise

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnt temperature at 1/100


@dataclass(frozen=True)
class FinetuneOptions:
    """The recipe; defaults (``settings.FINETUNE_DEFAULTS``) are for a few hundred to a
    few thousand pairs on a real CLIP (see the README). ``steps`` / ``epochs``: the run's
    length (one of them at most); neither: at least the default step budget; ``patience``
    may end it earlier."""

    loss: str = "infonce"
    margin: float = DEFAULT_MARGIN
    temperature: float | None = None  # fixed temperature; None: learnt, from the model's
    unlocked: Unlocked = field(default_factory=Unlocked)
    lr: float = DEFAULTS.lr
    weight_decay: float = DEFAULTS.weight_decay
    warmup: float = DEFAULTS.warmup
    steps: int | None = None
    epochs: int | None = None
    eval_every: int | None = None  # None: DEFAULTS.evaluations times over the run
    patience: int = DEFAULTS.patience
    batch_size: int = DEFAULTS.batch_size
    accum: int = 1
    seed: int = 0
    alphas: tuple[float, ...] = WISE_ALPHAS

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        schedule.check(self.steps, self.epochs, self.eval_every, self.patience)
        if self.batch_size < 2 or self.accum < 1 or self.lr <= 0:
            raise TrainingError("accum must be at least 1, batch size at least 2, "
                                "and the learning rate positive")
        if self.batch_size % self.accum:
            raise TrainingError(f"batch size {self.batch_size} is not a multiple of accum {self.accum}")
        if self.temperature is not None and self.temperature <= 0:
            raise TrainingError("the temperature must be positive")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise TrainingError("WiSE alphas must lie between 0 and 1")

    def plan(self, n_images: int) -> schedule.Plan:
        return schedule.plan(n_images, self.batch_size, DEFAULTS, steps=self.steps,
                             epochs=self.epochs, eval_every=self.eval_every,
                             patience=self.patience)


@dataclass
class FinetuneReport:
    """What happened: recalls before and after, the alpha chosen, and whether it helped."""

    towers_changed: list[str]
    split: str
    train_images: int
    heldout_images: int
    before: Recalls
    after: Recalls
    alpha: float
    by_alpha: dict[float, Recalls]
    training: Training  # steps run, why it stopped, the best held-out score and its step
    seconds: float
    unreadable: list[str]
    reference_before: Recalls | None = None
    reference_after: Recalls | None = None

    @property
    def improved(self) -> bool:
        return schedule.better(self.after.score(), self.before.score()) and self.alpha > 0

    @property
    def interrupted(self) -> bool:
        return self.training.interrupted

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"before": self.before.to_dict(), "after": self.after.to_dict(),
                               "wise": {str(a): r.to_dict() for a, r in self.by_alpha.items()},
                               "training": self.training.to_dict()}
        if self.reference_before is not None and self.reference_after is not None:
            out["reference_before"] = self.reference_before.to_dict()
            out["reference_after"] = self.reference_after.to_dict()
        return out


def finetune(embedder: "Embedder", split: PairSplit, options: FinetuneOptions, *,
             store: "Store | None" = None, reference: RetrievalDataset | None = None,
             progress: Progress = no_progress, stop: threading.Event | None = None) -> FinetuneReport:
    """Train ``embedder``'s model in place on ``split.train``; leaves it at the chosen weights."""
    options.check()
    start = time.monotonic()
    model = embedder.torch_model
    model.eval()  # BatchNorm statistics frozen, no dropout: small data, stable features
    towers = set_trainable(model, options.unlocked)
    if not towers:
        raise TrainingError("nothing to train: every layer is locked")
    image_trains = "image" in towers
    train = prepare_set(embedder, split.train, image_trains, store=store, progress=progress)
    heldout = prepare_set(embedder, split.heldout, image_trains, store=store, progress=progress)
    ref = prepare_set(embedder, reference, image_trains, store=store) if reference else None
    base = snapshot(model)
    before, ref_before = heldout.evaluate(model, embedder), ref.evaluate(model, embedder) if ref else None
    best, training = _train(model, embedder, (train, heldout), options, (base, before),
                            progress, stop)
    if training.interrupted:
        by_alpha = {1.0: _load_and_eval(model, embedder, heldout, best)}
    else:
        by_alpha = {a: _load_and_eval(model, embedder, heldout, wise(base, best, a))
                    for a in sorted(options.alphas)}
    alpha = max(by_alpha, key=lambda a: (schedule.rank(by_alpha[a].score()), -a))  # ties: smaller
    model.load_state_dict(wise(base, best, alpha))
    return FinetuneReport(
        towers, split.how, train.pairs.n_images, heldout.pairs.n_images, before, by_alpha[alpha],
        alpha, by_alpha, training, time.monotonic() - start,
        train.unreadable + heldout.unreadable, ref_before,
        ref.evaluate(model, embedder) if ref else None)


def _train(model: Any, embedder: "Embedder", sets: tuple[TrainSet, TrainSet],
           options: FinetuneOptions, start: tuple[State, Recalls], progress: Progress,
           stop: threading.Event | None) -> tuple[State, Training]:
    """The planned steps, stopped early on the held-out score; (best weights, what ran).
    ``start``: the weights before training and their held-out recalls."""
    import torch

    train, heldout = sets

    torch.manual_seed(options.seed)
    plan = options.plan(train.pairs.n_images)
    opt, sched = schedule.optimizer(model, options.lr, options.weight_decay, options.warmup,
                                    plan.total)
    loss_fn = _loss(model, options)

    def step(batch: tuple[np.ndarray, np.ndarray]) -> float:
        return _step(model, embedder, train, *batch, opt, sched, loss_fn, options.accum)

    return schedule.run(model, plan, lambda epoch: train.batches(options, epoch), step,
                        lambda: heldout.evaluate(model, embedder).score(), start[1].score(),
                        progress, stop, initial=start[0])


def _loss(model: Any, options: FinetuneOptions) -> Callable[[Any, Any], "torch.Tensor"]:
    import torch

    if options.loss == "triplet":
        return lambda image, text: triplet(image, text, options.margin)
    if options.temperature is not None:
        fixed = torch.tensor(1.0 / options.temperature)
        return lambda image, text: info_nce(image, text, fixed)
    return lambda image, text: info_nce(image, text, model.logit_scale.exp())


def _step(model: Any, embedder: "Embedder", data: TrainSet, images: np.ndarray,
          captions: np.ndarray, opt: Any, sched: Any, loss_fn: Callable, accum: int) -> float:
    """One optimiser step over a contrastive batch made of ``accum`` micro-batches."""
    import torch

    parts = np.array_split(np.arange(len(images)), accum)

    def features(part: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        text = text_features(model, data.tokens[captions[part]])
        if data.vectors is not None:
            return data.vectors[images[part]], text
        return image_features(model, embedder, [data.inputs[i] for i in images[part]]), text

    opt.zero_grad(set_to_none=True)
    if accum == 1:
        loss = loss_fn(*features(parts[0]))
        loss.backward()
    else:  # gradient caching: the loss sees the whole batch, gradients flow one part at a time
        with torch.no_grad():
            cached = [features(p) for p in parts]
        for j, part in enumerate(parts):
            mine = features(part)
            image = torch.cat([mine[0] if i == j else c[0] for i, c in enumerate(cached)])
            text = torch.cat([mine[1] if i == j else c[1] for i, c in enumerate(cached)])
            loss = loss_fn(image, text)
            loss.backward()
    opt.step()
    sched.step()
    if getattr(model, "logit_scale", None) is not None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return float(loss.detach())


def _load_and_eval(model: Any, embedder: "Embedder", heldout: TrainSet, state: State) -> Recalls:
    model.load_state_dict(state)
    return heldout.evaluate(model, embedder)


def manifest(report: FinetuneReport, options: FinetuneOptions, base: dict[str, Any],
             data: dict[str, Any]) -> dict[str, Any]:
    """What the output folder's ``mmsearch_manifest.json`` records."""
    settings = asdict(options)
    settings["unlocked"] = options.unlocked.describe()
    return {"made_by": "mmsearch finetune", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime()),
            "base": base, "towers_changed": report.towers_changed, "data": data,
            "settings": settings, "alpha": report.alpha, "improved": report.improved,
            "interrupted": report.interrupted, "metrics": report.metrics()}


__all__ = ["FinetuneOptions", "FinetuneReport", "finetune", "finetune_to_folder", "manifest"]


def finetune_to_folder(embedder: "Embedder", split: PairSplit, options: FinetuneOptions,
                       out: Path, *, store: "Store | None" = None,
                       reference: RetrievalDataset | None = None, progress: Progress = no_progress,
                       stop: threading.Event | None = None) -> FinetuneReport:
    """:func:`finetune`, then write the model folder ``out`` with its manifest."""
    from dataclasses import replace as _replace

    from mmsearch.train.output import base_record, check_target, data_hash, model_config, save_model

    check_target(out)  # before hours of training, not after
    cfg = model_config(embedder)
    report = finetune(embedder, split, options, store=store, reference=reference,
                      progress=progress, stop=stop)
    image_side = _replace(embedder.identity, text_pretrained=None, text_fingerprint=None)
    data = {"split": split.how, "hash": data_hash(split.train, split.heldout),
            "train_images": report.train_images, "heldout_images": report.heldout_images}
    save_model(embedder.torch_model, cfg, embedder.preprocess_cfg, out,
               manifest(report, options, base_record(image_side), data))
    return report
