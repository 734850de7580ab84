"""The resize and centre crop of open_clip's standard transform, without torchvision.

An :class:`Embedder` whose preprocess is ``Resize`` / ``CenterCrop`` (PIL steps) then
``ToTensor`` + ``Normalize`` turns each image into a uint8 HxWx3 array and normalises
whole batches (see ``Embedder.collate``). :class:`CropSpec` is those PIL steps as plain,
picklable data, so that decode *processes* can run them with Pillow alone (importing
torchvision there costs a second and a few hundred MB per process), and the GPU path
can run the same arithmetic on tensors. :func:`apply_pil` gives the same pixels as
torchvision's transforms on a PIL image (``tests/test_gpu_path.py`` checks them equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_PIL_RESAMPLE = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4,
                 "hamming": 5, "lanczos": 1}


@dataclass(frozen=True)
class Resize:
    """torchvision ``Resize``: ``size`` is [short side] or [height, width]."""

    size: tuple[int, ...]
    interpolation: str  # an InterpolationMode value: "bicubic", "bilinear", ...
    max_size: int | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize (torchvision's ``_compute_resized_output_size``)."""
        if len(self.size) == 2:
            return self.size[0], self.size[1]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_long, new_short) if width <= height else (new_short, new_long)


@dataclass(frozen=True)
class CenterCrop:
    """torchvision ``CenterCrop`` to (height, width), padding with black when larger."""

    size: tuple[int, int]

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, pad_top, pad_left) of the crop in an image of this size (after padding)."""
        ch, cw = self.size
        pad_left = (cw - width) // 2 if cw > width else 0
        pad_top = (ch - height) // 2 if ch > height else 0
        height, width = max(height, ch), max(width, cw)
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), pad_top, pad_left


Step = Resize | CenterCrop


@dataclass(frozen=True)
class CropSpec:
    """The PIL steps of a transform, in order, and the fixed size they end at (or None)."""

    steps: tuple[Step, ...]

    @property
    def out_size(self) -> tuple[int, int] | None:
        """(height, width) every image has after the steps, or None when that varies."""
        fixed: tuple[int, int] | None = None
        for step in self.steps:
            if isinstance(step, CenterCrop):
                fixed = step.size
            elif len(step.size) == 2:
                fixed = (step.size[0], step.size[1])
            else:
                fixed = None
        return fixed


    @property
    def tensor_ok(self) -> bool:
        """Whether torch can run these steps on tensors (bilinear, bicubic, nearest)."""
        return all(s.interpolation in ("bilinear", "bicubic", "nearest")
                   for s in self.steps if isinstance(s, Resize))


def crop_spec(preprocess: Any) -> CropSpec | None:
    """The :class:`CropSpec` of an open_clip preprocess that ``Embedder.prepare`` turns into
    uint8 arrays (Resize/CenterCrop, then ToTensor + Normalize), else None."""
    steps = list(getattr(preprocess, "transforms", None) or [])
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        return None
    out: list[Step] = []
    for step, name in zip(steps[:-2], names[:-2]):
        if name == "Resize" and getattr(step, "interpolation", None) is not None:
            size = step.size if isinstance(step.size, (list, tuple)) else [step.size]
            out.append(Resize(tuple(int(s) for s in size), str(step.interpolation.value),
                              step.max_size))
        elif name == "CenterCrop":
            out.append(CenterCrop((int(step.size[0]), int(step.size[1]))))
        elif name != "MaybeConvertMode":
            return None
    return CropSpec(tuple(out))


def apply_pil(image: Image.Image, spec: CropSpec) -> np.ndarray:
    """``spec``'s steps on an RGB image with Pillow; uint8 HxWx3, as torchvision makes it."""
    for step in spec.steps:
        if isinstance(step, Resize):
            h, w = step.output_size(image.height, image.width)
            if (h, w) != (image.height, image.width):
                image = image.resize((w, h), _PIL_RESAMPLE[step.interpolation])
        else:
            image = _crop_pil(image, step)
    return np.asarray(image, dtype=np.uint8)


def _crop_pil(image: Image.Image, step: CenterCrop) -> Image.Image:
    top, left, pad_top, pad_left = step.box(image.height, image.width)
    ch, cw = step.size
    if pad_top or pad_left or ch > image.height or cw > image.width:
        canvas = Image.new(image.mode, (max(cw, image.width), max(ch, image.height)))
        canvas.paste(image, (pad_left, pad_top))
        image = canvas
        if (image.height, image.width) == (ch, cw):
            return image
    return image.crop((left, top, left + cw, top + ch))
