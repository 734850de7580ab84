"""How long a training run lasts, how it watches the held-out split, and the loop that keeps
the best weights: fine-tuning and distillation share all three.

A run is sized in optimizer steps, not epochs: by default it lasts at least
``TrainingDefaults.min_steps`` steps, in whole epochs (a few hundred pairs at batch 128 are
3 steps an epoch: 5 epochs would be 15 steps, too few to learn anything new). ``epochs``
plans that many epochs instead, ``steps`` that many steps. The held-out
split is measured every ``eval_every`` steps (by default ``evaluations`` times over the run)
and at the last step; the weights with the best held-out score are kept, and the run stops
early after ``patience`` measurements without a better one (0: never early).

A held-out score is a dict of named figures compared in order (fine-tuning: the sum of
R@1/5/10 in both directions, then the mean R@1), so "better" is decided here only.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from mmsearch.errors import TrainingError
from mmsearch.progress import Progress
from mmsearch.settings import TrainingDefaults
from mmsearch.train.towers import State, snapshot

Score = dict[str, float]


@dataclass(frozen=True)
class Plan:
    """The schedule of one run, fixed before its first step."""

    steps_per_epoch: int
    epochs: int
    total: int  # optimizer steps planned
    eval_every: int
    patience: int  # evaluations without a better held-out score; 0: never stop early
    sized_by: str  # said in reports: the default budget, --epochs or --steps


def check(steps: int | None, epochs: int | None, eval_every: int | None, patience: int) -> None:
    """The schedule options' rules (each options dataclass calls it from its ``check``)."""
    if steps is not None and epochs is not None:
        raise TrainingError("give the run's length as steps or as epochs, not both")
    for name, value in (("steps", steps), ("epochs", epochs), ("eval_every", eval_every)):
        if value is not None and value < 1:
            raise TrainingError(f"{name} must be at least 1, got {value}")
    if patience < 0:
        raise TrainingError(f"patience must be 0 (never stop early) or more, got {patience}")


def plan(n_images: int, batch_size: int, defaults: TrainingDefaults, *, steps: int | None,
         epochs: int | None, eval_every: int | None, patience: int) -> Plan:
    """The plan for ``n_images`` training photos (a last partial batch is dropped)."""
    check(steps, epochs, eval_every, patience)
    per_epoch = max(1, n_images // batch_size)
    if steps is not None:
        total, sized_by = steps, f"{steps} steps asked for"
    elif epochs is not None:
        total, sized_by = epochs * per_epoch, f"{epochs} epoch{'s' * (epochs != 1)} asked for"
    else:
        total = math.ceil(defaults.min_steps / per_epoch) * per_epoch
        sized_by = f"the default: at least {defaults.min_steps} steps, in whole epochs"
    every = eval_every or max(1, math.ceil(total / defaults.evaluations))
    return Plan(per_epoch, math.ceil(total / per_epoch), total, min(every, total), patience,
                sized_by)


@dataclass
class Evaluation:
    step: int
    epoch: int
    loss: float  # mean training loss since the previous evaluation
    heldout: Score
    seconds: float  # since the previous evaluation


@dataclass
class Training:
    """What the loop did, as reports and manifests state it."""

    plan: Plan
    steps: int = 0  # optimizer steps run
    stopped: str = "budget"  # "budget", "early stop" or "interrupted"
    best_step: int = 0  # 0: the starting weights were never beaten
    best_heldout: Score = field(default_factory=dict)
    log: list[Evaluation] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        p = self.plan
        why = {"budget": "the planned steps all ran",
               "early stop": f"stopped early: {p.patience} held-out evaluations (every "
                             f"{p.eval_every} steps) without a better score",
               "interrupted": "interrupted"}[self.stopped]
        best = f"best held-out at step {self.best_step}" if self.best_step else \
            "no step beat the starting weights on the held-out split"
        return (f"{self.steps} of {p.total} steps ({p.sized_by}; {p.steps_per_epoch} per "
                f"epoch); {why}; {best}")


def optimizer(model: Any, lr: float, weight_decay: float, warmup: float,
              total: int) -> tuple[Any, Any]:
    """AdamW (no weight decay on gains, biases, embeddings, temperature) and its schedule:
    a linear warm-up over the ``warmup`` fraction of ``total`` steps, then cosine to 0."""
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


def rank(score: Score) -> tuple[float, ...]:
    """Figures compared in their order: the first that differs decides."""
    return tuple(score.values())


def better(score: Score, than: Score) -> bool:
    return rank(score) > rank(than)


def run(model: Any, plan: Plan, batches: Callable[[int], Iterable[Any]],
        step: Callable[[Any], float], evaluate: Callable[[], Score], start: Score,
        progress: Progress, stop: threading.Event | None = None,
        initial: State | None = None) -> tuple[State, Training]:
    """Train ``plan.total`` steps at most; returns (the best weights, what happened).
    ``start`` is the held-out score of the weights before the first step (``initial``: a
    copy of them the caller already holds); Ctrl-C (or ``stop``) ends the run after the
    current step with the best weights so far."""
    loop = _Loop(model, plan, Training(plan, best_heldout=dict(start)), progress,
                 initial if initial is not None else snapshot(model))
    try:
        for epoch in range(1, plan.epochs + 1):
            for batch in batches(epoch):
                if loop.training.steps == plan.total:
                    break
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                if loop.step(epoch, step(batch)) and loop.evaluate(epoch, evaluate()):
                    loop.training.stopped = "early stop"
                    return loop.best, loop.training
    except KeyboardInterrupt:
        loop.training.stopped = "interrupted"
    return loop.best, loop.training


class _Loop:
    """The loop's state: steps, losses since the last evaluation, the best weights."""

    def __init__(self, model: Any, plan: Plan, training: Training, progress: Progress,
                 best: State) -> None:
        self.model, self.plan, self.training, self.progress = model, plan, training, progress
        self.best = best
        self.losses: list[float] = []
        self.waited = 0
        self.since = time.monotonic()

    def step(self, epoch: int, loss: float) -> bool:
        """Count a step; True when the held-out split is to be measured now."""
        t, p = self.training, self.plan
        t.steps += 1
        self.losses.append(loss)
        self.progress(f"train|step {t.steps}/{p.total}, epoch {epoch}/{p.epochs}, loss "
                      f"{loss:.3f}", t.steps, p.total)
        return t.steps % p.eval_every == 0 or t.steps == p.total

    def evaluate(self, epoch: int, score: Score) -> bool:
        """Log a held-out score, keep the weights if best; True when patience ran out."""
        t = self.training
        now = time.monotonic()
        t.log.append(Evaluation(t.steps, epoch, sum(self.losses) / len(self.losses), score,
                                now - self.since))
        self.losses, self.since = [], now
        if better(score, t.best_heldout):
            self.best, t.best_step, t.best_heldout, self.waited = \
                snapshot(self.model), t.steps, dict(score), 0
            return False
        self.waited += 1
        return 0 < self.plan.patience <= self.waited and t.steps < self.plan.total
