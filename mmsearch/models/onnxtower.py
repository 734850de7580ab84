"""The image tower through ONNX Runtime: fp32, or dynamically quantised to int8.

``--runtime`` picks who runs the image tower when photos are embedded (open_clip's
ResNets and ViTs, Chinese-CLIP's ViT: anything with ``encode_image``; the tests hold
each kind equal to torch):

* ``torch``: open_clip's model (the reference every test compares with);
* ``onnx``: the tower exported with ``torch.onnx.export`` and run by ONNX Runtime with
  its CPU execution provider (CUDA's with ``--device cuda`` where the installed build,
  onnxruntime-gpu, has it: :func:`providers`); its vectors equal torch's (cosine >= 0.9999 per image), so an index may mix
  them with torch's;
* ``onnx-int8``: that export with its weights quantised to int8 (dynamic quantisation),
  faster on a CPU but not equal: cosine ~0.99 to fp32. Its vectors are a different
  model's as far as an index is concerned: the index records ``image_precision="int8"``
  in its model identity and refuses fp32 vectors afterwards, and the other way round;
* ``auto`` (the default): ``onnx-int8`` for an index that holds int8 vectors, else
  ``torch``. The ONNX runtimes are asked for by name: the first use exports the tower
  (seconds to a minute), and fp32 ONNX is only a few per cent faster than torch.

The exported files live under ``<home>/.models/onnx/``, one per model fingerprint, image
size and precision, written to a temporary name and renamed into place. A tower that
fails to export or to load falls back to torch, and the reason is kept in one line
(:attr:`ImageRuntime.note`) for the shells to show.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mmsearch.errors import UsageError
from mmsearch.models.device import ort_provider
from mmsearch.models.identity import FP32, INT8
from mmsearch.settings import RUNTIMES

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from mmsearch.models.identity import ModelIdentity

FOLDER = Path(".models") / "onnx"
OPSET = 17


def resolve_runtime(runtime: str, device: str, image_precision: str) -> str:
    """``auto`` -> ``onnx-int8`` for an int8 index (``image_precision``), else ``torch`` (``onnx``
    on ONNX Runtime's own devices, ``openvino`` and ``coreml``); an ONNX runtime needs
    onnxruntime, and a build with the device's execution provider (:func:`providers`)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    ort_device = ort_provider(device)
    if runtime == "auto":
        runtime = "onnx-int8" if image_precision == INT8 else "onnx" if ort_device else "torch"
    if runtime == "torch":
        if ort_device:
            raise UsageError(f"--device {device} is ONNX Runtime's {ort_device}: "
                             "use --runtime onnx or onnx-int8 with it (or --device cpu)")
        return runtime
    if not _have_onnxruntime():
        raise UsageError(f"--runtime {runtime} needs ONNX Runtime: pip install 'mmsearch[onnx]'")
    import onnxruntime as ort

    first = providers(device)[0]
    wanted = first if isinstance(first, str) else first[0]
    if wanted not in ort.get_available_providers():
        raise UsageError(f"--runtime {runtime} --device {device}: this ONNX Runtime build has no "
                         f"{wanted} (it has {', '.join(ort.get_available_providers())}); install "
                         f"{_PROVIDER_WHEELS.get(wanted, 'a build with it')}, or use --device cpu")
    return runtime


# where each execution provider comes from (one onnxruntime package per environment)
_PROVIDER_WHEELS = {"CUDAExecutionProvider": "onnxruntime-gpu in place of onnxruntime",
                    "OpenVINOExecutionProvider": "onnxruntime-openvino in place of onnxruntime",
                    "CoreMLExecutionProvider": "onnxruntime on macOS (its wheels have CoreML)"}


def providers(device: str) -> list[Any]:
    """ONNX Runtime execution providers for a resolved ``--device``, each then the CPU for
    what it lacks: ``cuda[:N]`` -> CUDA; ``openvino[:X]`` -> OpenVINO on its device X (the
    CPU by default) in float32 (on a CPU with bfloat16 OpenVINO would otherwise compute in
    it: other vectors than torch's); ``coreml`` -> CoreML on the CPU and GPU (the Neural
    Engine computes in float16); anything else the CPU."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    provider = ort_provider(device)
    if provider == "OpenVINOExecutionProvider":
        options = {"device_type": device.partition(":")[2] or "CPU", "precision": "FP32"}
        return [(provider, options), "CPUExecutionProvider"]
    if provider == "CoreMLExecutionProvider":
        return [(provider, {"MLComputeUnits": "CPUAndGPU"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def precision(runtime: str) -> str:
    """The precision of the image vectors a runtime makes: ``int8`` or ``fp32``."""
    return INT8 if runtime == "onnx-int8" else FP32


def _have_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


@dataclass
class ImageRuntime:
    """Who runs the image tower: ``run`` (a batch in, unnormalised vectors out) or None for
    torch; ``runtime`` the one in use; ``note`` why an asked ONNX runtime is not, or why it
    runs on ONNX Runtime's CPU provider instead of the device's (one line)."""

    runtime: str
    run: Callable[["torch.Tensor"], "np.ndarray"] | None = None
    note: str | None = None
    export_seconds: float | None = None  # set when this process exported the tower


def onnx_path(home: Path, identity: "ModelIdentity", size: int, runtime: str) -> Path:
    """Where the exported tower of ``identity`` at input ``size`` is kept for ``runtime``."""
    import torch

    key = "\0".join((identity.backend, identity.arch, identity.fingerprint, str(size),
                     torch.__version__, str(OPSET)))
    digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return home / FOLDER / f"{digest}-{precision(runtime)}.onnx"


def load_runtime(runtime: str, identity: "ModelIdentity", model: Any, size: int, home: Path,
                 device: str) -> ImageRuntime:
    """The :class:`ImageRuntime` ``runtime`` resolves to for ``model`` (anything with
    ``encode_image``: open_clip's model, Chinese-CLIP's vision tower); its note (a fallback
    to torch) and a first export's time are logged once, as one line each."""
    import logging

    asked = resolve_runtime(runtime, device, identity.image_precision)
    chosen = image_runtime(asked, identity, model, size, home, device)
    log = logging.getLogger("mmsearch.models")
    if chosen.note:
        log.warning(chosen.note)
    if chosen.export_seconds is not None:
        log.warning(f"--runtime {asked}: exported the image tower in {chosen.export_seconds:.1f}s "
                    "(once per model)")
    return chosen


def image_runtime(runtime: str, identity: "ModelIdentity", model: Any, size: int,
                  home: Path, device: str = "cpu") -> ImageRuntime:
    """The image tower for ``runtime``: exported and loaded once, or torch with a note."""
    if runtime == "torch":
        return ImageRuntime("torch")
    started = time.perf_counter()
    path = onnx_path(home, identity, size, runtime)
    try:
        exported = not path.is_file()
        if exported:
            _export(model, size, onnx_path(home, identity, size, "onnx"))
            if runtime == "onnx-int8":
                _quantise(onnx_path(home, identity, size, "onnx"), path)
        session = _session(path, device)
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure: torch does it
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        return ImageRuntime("torch", note=f"--runtime {runtime}: the image tower could not be "
                                          f"exported ({type(exc).__name__}: {reason}); using torch")
    seconds = round(time.perf_counter() - started, 1) if exported else None
    return ImageRuntime(runtime, _runner(session), export_seconds=seconds,
                        note=_provider_note(session, device))


def _provider_note(session: Any, device: str) -> str | None:
    """One line when the device's provider did not start (ONNX Runtime then runs the session
    on its CPU provider: the same vectors, slower), else None."""
    wanted = providers(device)[0]
    wanted = wanted if isinstance(wanted, str) else wanted[0]
    if session.get_providers()[0] == wanted:
        return None
    return (f"--device {device}: ONNX Runtime's {wanted} could not run this image tower here "
            "(a device it lacks, or the model's operators); its CPU provider runs it")


def _export(model: Any, size: int, path: Path) -> None:
    """``model.encode_image`` as an ONNX file with a dynamic batch axis (atomically)."""
    if path.is_file():
        return
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(pixels)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # grad on: nn.MultiheadAttention's inference fast path has no ONNX form
        with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # the tracer's warnings and dumps: the library is quiet
            pixels = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
            torch.onnx.export(ImageTower().eval(), (pixels,), str(tmp),
                              input_names=["pixels"], output_names=["embedding"],
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _quantise(source: Path, path: Path) -> None:
    """``source`` with its MatMul/Gemm weights dynamically quantised to int8 (atomically)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model is not for our users
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, path)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)


def _session(path: Path, device: str) -> Any:
    """The session of ``path`` on ``device``'s providers; where the device's provider refuses
    the model (OpenVINO's, the int8 tower's dynamic quantisation), on the CPU provider alone
    (:func:`_provider_note` says so)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library stays quiet
    ort.set_default_logger_severity(4)  # a provider that fails to start: _provider_note says it
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except Exception:  # noqa: BLE001 - ONNX Runtime's own Fail/InvalidGraph errors
        if providers(device) == ["CPUExecutionProvider"]:
            raise
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _runner(session: Any) -> Callable[["torch.Tensor"], "np.ndarray"]:
    import numpy as np

    def run(batch: "torch.Tensor") -> "np.ndarray":
        pixels = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return session.run(["embedding"], {"pixels": pixels})[0]

    return run


__all__ = ["ImageRuntime", "RUNTIMES", "image_runtime", "load_runtime", "onnx_path", "precision",
           "providers", "resolve_runtime"]
