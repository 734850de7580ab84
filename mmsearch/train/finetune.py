"""Fine-tune a dual-tower model on image-caption pairs, with its evaluation built in.

Each epoch every training photo appears once, with one of its captions drawn at random
(so no two rows of a batch are the same photo); the loss is CLIP's InfoNCE or the
triplet loss (:mod:`.losses`). AdamW, linear warm-up then cosine decay; the contrastive
batch may be larger than what fits in one forward pass (``accum`` micro-batches with
cached features, as open_clip's ``--accum-freq``). After every epoch the held-out
Recall@1 decides early stopping; at the end, weight-space ensembling with the base
weights (WiSE-FT) picks the alpha that is best on the held-out split, ties to the
smaller one. The model is never reported better unless its held-out R@1 is.
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
from mmsearch.train.data import TrainSet, prepare_set
from mmsearch.train.forward import Recalls, image_features, text_features
from mmsearch.train.losses import DEFAULT_MARGIN, LOSSES, info_nce, triplet
from mmsearch.train.pairs import PairSplit
from mmsearch.train.towers import WISE_ALPHAS, State, Unlocked, set_trainable, snapshot, wise

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learnt temperature at 1/100


@dataclass(frozen=True)
class FinetuneOptions:
    """The recipe; defaults are for a few thousand pairs on a real CLIP (see the README)."""

    loss: str = "infonce"
    margin: float = DEFAULT_MARGIN
    temperature: float | None = None  # fixed temperature; None: learnt, from the model's
    unlocked: Unlocked = field(default_factory=Unlocked)
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: float = 0.05
    epochs: int = 5
    patience: int = 2
    batch_size: int = 128
    accum: int = 1
    seed: int = 0
    alphas: tuple[float, ...] = WISE_ALPHAS

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        if self.epochs < 1 or self.batch_size < 2 or self.accum < 1 or self.lr <= 0:
            raise TrainingError("epochs and accum must be at least 1, batch size at least 2, "
                                "and the learning rate positive")
        if self.batch_size % self.accum:
            raise TrainingError(f"batch size {self.batch_size} is not a multiple of accum {self.accum}")
        if self.temperature is not None and self.temperature <= 0:
            raise TrainingError("the temperature must be positive")
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise TrainingError("WiSE alphas must lie between 0 and 1")


@dataclass
class EpochLog:
    epoch: int
    loss: float
    heldout_r1: float
    seconds: float


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
    epochs: list[EpochLog]
    best_epoch: int
    interrupted: bool
    seconds: float
    unreadable: list[str]
    reference_before: Recalls | None = None
    reference_after: Recalls | None = None

    @property
    def improved(self) -> bool:
        return self.after.r1 > self.before.r1 and self.alpha > 0

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"before": self.before.to_dict(), "after": self.after.to_dict(),
                               "wise": {str(a): r.to_dict() for a, r in self.by_alpha.items()},
                               "epochs": [asdict(e) for e in self.epochs]}
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
    log, best, best_epoch, interrupted = _train(model, embedder, train, heldout, options,
                                                before.r1, progress, stop)
    if interrupted:
        by_alpha = {1.0: _load_and_eval(model, embedder, heldout, best)}
    else:
        by_alpha = {a: _load_and_eval(model, embedder, heldout, wise(base, best, a))
                    for a in sorted(options.alphas)}
    alpha = max(by_alpha, key=lambda a: (by_alpha[a].r1, -a))  # ties: the smaller alpha
    model.load_state_dict(wise(base, best, alpha))
    return FinetuneReport(
        towers, split.how, train.pairs.n_images, heldout.pairs.n_images, before, by_alpha[alpha],
        alpha, by_alpha, log, best_epoch, interrupted, time.monotonic() - start,
        train.unreadable + heldout.unreadable, ref_before,
        ref.evaluate(model, embedder) if ref else None)


def _train(model: Any, embedder: "Embedder", train: TrainSet, heldout: TrainSet,
           options: FinetuneOptions, start_r1: float, progress: Progress,
           stop: threading.Event | None) -> tuple[list[EpochLog], State, int, bool]:
    """Epochs with early stopping; returns (log, best state, best epoch (0: none), interrupted)."""
    import torch

    torch.manual_seed(options.seed)
    steps = train.steps_per_epoch(options.batch_size)
    opt, sched = optimizer(model, options.lr, options.weight_decay, options.warmup,
                           steps * options.epochs)
    loss_fn = _loss(model, options)
    log: list[EpochLog] = []
    best, best_r1, best_epoch, waited = snapshot(model), start_r1, 0, 0
    try:
        for epoch in range(1, options.epochs + 1):
            t0 = time.monotonic()
            losses = []
            for step, (images, captions) in enumerate(train.batches(options, epoch), 1):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                losses.append(_step(model, embedder, train, images, captions, opt, sched,
                                    loss_fn, options.accum))
                progress(f"train|epoch {epoch}/{options.epochs}, loss {losses[-1]:.3f}",
                         (epoch - 1) * steps + step, steps * options.epochs)
            r1 = heldout.evaluate(model, embedder).r1
            log.append(EpochLog(epoch, float(np.mean(losses)), r1, time.monotonic() - t0))
            if r1 > best_r1:
                best, best_r1, best_epoch, waited = snapshot(model), r1, epoch, 0
            else:
                waited += 1
                if waited >= options.patience:
                    break
    except KeyboardInterrupt:
        return log, best, best_epoch, True
    return log, best, best_epoch, False


def optimizer(model: Any, lr: float, weight_decay: float, warmup: float,
              total: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on gains, biases, embeddings, temperature) and its schedule:
    a linear warm-up over the ``warmup`` fraction of ``total`` steps, then cosine to 0.
    Fine-tuning and distillation both train with it."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, round(warmup * total))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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
            "interrupted": report.interrupted, "best_epoch": report.best_epoch,
            "metrics": report.metrics()}


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
