"""The compute device, resolved once per engine and handed to the model and to FAISS;
where text queries run (:func:`text_device`), and uint8 batches made model input on it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

from mmsearch.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


# --device values that name one of ONNX Runtime's execution providers, not a torch device
# (``openvino`` takes OpenVINO's device after a colon: openvino:GPU, openvino:NPU; the CPU
# by default): the image tower runs there (--runtime onnx or onnx-int8), what torch does
# stays on the CPU, FAISS searches on the CPU and text queries are encoded there
ORT_PROVIDERS = {"openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider"}
DEVICES = "auto, cpu, cuda, cuda:N, openvino[:CPU|GPU|NPU] or coreml"


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ort_provider(device: str) -> str | None:
    """The ONNX Runtime execution provider a ``--device`` value names (``openvino[:X]``,
    ``coreml``), else None."""
    head, colon, rest = device.partition(":")
    if head not in ORT_PROVIDERS:
        return None
    if colon and (head != "openvino" or not rest):
        raise UsageError(f"--device {device}: use {DEVICES}")
    return ORT_PROVIDERS[head]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a named CUDA device must exist.

    Idempotent: a resolved name resolves to itself. Imports torch unless ``device`` is ``cpu``
    or names an ONNX Runtime provider (:func:`ort_provider`).
    """
    if device == "cpu" or ort_provider(device):
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return device


def torch_device(device: str) -> str:
    """Where torch places the model for a resolved ``--device``: the CPU for ONNX Runtime's
    providers (:func:`ort_provider`), else the device itself."""
    return "cpu" if ort_provider(device) else device


def faiss_gpu(device: str) -> int | None:
    """The GPU FAISS may search on for a ``--device`` value, without importing torch.

    ``cpu``, ``openvino``, ``coreml`` -> None (never a GPU); ``cuda`` -> 0; ``cuda:N`` -> N;
    ``auto`` -> -1, meaning GPU 0 if FAISS was built with GPU support and sees one.
    """
    if device == "cpu" or ort_provider(device):
        return None
    if device == "auto":
        return -1
    if device == "cuda":
        return 0
    head, _, number = device.partition(":")
    if head != "cuda" or not number.isdigit():
        raise UsageError(f"--device {device}: use {DEVICES}")
    return int(number)


def text_device(device: str) -> str:
    """Where text queries are encoded for a ``--device`` value: ``auto`` (and ONNX Runtime's
    providers) -> ``cpu``.

    A short text costs milliseconds on the CPU through the numpy text tower, while
    starting CUDA and moving a text tower there costs seconds: a cold ``mmsearch query``
    on a GPU machine would spend them all on one text. A device named explicitly
    (``cuda``, ``cuda:1``) is honoured. Does not import torch.
    """
    return "cpu" if device == "auto" or ort_provider(device) else device


def stack_uint8(items: Sequence["np.ndarray"], *, pin: bool = False) -> "torch.Tensor":
    """Stack HxWx3 uint8 arrays into one (N, H, W, 3) uint8 tensor; ``pin``: in page-locked
    memory, so that the copy to a GPU is asynchronous (a quarter of float32's bytes)."""
    import numpy as np
    import torch

    first = items[0]
    out = torch.empty((len(items), *first.shape), dtype=torch.uint8, pin_memory=pin)
    np.stack(items, out=out.numpy())
    return out


def normalise_on(batch: "torch.Tensor", mean: "torch.Tensor", std: "torch.Tensor",
                 device: str) -> "torch.Tensor":
    """A uint8 (N, H, W, 3) batch (a view of any layout, on any device) -> the model's float
    (N, 3, H, W) input on ``device``: ToTensor + Normalize there, in the same float32 steps
    as on the CPU (on the CPU the result is bit-identical to per-batch normalising)."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.sub_(_on(mean, device)).div_(_on(std, device)).contiguous()


def _on(t: "torch.Tensor", device: str) -> "torch.Tensor":
    """``t`` on ``device``, copied there once (mean and std are used every batch)."""
    if str(t.device) == device or device == "cpu":
        return t
    cache = _COPIES.setdefault(device, {})
    key = id(t)
    if key not in cache or cache[key][0] is not t:
        cache[key] = (t, t.to(device))
    return cache[key][1]


_COPIES: dict[str, dict[int, tuple["torch.Tensor", "torch.Tensor"]]] = {}


def cuda_jpeg_decoding(device: str) -> bool:
    """Whether torchvision can decode JPEGs on ``device`` (nvJPEG: a CUDA device and a
    torchvision built with it). Imports torch, torchvision."""
    if not device.startswith("cuda"):
        return False
    try:
        import torch
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
