"""Distil a teacher's image tower into a smaller one that lands in the teacher's space.

The student is the teacher with its vision tower replaced (any open_clip vision config,
e.g. ``ViT-S-32``'s, projected to the teacher's dimension); the teacher's text tower is
kept as it is, so text queries keep the teacher's quality. Targets are the teacher's
image vectors (read from an index that holds them, else embedded once). Loss:
``1 - cos(student, teacher)`` plus, when captions are given, ``w * KL`` between the
teacher's and the student's image->text distributions over the batch's captions.
Where shapes allow, the student starts from the teacher's weights (blocks picked evenly,
as TinyCLIP's uniform layer selection); otherwise from scratch.
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
from mmsearch.train.data import TrainSet, prepare_set
from mmsearch.train.finetune import optimizer
from mmsearch.train.forward import Recalls, embed_images, image_features, recalls
from mmsearch.train.losses import affinity_distill, feature_distill
from mmsearch.train.output import model_config
from mmsearch.train.pairs import PairSplit

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmsearch.models.openclip import Embedder
    from mmsearch.store import Store


@dataclass(frozen=True)
class DistillOptions:
    student: str = "ViT-S-32"  # an open_clip architecture or a config JSON: its vision_cfg
    from_teacher: bool = True  # copy the teacher's weights where shapes match
    affinity: float = 1.0  # weight of the soft-target loss
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    epochs: int = 10
    patience: int = 3
    batch_size: int = 64
    seed: int = 0


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
    epochs: list[dict[str, float]]
    interrupted: bool
    seconds: float
    unreadable: list[str]


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
    before = _evaluate(student, inputs[1], targets[1], text[1])[0]
    log, interrupted = _fit(student, inputs[0], targets[0], text[0], options,
                            _logit_scale(teacher), progress, stop)
    after, cosine = _evaluate(student, inputs[1], targets[1], text[1])
    teacher_r = None if text[1] is None else recalls(targets[1].vectors.numpy(), text[1].numpy(),
                                                      targets[1].pairs)
    count = lambda m: sum(p.numel() for p in m.visual.parameters())  # noqa: E731
    report = DistillReport(teacher_r, before, after, cosine, count(teacher.torch_model),
                           count(model), how, log, interrupted, time.monotonic() - start,
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


def _fit(student: "Embedder", inputs: list[Any], target: TrainSet, text: Any,
         options: DistillOptions, scale: float, progress: Progress,
         stop: threading.Event | None) -> tuple[list[dict[str, float]], bool]:
    model = student.torch_model
    steps = target.steps_per_epoch(options.batch_size)
    opt, sched = optimizer(model, options.lr, options.weight_decay, options.warmup,
                           steps * options.epochs)
    log: list[dict[str, float]] = []
    try:
        for epoch in range(1, options.epochs + 1):
            losses = []
            for step, (images, captions) in enumerate(target.batches(options, epoch), 1):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                mine = image_features(model, student, [inputs[i] for i in images])
                goal = target.vectors[images]
                loss = feature_distill(mine, goal)
                if options.affinity:
                    loss = loss + options.affinity * affinity_distill(mine, goal, text[captions], scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                progress(f"train|epoch {epoch}/{options.epochs}, loss {losses[-1]:.4f}",
                         (epoch - 1) * steps + step, steps * options.epochs)
            log.append({"epoch": epoch, "loss": float(np.mean(losses))})
    except KeyboardInterrupt:
        return log, True
    return log, False


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
                        "cosine_to_teacher": report.cosine, "epochs": report.epochs},
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
