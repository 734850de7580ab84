"""Describe the machine and library versions a benchmark ran on (printed with every result)."""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return float("nan")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def describe() -> dict[str, str]:
    """Machine, load and versions as a flat dict."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cores": str(cores),
        "ram_gib": f"{_mem_gib():.0f}",
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for pkg in ("torch", "torchvision", "open_clip_torch", "faiss-cpu", "numpy", "pillow"):
        info[pkg] = _version(pkg)
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover
        info["gpu"] = "unknown"
    return info


def header() -> str:
    return "\n".join(f"# {k}: {v}" for k, v in describe().items())
