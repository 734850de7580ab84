"""Distil a teacher's image tower into a smaller one that lands in the teacher's space.

The student is the teacher with its vision tower replaced (any open_clip vision config,
e.g. ``ViT-S-32``'s, projected to the teacher's dimension); the teacher's text tower is
kept as it is, so text queries keep the teacher's quality. Targets are the teacher's
image vectors (read from an index that holds them, else embedded once). Loss:
``1 - cos(student, teacher)`` plus, when captions are given, ``w * KL`` between the
teacher's and the student's image->text distributions over the batch's captions.
Where shapes allow, the student starts from the teacher's weights (blocks picked evenly,
as TinyCLIP's uniform layer selection); otherwise from scratch. The run is sized in
optimizer steps and stopped early on the held-out split (:mod:`.schedule`): its recalls
(rsum, then mean R@1, then the cosine to the teacher), or the cosine alone without
captions; the best student is kept.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.errors import ModelError, TrainingError
from mmsearch.models.identity import ModelIdentity
from mmsearch.progress import Progress, no_progress
from mmsearch.settings import DISTILL_DEFAULTS as DEFAULTS
from mmsearch.train import schedule
from mmsearch.train.data import TrainSet, prepare_set
from mmsearch.train.forward import Recalls, embed_images, image_features, recalls
from mmsearch.train.losses import affinity_distill, feature_distill
from mmsearch.train.output import model_config
from mmsearch.train.pairs import PairSplit
from mmsearch.train.schedule import Training

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store


@dataclass(frozen=True)
class DistillOptions:
    """Defaults: ``settings.DISTILL_DEFAULTS``; ``steps`` / ``epochs``: the run's length
    (one of them at most); neither: at least the default step budget; ``patience`` may
    end it earlier."""

    student: str = "ViT-S-32"  # an open_clip architecture or a config JSON: its vision_cfg
    from_teacher: bool = True  # copy the teacher's weights where shapes match
    affinity: float = 1.0  # weight of the soft-target loss
    lr: float = DEFAULTS.lr
    weight_decay: float = DEFAULTS.weight_decay
    warmup: float = DEFAULTS.warmup
    steps: int | None = None
    epochs: int | None = None
    eval_every: int | None = None  # None: DEFAULTS.evaluations times over the run
    patience: int = DEFAULTS.patience
    batch_size: int = DEFAULTS.batch_size
    seed: int = 0

    def check(self) -> None:
        schedule.check(self.steps, self.epochs, self.eval_every, self.patience)
        if self.batch_size < 2 or self.lr <= 0 or self.affinity < 0:
            raise TrainingError("the batch size must be at least 2, the learning rate "
                                "positive and the soft-target weight 0 or more")

    def plan(self, n_images: int) -> schedule.Plan:
        return schedule.plan(n_images, self.batch_size, DEFAULTS, steps=self.steps,
                             epochs=self.epochs, eval_every=self.eval_every,
                             patience=self.patience)


@dataclass
class DistillReport:
    """Held-out recalls (None when the photos have no captions) and the cosine to the teacher."""

    teacher: Recalls | None
    student_before: Recalls | None
    student: Recalls | None
    cosine: float  # mean cosine of student and teacher vectors on the held-out photos
    teacher_params: int
    student_params: int
    initialised: str
    training: Training  # steps run, why it stopped, the best held-out score and its step
    seconds: float
    unreadable: list[str]

    @property
    def interrupted(self) -> bool:
        return self.training.interrupted


def build_student(teacher: "Embedder", options: DistillOptions) -> tuple["Embedder", dict, str]:
    """(the student model wrapped as an Embedder, its open_clip config, how it was initialised)."""
    import open_clip

    from mmsearch.models.openclip import Embedder, quiet_open_clip

    cfg = model_config(teacher)
    cfg["vision_cfg"] = _vision_cfg(options.student)
    with tempfile.TemporaryDirectory() as tmp:
        name = "mmsearch-student-" + re.sub(r"[^A-Za-z0-9]+", "-", Path(options.student).stem)
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        with quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    own = {k: v for k, v in teacher.torch_model.state_dict().items() if not k.startswith("visual.")}
    missing = model.load_state_dict(own, strict=False).missing_keys
    if any(not k.startswith("visual.") for k in missing):
        raise ModelError("the student could not take the teacher's text tower")
    how = _init_from_teacher(model, teacher.torch_model) if options.from_teacher else "from scratch"
    model.to(teacher.device).eval()
    identity = ModelIdentity(name, "none", "student")
    return Embedder(identity, model, preprocess, teacher.tokenize, teacher.device), cfg, how


def _vision_cfg(student: str) -> dict[str, Any]:
    import open_clip

    path = Path(student).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelError(f"student config not found: {path}")
        data = json.loads(path.read_text())
        cfg = data.get("model_cfg", data)
    else:
        cfg = open_clip.get_model_config(student)
    if not cfg or "vision_cfg" not in cfg:
        raise ModelError(f"no open_clip vision config for student {student!r} (an architecture "
                         "name such as ViT-S-32, or a config JSON with vision_cfg)")
    return json.loads(json.dumps(cfg["vision_cfg"]))


def _init_from_teacher(student: Any, teacher: Any) -> str:
    """Copy every teacher tensor whose shape fits, the student's blocks taken evenly from the
    teacher's; returns a one-line description."""
    theirs = teacher.visual.state_dict()
    mine = student.visual.state_dict()
    blocks = _block_map(mine, theirs)
    copied = 0
    for key, value in mine.items():
        source = _block_key(key, blocks)
        if source in theirs and theirs[source].shape == value.shape:
            value.copy_(theirs[source])
            copied += 1
    if not copied:
        return "from scratch (no tensor of the teacher's image tower fits)"
    picked = f", blocks {sorted(set(blocks.values()))} of the teacher" if blocks else ""
    return f"from the teacher: {copied} of {len(mine)} tensors{picked}"


_BLOCK = re.compile(r"^(.*\.resblocks\.)(\d+)(\..*)$")


def _block_map(mine: dict, theirs: dict) -> dict[int, int]:
    def count(state: dict) -> int:
        found = [int(m.group(2)) for k in state if (m := _BLOCK.match(k))]
        return max(found) + 1 if found else 0
    n_mine, n_theirs = count(mine), count(theirs)
    if not n_mine or not n_theirs:
        return {}
    if n_mine == 1:
        return {0: n_theirs - 1}
    return {i: round(i * (n_theirs - 1) / (n_mine - 1)) for i in range(n_mine)}


def _block_key(key: str, blocks: dict[int, int]) -> str:
    m = _BLOCK.match(key)
    if not m or int(m.group(2)) not in blocks:
        return key
    return f"{m.group(1)}{blocks[int(m.group(2))]}{m.group(3)}"


def distill(teacher: "Embedder", split: PairSplit, options: DistillOptions, *,
            store: "Store | None" = None, progress: Progress = no_progress,
            stop: threading.Event | None = None) -> tuple["Embedder", dict, DistillReport]:
    """Train a student image tower; returns (student, its config, the report). Photos
    without captions train on the feature loss alone and report the cosine only."""
    options.check()
    start = time.monotonic()
    student, cfg, how = build_student(teacher, options)
    model = student.torch_model
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    targets = [prepare_set(teacher, pairs, False, store=store, progress=progress)
               for pairs in (split.train, split.heldout)]
    inputs = [_inputs(student, t, progress) for t in targets]
    text = [_texts(teacher, t) for t in targets]
    if text[0] is None:
        options = replace(options, affinity=0.0)  # no captions: no soft targets
    before = _evaluate(student, inputs[1], targets[1], text[1])
    best, training = _fit(student, (inputs, targets, text), options, before,
                          _logit_scale(teacher), progress, stop)
    model.load_state_dict(best)
    after, cosine = _evaluate(student, inputs[1], targets[1], text[1])
    teacher_r = None if text[1] is None else recalls(targets[1].vectors.numpy(), text[1].numpy(),
                                                      targets[1].pairs)
    count = lambda m: sum(p.numel() for p in m.visual.parameters())  # noqa: E731
    report = DistillReport(teacher_r, before[0], after, cosine, count(teacher.torch_model),
                           count(model), how, training, time.monotonic() - start,
                           targets[0].unreadable + targets[1].unreadable)
    return student, cfg, report


def _logit_scale(teacher: "Embedder") -> float:
    scale = getattr(teacher.torch_model, "logit_scale", None)
    return float(scale.detach().exp()) if scale is not None else 100.0


def _inputs(student: "Embedder", target: TrainSet, progress: Progress) -> list[Any]:
    from mmsearch.train.images import decoded_inputs

    inputs, bad = decoded_inputs(student, target.pairs.image_paths, progress=progress)
    if bad.files:  # the teacher read these photos: only a race (a file removed) gets here
        raise TrainingError(bad.describe() or "unreadable photos")
    return inputs


def _texts(teacher: "Embedder", target: TrainSet) -> "torch.Tensor | None":
    """The teacher's vectors of the split's captions (None: photos only)."""
    import torch

    from mmsearch.train.forward import embed_texts

    if not target.pairs.n_captions:
        return None
    return torch.from_numpy(embed_texts(teacher.torch_model, target.tokens))


def _fit(student: "Embedder", data: tuple[list, list[TrainSet], list], options: DistillOptions,
         before: tuple[Recalls | None, float], scale: float, progress: Progress,
         stop: threading.Event | None) -> tuple[dict, Training]:
    """The planned steps, stopped early on the held-out score; (best weights, what ran).
    ``data``: (decoded inputs, teacher targets, caption vectors), each [train, held out]."""
    import torch

    (inputs, held_inputs), (target, held), (text, held_text) = data
    torch.manual_seed(options.seed)
    model = student.torch_model
    plan = options.plan(target.pairs.n_images)
    opt, sched = schedule.optimizer(model, options.lr, options.weight_decay, options.warmup,
                                    plan.total)

    def step(batch: tuple[np.ndarray, np.ndarray]) -> float:
        images, captions = batch
        mine = image_features(model, student, [inputs[i] for i in images])
        goal = target.vectors[images]
        loss = feature_distill(mine, goal)
        if options.affinity:
            loss = loss + options.affinity * affinity_distill(mine, goal, text[captions], scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    return schedule.run(model, plan, lambda epoch: target.batches(options, epoch), step,
                        lambda: _score(*_evaluate(student, held_inputs, held, held_text)),
                        _score(*before), progress, stop)


def _score(found: Recalls | None, cosine: float) -> schedule.Score:
    """The held-out score: recalls first when there are captions, then the cosine."""
    return {"cosine": cosine} if found is None else {**found.score(), "cosine": cosine}


def _evaluate(student: "Embedder", inputs: list[Any], target: TrainSet,
              text: Any) -> tuple[Recalls | None, float]:
    vectors = embed_images(student.torch_model, student, inputs)
    cosine = float(np.mean(np.sum(vectors * target.vectors.numpy(), axis=1)))
    return (None if text is None else recalls(vectors, text.numpy(), target.pairs)), cosine


def _dict(recalls: Recalls | None) -> dict | None:
    return None if recalls is None else recalls.to_dict()


def manifest(report: DistillReport, options: DistillOptions, teacher: dict[str, Any],
             data: dict[str, Any]) -> dict[str, Any]:
    return {"made_by": "mmsearch distill", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime()),
            "teacher": teacher, "towers_changed": ["image"], "data": data,
            "settings": asdict(options), "initialised": report.initialised,
            "metrics": {"teacher": _dict(report.teacher), "student": _dict(report.student),
                        "student_before": _dict(report.student_before),
                        "cosine_to_teacher": report.cosine,
                        "training": report.training.to_dict()},
            "interrupted": report.interrupted}


def distill_to_folder(teacher: "Embedder", split: PairSplit, options: DistillOptions, out: Path,
                      *, store: "Store | None" = None, progress: Progress = no_progress,
                      stop: threading.Event | None = None) -> DistillReport:
    """:func:`distill`, then write the student (with the teacher's text tower) to ``out``."""
    from mmsearch.train.output import base_record, check_target, data_hash, save_model

    check_target(out)
    student, cfg, report = distill(teacher, split, options, store=store, progress=progress,
                                   stop=stop)
    data = {"split": split.how, "hash": data_hash(split.train, split.heldout)}
    save_model(student.torch_model, cfg, student.preprocess_cfg, out,
               manifest(report, options, base_record(teacher.identity), data))
    return report
