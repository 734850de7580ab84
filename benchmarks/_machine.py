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


# -- helpers of the index-scale and query benchmarks (describe()/header() above unchanged) --

def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    """describe() plus FAISS build/threads, torch threads and the 1/5/15-minute load average."""
    info: dict = dict(describe())
    info["load_avg_start"] = load_avg()
    try:
        import faiss

        info["faiss_compile"] = faiss.get_compile_options()
        info["faiss_threads"] = str(faiss.omp_get_max_threads())
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        info["torch_threads"] = str(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        pass
    try:  # the build (onnxruntime, onnxruntime-openvino, -gpu) and its execution providers
        import onnxruntime as ort

        info["onnxruntime"] = f"{ort.__version__} ({', '.join(ort.get_available_providers())})"
    except ImportError:  # pragma: no cover
        pass
    return info


def machine_text(info: dict) -> str:
    """The machine block of a text report ('#'-prefixed lines), with the load at start and end."""
    lines = [f"# {k}: {v}" for k, v in info.items()
             if k not in ("load_avg_1m", "load_avg_start", "load_avg_end")]
    lines.append(f"# load average (1/5/15 min): {info.get('load_avg_start')} at start"
                 + (f", {info['load_avg_end']} at end" if "load_avg_end" in info else "")
                 + f" -- {info['cores']} cores; a load above that means other processes competed")
    return "\n".join(lines)


def rss_mib() -> float:
    """Resident set size of this process, MiB (file-backed mapped pages included)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_results(stem: str, text: str, data: dict) -> tuple[str, str]:
    """Write benchmarks/results/<stem>.txt and .json; returns their paths."""
    import json
    from pathlib import Path

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    txt, js = out / f"{stem}.txt", out / f"{stem}.json"
    txt.write_text(text if text.endswith("\n") else text + "\n")
    js.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return str(txt), str(js)


def _jsonable(obj: object) -> object:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
