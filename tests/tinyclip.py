"""A tiny *real* open_clip model for tests, trained in seconds on synthetic data.

No weights are downloaded: :func:`train_tiny_clip` writes an open_clip model
config JSON (a very small ModifiedResNet image tower -- the RN50 family -- and
a small causal text transformer using the standard 49408-token
``SimpleTokenizer`` vocabulary, context length 16), builds the
model through open_clip's own factory, trains it on CPU with the symmetric
InfoNCE (CLIP) loss on captioned synthetic images ("a red circle",
"a blue triangle", ...) and saves a checkpoint that::

    open_clip.add_model_config(config_path)
    open_clip.create_model_and_transforms(config_path.stem,
                                          pretrained=str(checkpoint_path))

loads with ``strict=True``.  The trained model ranks the 12 (colour, shape)
captions against freshly drawn images essentially perfectly, so search tests
can assert meaningful rankings.

Training images are drawn with seeds ``>= TRAIN_SEED_BASE``; tests should use
smaller seeds (e.g. ``range(100)``) for held-out images.

Notes on open_clip behaviour this relies on:

* ``add_model_config(path)`` registers the config under ``path.stem`` in a
  process-global registry (later registrations of the same stem win).
* A top-level ``"preprocess_cfg"`` key must NOT be put in a model config used
  this way: ``create_model`` passes every top-level key to ``CLIP(**cfg)``
  (-> ``TypeError``), and it never reads preprocess settings from a built-in
  config anyway (only from pretrained tags / ``local-dir:`` / ``hf-hub:``).
  The defaults (OpenAI mean/std, bicubic resize to ``image_size``, centre
  crop) are used, with the size taken from ``vision_cfg.image_size``.
* The text context length comes from ``text_cfg.context_length``; use
  ``open_clip.get_tokenizer(stem)`` (which reads it from the registered
  config), not ``open_clip.tokenize`` (which pads to 77 and would not match).
* ``create_model_and_transforms`` returns the model in *train* mode; the
  image tower has BatchNorm, so callers must ``model.eval()`` (as for the real
  RN50 CLIPs).  In train mode a batch of one image raises in BatchNorm.
* ``pretrained=<file path>`` loads a ``{"state_dict": ...}`` dict or a bare
  state dict with ``strict=True`` (``weights_only=True`` torch.load).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
}

MODEL_NAME = "tinyclip-test"
CONTEXT_LENGTH = 16
IMAGE_SIZE = 32

#: Training images use draw seeds ``TRAIN_SEED_BASE * (seed + 1) + k``;
#: seeds below TRAIN_SEED_BASE are never used in training.
TRAIN_SEED_BASE = 1_000_000

# Training recipe (fixed step count => deterministic given seed; `seconds`
# is only an optional wall-clock cap).  250 steps: every one of 15 training
# seeds tried passed the quality bar in tests/test_tinyclip.py (200 steps: 14/15).
_STEPS = 250
_POOL_PER_COMBO = 100
_GROUPS = 4
_LR = 2e-3
_WEIGHT_DECAY = 0.05
_WARMUP = 20
_RECIPE_VERSION = 1
_THREADS = 1  # 2 threads is only ~20% faster idle, but OpenMP spin-waits make it
# 10x slower when the 2 cores are oversubscribed (parallel test runs).

CONFIG = {
    "embed_dim": 64,
    # A list of 4 stage depths selects open_clip's ModifiedResNet (the RN50
    # family) instead of a ViT: a tiny ViT needs ~5-10x more steps to learn
    # shape under position jitter.  Note it has BatchNorm, so model.eval()
    # matters at inference (as with the real RN50 CLIP models).
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "layers": [1, 1, 1, 1],
        "width": 8,
        "head_width": 32,
    },
    "text_cfg": {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def draw_shape(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw one big ``color`` ``shape`` on a noisy grey background (RGB).

    Position, size, background tone, noise, and a slight colour jitter all
    depend on ``seed``, so images with different seeds differ.
    """
    if color not in RGB:
        raise ValueError(f"unknown color {color!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    rng = random.Random(f"{color}/{shape}/{size}/{seed}")
    nprng = np.random.default_rng(rng.getrandbits(32))

    bg = rng.randint(100, 160)
    noise = nprng.normal(0.0, 12.0, size=(size, size, 3))
    arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)

    r = rng.uniform(0.28, 0.40) * size  # half-extent of the shape
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    fill = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in RGB[color])

    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:  # triangle, pointing up, with a little rotation jitter
        a0 = -math.pi / 2 + rng.uniform(-0.25, 0.25)
        pts = [(cx + r * math.cos(a0 + k * 2 * math.pi / 3),
                cy + r * math.sin(a0 + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(pts, fill=fill)
    return img


def write_config(path: Path) -> Path:
    """Write the tiny model's open_clip config JSON to ``path``; return it.

    The model name for open_clip is ``path.stem``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(CONFIG, indent=2) + "\n"
    if not path.exists() or path.read_text() != text:
        _atomic_write_text(path, text)
    return path


def _recipe(seed: int) -> dict:
    return {"seed": seed, "version": _RECIPE_VERSION, "steps": _STEPS, "groups": _GROUPS,
            "pool_per_combo": _POOL_PER_COMBO, "lr": _LR, "weight_decay": _WEIGHT_DECAY,
            "warmup": _WARMUP, "threads": _THREADS, "config": CONFIG}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def contrastive_step(model, logits, labels, opt, sched) -> float:
    """One step of symmetric InfoNCE on ``logits`` (groups, images, texts) whose matching
    pairs are ``labels``; the learnable temperature is clamped at 100 as open_clip does.
    Shared by the tiny models the tests train (this one, tinyml, Chinese-CLIP)."""
    import torch
    import torch.nn.functional as F

    loss = (F.cross_entropy(logits.flatten(0, 1), labels)
            + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss)


def train_tiny_clip(out_dir: Path, seconds: float | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Train (or reuse) the tiny CLIP in ``out_dir``; return (config, checkpoint).

    Training runs a fixed number of steps (``_STEPS``), so the result is
    deterministic for a given ``seed`` (same torch build, 2 threads); it takes
    about 5-8 s on an idle 2-core machine (much longer when the CPU is
    oversubscribed).  ``seconds`` is an optional wall-clock cap (default: none,
    because a time-based stop makes the model depend on machine load): if it
    runs out first, training stops early, a RuntimeWarning is issued, and the
    probably under-trained checkpoint is returned but not cached, so the next
    call trains again.  A finished checkpoint for the same
    seed and recipe already in ``out_dir`` is returned without retraining.

    Files in ``out_dir``: ``tinyclip-test.json`` (open_clip model config; the
    model name is its stem), ``tinyclip-test.pt`` (``{"state_dict": ...}``)
    and ``tinyclip-test.meta.json`` (recipe + training stats, written last).
    The config is registered with ``open_clip.add_model_config`` on return.
    """
    import warnings

    import open_clip
    import torch
    import torch.nn.functional as F

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = write_config(out_dir / f"{MODEL_NAME}.json")
    ckpt_path = out_dir / f"{MODEL_NAME}.pt"
    meta_path = out_dir / f"{MODEL_NAME}.meta.json"
    open_clip.add_model_config(config_path)

    recipe = _recipe(seed)
    if ckpt_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("recipe") == recipe and meta.get("complete"):
            return config_path, ckpt_path
    meta_path.unlink(missing_ok=True)  # the checkpoint is unfinished until the meta exists

    start = time.monotonic()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=None)
        tokenizer = open_clip.get_tokenizer(MODEL_NAME)

        pairs = combos()
        n = len(pairs)
        texts = tokenizer([caption(c, s) for c, s in pairs])  # (n, context_length)
        base = TRAIN_SEED_BASE * (seed + 1)
        # pool[k, i] = k-th training image of combo i, preprocessed exactly as at inference
        pool = torch.stack([
            torch.stack([preprocess(draw_shape(c, s, seed=base + k)) for (c, s) in pairs])
            for k in range(_POOL_PER_COMBO)
        ])

        gen = torch.Generator().manual_seed(seed)
        # The 49408x64 token table is ~90% of the parameters but only ~8 rows
        # are ever used: keep it frozen at its random init (AdamW over it
        # would dominate the step time); the transformer learns on top.
        model.token_embedding.weight.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=_LR, weight_decay=_WEIGHT_DECAY,
                                betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / _WARMUP)
            * 0.5 * (1 + math.cos(math.pi * min(i, _STEPS) / _STEPS)))
        labels = torch.arange(n).repeat(_GROUPS)
        model.train()
        steps_done = 0
        loss = torch.tensor(float("nan"))
        for _ in range(_STEPS):
            if seconds is not None and time.monotonic() - start > seconds:
                break
            # A step = _GROUPS batches of n (image, caption) pairs, one image
            # per combo, so no caption repeats inside a batch; symmetric
            # InfoNCE per batch.  The n captions are encoded once per step.
            ks = torch.randint(0, _POOL_PER_COMBO, (_GROUPS, n), generator=gen)
            images = pool[ks, torch.arange(n)].flatten(0, 1)  # (_GROUPS*n, 3, H, W)
            img_f = F.normalize(model.encode_image(images), dim=-1).view(_GROUPS, n, -1)
            txt_f = F.normalize(model.encode_text(texts), dim=-1)
            logits = model.logit_scale.exp() * img_f @ txt_f.T  # (_GROUPS, n img, n txt)
            loss = contrastive_step(model, logits, labels, opt, sched)
            steps_done += 1
        model.eval()

        tmp = ckpt_path.with_name(f".{ckpt_path.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict()}, tmp)
        os.replace(tmp, ckpt_path)
    finally:
        torch.set_num_threads(old_threads)

    elapsed = time.monotonic() - start
    complete = steps_done == _STEPS
    if not complete:
        warnings.warn(f"tinyclip: training stopped by the {seconds:g} s cap after "
                      f"{steps_done}/{_STEPS} steps; the model may rank poorly", RuntimeWarning)
        return config_path, ckpt_path
    _atomic_write_text(meta_path, json.dumps({
        "recipe": recipe, "complete": complete, "steps_done": steps_done,
        "final_loss": round(float(loss), 5), "seconds": round(elapsed, 2),
    }, indent=2) + "\n")
    return config_path, ckpt_path
