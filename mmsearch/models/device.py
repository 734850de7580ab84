"""The compute device, resolved once per engine and handed to the model and to FAISS."""

from __future__ import annotations

from mmsearch.errors import UsageError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a named CUDA device must exist.

    Idempotent: a resolved name resolves to itself. Imports torch.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    return device


def faiss_gpu(device: str) -> int | None:
    """The GPU FAISS may search on for a ``--device`` value, without importing torch.

    ``cpu`` -> None (never a GPU); ``cuda`` -> 0; ``cuda:N`` -> N; ``auto`` -> -1,
    meaning GPU 0 if FAISS was built with GPU support and sees one.
    """
    if device == "cpu":
        return None
    if device == "auto":
        return -1
    if device == "cuda":
        return 0
    head, _, number = device.partition(":")
    if head != "cuda" or not number.isdigit():
        raise UsageError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return int(number)
