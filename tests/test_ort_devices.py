"""ONNX Runtime's own devices: ``--device openvino[:X]`` and ``--device coreml`` run the image
tower on that execution provider, everything torch does on the CPU.

The OpenVINO tests are real: ``onnxruntime-openvino`` (a whole ONNX Runtime with OpenVINO's
provider; it cannot share an environment with ``onnxruntime``) is installed beside the
virtual environment, in ``<venv>/ort-openvino``, by the test command, and a child process
finds it first on its ``PYTHONPATH``. CoreML's provider exists only on macOS: here only its
refusal in one line is tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import UsageError
from mmsearch.models.device import faiss_gpu, ort_provider, resolve_device, text_device, torch_device
from mmsearch.models.onnxtower import providers, resolve_runtime

pytest.importorskip("onnxruntime")

OPENVINO_ORT = Path(sys.prefix) / "ort-openvino"


def test_the_device_names_its_provider_and_torch_stays_on_the_cpu() -> None:
    assert ort_provider("openvino") == ort_provider("openvino:GPU") == "OpenVINOExecutionProvider"
    assert ort_provider("coreml") == "CoreMLExecutionProvider"
    assert ort_provider("cpu") is ort_provider("cuda:1") is None
    for bad in ("coreml:1", "openvino:"):
        with pytest.raises(UsageError, match="openvino"):
            ort_provider(bad)
    for device in ("openvino", "openvino:NPU", "coreml"):
        assert resolve_device(device) == device and torch_device(device) == "cpu"
        assert faiss_gpu(device) is None and text_device(device) == "cpu"
    assert providers("openvino") == [("OpenVINOExecutionProvider",
                                      {"device_type": "CPU", "precision": "FP32"}),
                                     "CPUExecutionProvider"]
    assert providers("openvino:GPU")[0][1]["device_type"] == "GPU"
    assert providers("coreml")[0][0] == "CoreMLExecutionProvider"


def test_torch_on_an_onnx_device_and_a_missing_provider_are_refused_in_one_line() -> None:
    import onnxruntime as ort

    assert resolve_runtime("auto", "cpu", "fp32") == "torch"
    with pytest.raises(UsageError, match="use --runtime onnx or onnx-int8"):
        resolve_runtime("torch", "coreml", "fp32")
    if "CoreMLExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="no CoreMLExecutionProvider") as err:
            resolve_runtime("auto", "coreml", "fp32")
        assert "\n" not in str(err.value) and "macOS" in str(err.value)
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="onnxruntime-openvino in place of onnxruntime"):
            resolve_runtime("onnx-int8", "openvino", "int8")


def test_the_cli_refuses_a_device_this_build_lacks_and_keeps_the_index(
        home: Path, tiny_model: tuple[Path, Path], flickr_images: list[Path]) -> None:
    import onnxruntime as ort
    from typer.testing import CliRunner

    from mmsearch.cli.main import app

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("this environment's onnxruntime has OpenVINO's provider")
    config, ckpt = tiny_model
    photos = home.parent / "photos"
    photos.mkdir()
    for p in flickr_images[:3]:
        shutil.copy(p, photos / p.name)
    args = ["index", str(photos), "--model", str(config), "--pretrained", str(ckpt)]
    assert CliRunner().invoke(app, [*args, "--device", "cpu"]).exit_code == 0
    shutil.copy(flickr_images[3], photos / flickr_images[3].name)  # something to embed
    bad = CliRunner().invoke(app, [*args, "--device", "openvino"])
    assert bad.exit_code != 0 and "OpenVINOExecutionProvider" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    found = CliRunner().invoke(app, ["query", "a dog", "-k", "5", "--device", "cpu"])
    assert found.exit_code == 0 and found.output.count(".jpg") == 3  # the three kept


def _openvino_child(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OPENVINO_ORT), str(Path.cwd())])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _embed_in_child(runs: list[tuple[str, str, str, str, str]], photos: list[str],
                    home: Path) -> dict:
    """In a child with the OpenVINO build: for each (label, model, weights, device, runtime),
    the image runtime used, its note and the photos' vectors; 'ort': where onnxruntime was."""
    code = (
        "import json, onnxruntime\n"
        "from pathlib import Path\n"
        "from mmsearch.models import identify\n"
        "from mmsearch.models.backends import load_embedder\n"
        "from mmsearch.ingest.decode import load_image\n"
        "out = {'ort': onnxruntime.__file__}\n"
        f"for label, model, weights, device, runtime in {runs!r}:\n"
        "    emb = load_embedder(identify(model, weights), device, runtime=runtime,\n"
        f"                        home=Path({str(home)!r}))\n"
        f"    batch = emb.collate([emb.prepare(load_image(p)) for p in {photos!r}])\n"
        "    out[label] = {'runtime': emb.runtime.runtime, 'note': emb.runtime.note,\n"
        "                  'vectors': emb.encode_images(batch).tolist()}\n"
        "print(json.dumps(out))\n")
    child = _openvino_child(code, home)
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def openvino() -> Path:
    if not (OPENVINO_ORT / "onnxruntime").is_dir():
        pytest.skip(f"onnxruntime-openvino is not installed in {OPENVINO_ORT} (the README's test "
                    "command installs it there)")
    return OPENVINO_ORT


def test_openvino_vectors_equal_torch(openvino: Path, tmp_path: Path, tiny_model: tuple[Path, Path],
                                      flickr_images: list[Path]) -> None:
    """The tiny model's tower and ViT-B-32 (random weights) on OpenVINO's CPU device, fp32."""
    from mmsearch.ingest.decode import load_image
    from mmsearch.models import identify
    from mmsearch.models.backends import load_embedder

    config, ckpt = tiny_model
    photos = [str(p) for p in flickr_images[:6]]
    out = _embed_in_child([("tiny", str(config), str(ckpt), "openvino", "auto"),
                           ("vit", "ViT-B-32", "none", "openvino", "auto")], photos, tmp_path)
    assert out["ort"].startswith(str(openvino))  # the OpenVINO build, not the environment's
    for name, model, weights in [("tiny", str(config), str(ckpt)), ("vit", "ViT-B-32", "none")]:
        got = out[name]
        assert got["runtime"] == "onnx" and got["note"] is None  # auto: onnx on this device
        ref = load_embedder(identify(model, weights), "cpu", runtime="torch")
        want = ref.encode_images(ref.collate([ref.prepare(load_image(p)) for p in photos]))
        if name == "vit":  # random weights are drawn anew: compare through the same export
            ref = load_embedder(identify(model, weights), "cpu", runtime="onnx", home=tmp_path)
            want = ref.encode_images(ref.collate([ref.prepare(load_image(p)) for p in photos]))
        assert (np.asarray(got["vectors"], dtype=np.float32) * want).sum(1).min() >= 0.9999


def test_openvino_indexes_from_the_cli_and_a_missing_device_is_said(
        openvino: Path, home: Path, tiny_model: tuple[Path, Path],
        flickr_images: list[Path]) -> None:
    from mmsearch.engine import Engine

    config, ckpt = tiny_model
    photos = home.parent / "photos"
    photos.mkdir()
    for p in flickr_images[:40]:
        shutil.copy(p, photos / p.name)
    cli = ("import sys\nfrom mmsearch.cli import main\nsys.argv = ['mmsearch'] + "
           "sys.argv[1:]\nmain()\n")
    base = [str(photos), "--model", str(config), "--pretrained", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(openvino), str(Path.cwd())]),
           "MMSEARCH_HOME": str(home)}
    run = subprocess.run([sys.executable, "-c", cli, "index", *base, "--device", "openvino"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with Engine.open("default", create=False, device="cpu") as engine:
        assert engine.store.model.image_precision == "fp32"
        ids, stored = engine.store.image_vectors()
        assert len(ids) == 40
        torch_vectors = engine.embed_image(photos / flickr_images[0].name)  # torch, on the CPU
        first = engine.store.image_records([int(i) for i in ids])
        row = [i for i in ids if Path(first[int(i)]["path"]).name == flickr_images[0].name][0]
        assert float(stored[list(ids).index(row)] @ torch_vectors[0]) >= 0.9999
    # an OpenVINO device this machine lacks: the CPU provider does it, said in one line
    shutil.copy(flickr_images[40], photos / flickr_images[40].name)
    run = subprocess.run([sys.executable, "-c", cli, "index", *base, "--device", "openvino:NPU"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    said = [line for line in run.stderr.splitlines() if "OpenVINOExecutionProvider" in line]
    assert len(said) == 1 and "CPU provider runs it" in said[0], run.stderr[-2000:]


def test_openvino_int8_runs_on_the_cpu_provider_with_one_line(
        openvino: Path, tmp_path: Path, flickr_images: list[Path]) -> None:
    """OpenVINO's provider refuses the int8 tower (ONNX Runtime's dynamic quantisation: "the
    graph is not acyclic"); the same int8 model then runs on the CPU provider, not torch:
    the vectors stay int8's, as the index's identity says."""
    photos = [str(p) for p in flickr_images[:4]]
    out = _embed_in_child([("cpu", "ViT-B-32", "none", "cpu", "onnx-int8"),
                           ("openvino", "ViT-B-32", "none", "openvino", "onnx-int8")],
                          photos, tmp_path)
    assert out["cpu"]["runtime"] == out["openvino"]["runtime"] == "onnx-int8"
    assert out["cpu"]["note"] is None
    if out["openvino"]["note"] is not None:  # refused there: the CPU provider's int8 vectors
        assert "CPU provider runs it" in out["openvino"]["note"]
        np.testing.assert_allclose(out["openvino"]["vectors"], out["cpu"]["vectors"], atol=1e-6)
