"""The GPU path's logic, checked on the CPU: uint8 batches normalised on the device, decoding
in processes, the tensor (nvJPEG) decode + resize, torch's exact search, text on the CPU.

The parts that need CUDA skip here; benchmarks/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch.errors import UsageError
from mmsearch.ingest.embed import StageTimes, choose_decoder, embed_paths, uint8_spec
from mmsearch.ingest.gpudecode import decode_resize, tensor_decodable
from mmsearch.ingest.steps import CenterCrop, CropSpec, Resize, apply_pil, crop_spec

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (no CUDA here): "
                                "benchmarks/gpu_check.sh runs these checks on a GPU machine")


@pytest.fixture(scope="module")
def tiny(tiny_model: tuple[Path, Path]):
    from mmsearch.models import identify, load_embedder

    config, ckpt = tiny_model
    return load_embedder(identify(str(config), str(ckpt)), "cpu")


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory, flickr_images: list[Path]) -> list[Path]:
    """Files the tensor decoder must leave to Pillow, and bad files, from a real photo."""
    out = tmp_path_factory.mktemp("odd")
    photo = Image.open(flickr_images[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"cmyk.jpg": (photo.convert("CMYK"), {}), "grey.jpg": (photo.convert("L"), {}),
             "progressive.jpg": (photo, {"progressive": True}),
             "rotated.jpg": (photo, {"exif": exif.tobytes()}), "alpha.png": (photo.convert("RGBA"), {})}
    for name, (img, params) in files.items():
        img.save(out / name, **params)
    good = flickr_images[1].read_bytes()
    (out / "empty.jpg").write_bytes(b"")
    (out / "text.jpg").write_text("not a picture")
    (out / "truncated.jpg").write_bytes(good[: len(good) // 3])  # a readable header, half the data
    return sorted(out.iterdir())


def embedded(embedder, paths: list[Path], **options) -> tuple[list[Path], np.ndarray, list]:
    batches = list(embed_paths(embedder, paths, batch_size=8, workers=2, **options))
    vectors = [b.vectors for b in batches if len(b.paths)]
    return ([p for b in batches for p in b.paths], np.concatenate(vectors),
            [(p.name, r) for b in batches for p, r in b.failed])


# -- (1) uint8 batches, normalised on the device --------------------------------------------

def test_uint8_batch_equals_todays_collate(tiny, flickr_images: list[Path]) -> None:
    from mmsearch.ingest.decode import load_image
    from mmsearch.models.device import normalise_on

    items = [tiny.prepare(load_image(p, draft_size=tiny.image_size)) for p in flickr_images[:12]]
    floats = tiny.collate(items)
    raw = tiny.collate(items, uint8=True)
    assert raw.dtype == torch.uint8 and raw.shape == (12, tiny.image_size, tiny.image_size, 3)
    assert torch.equal(normalise_on(raw, *tiny._norm, "cpu"), floats)  # bit-identical
    np.testing.assert_array_equal(tiny.encode_images(raw), tiny.encode_images(floats))


def test_pillow_steps_equal_torchvision(tiny, flickr_images: list[Path]) -> None:
    from torchvision import transforms as T

    spec = crop_spec(tiny.preprocess)
    assert spec is not None and spec.out_size == (tiny.image_size,) * 2
    pil = T.Compose(list(tiny.preprocess.transforms[:2]))
    images = [Image.open(p).convert("RGB") for p in flickr_images[:8]]
    images += [Image.new("RGB", size, (200, 30, 10)) for size in ((7, 10), (10, 7), (32, 32), (1, 90))]
    for img in images:
        np.testing.assert_array_equal(apply_pil(img, spec), np.asarray(pil(img)))
    crop = CropSpec((CenterCrop((13, 13)),))  # a crop larger than the image pads as torchvision
    for img in images[-4:]:
        np.testing.assert_array_equal(apply_pil(img, crop), np.asarray(T.CenterCrop(13)(img)))
    sized = CropSpec((Resize((40,), "bilinear", 50),))
    np.testing.assert_array_equal(apply_pil(images[0], sized),
                                  np.asarray(T.Resize(40, max_size=50)(images[0])))


# -- (2) decoding in worker processes ---------------------------------------------------------

def test_process_decoder_equals_thread_decoder(tiny, flickr_images: list[Path],
                                               odd_files: list[Path]) -> None:
    paths = flickr_images[:14] + odd_files
    threads = embedded(tiny, paths, decoder="threads")
    times = StageTimes()
    processes = embedded(tiny, paths, decoder="processes", times=times)
    assert processes[0] == threads[0]
    np.testing.assert_array_equal(processes[1], threads[1])  # same pixels, same vectors
    assert processes[2] == threads[2] and {n for n, _ in threads[2]} == {
        "empty.jpg", "text.jpg", "truncated.jpg"}
    assert times.images == len(threads[0]) and times.decode > 0


def test_worker_processes_do_not_run_the_callers_script(flickr_images: list[Path]) -> None:
    """A script with no ``__main__`` guard (here: read from stdin) runs once, not per worker."""
    import subprocess
    import sys

    script = ("from mmsearch.ingest.procdecode import ProcessDecoder\n"
              "from mmsearch.ingest.steps import CenterCrop, CropSpec, Resize\n"
              "print('body')\n"
              "spec = CropSpec((Resize((32,), 'bicubic'), CenterCrop((32, 32))))\n"
              "decoder = ProcessDecoder(2, spec, None, 4)\n"
              f"print(decoder.submit({str(flickr_images[0])!r}, None).result()[0].shape)\n"
              "decoder.close()\n")
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["body", "(32,", "32,", "3)"], done.stderr[-500:]
    assert "Traceback" not in done.stderr


def test_auto_decodes_in_threads_on_a_cpu(tiny) -> None:
    assert choose_decoder("auto", tiny) == "threads"
    assert choose_decoder("processes", tiny) == "processes"
    assert uint8_spec(object()) is None and choose_decoder("nvjpeg", object()) == "threads"
    with pytest.raises(UsageError):
        choose_decoder("gpu", tiny)


# -- (3) the tensor (nvJPEG) path, on torchvision's CPU decoder --------------------------------

def test_tensor_decoder_takes_only_plain_baseline_jpegs(flickr_images: list[Path],
                                                        odd_files: list[Path]) -> None:
    plain = flickr_images[2].read_bytes()
    assert tensor_decodable(plain, draft_size=224)
    assert not tensor_decodable(plain, draft_size=32)  # Pillow's draft decode shrinks it first
    assert not tensor_decodable(plain, draft_size=None, max_pixels=1000)
    for path in odd_files:  # other formats and modes, and JPEGs cut short
        assert not tensor_decodable(path.read_bytes(), draft_size=224), path.name
    buf = io.BytesIO()
    Image.open(flickr_images[2]).convert("RGB").save(buf, "JPEG", quality=80)
    assert tensor_decodable(buf.getvalue(), None)


def test_tensor_resize_is_close_to_pillow(tiny, flickr_images: list[Path],
                                          odd_files: list[Path]) -> None:
    paths = flickr_images[20:52] + odd_files
    pillow = embedded(tiny, paths, decoder="threads", draft=False)
    times = StageTimes()
    tensor = embedded(tiny, paths, decoder="nvjpeg", draft=False, times=times)
    assert tensor[0] == pillow[0] and tensor[2] == pillow[2]  # same files, same reasons
    cosine = (tensor[1] * pillow[1]).sum(axis=1)
    assert cosine.min() >= 0.99, cosine.min()
    routed = [p in odd_files for p in tensor[0]]
    np.testing.assert_array_equal(tensor[1][routed], pillow[1][routed])  # Pillow's own path
    assert times.gpu_decode > 0


def test_tensor_pixels_are_pillows_within_a_rounding_step(tiny, flickr_images: list[Path]) -> None:
    spec = crop_spec(tiny.preprocess)
    for path in flickr_images[60:66]:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        (ours,) = decode_resize([data], spec, "cpu")
        theirs = apply_pil(Image.open(path).convert("RGB"), spec)
        diff = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - theirs.astype(int))
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (path.name, diff.mean())
    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9"),
                               dtype=torch.uint8)
    good, bad = decode_resize([data, garbage], spec, "cpu")  # one bad file costs only itself
    assert bad is None and torch.equal(good, ours)


# -- (4) exact search in torch ----------------------------------------------------------------

def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_torch_exact_search_equals_faiss_flat_and_numpy() -> None:
    from mmsearch.store.torchexact import TorchExact
    from mmsearch.store.vectors import VectorIndex

    vectors, queries = unit(3000, 64, 0), unit(25, 64, 1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 5
    index = VectorIndex.create(64, "flat")
    index.add(ids, vectors)
    index.gpu = None
    faiss_result = index.search(queries, 10)
    scores, found = TorchExact(ids, vectors, "cpu").search(queries, 10)
    np.testing.assert_array_equal(found, faiss_result.ids)
    np.testing.assert_allclose(scores, faiss_result.scores, atol=1e-5)
    brute = queries @ vectors.T
    np.testing.assert_array_equal(found, ids[np.argsort(-brute, axis=1)[:, :10]])
    many = TorchExact(ids, vectors, "cpu").search(queries[:1], 5000)[1]
    assert many.shape == (1, 3000)


def test_an_exact_index_searches_through_torch_when_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's hook: FAISS without GPUs + a CUDA device -> TorchExact (CPU stands in)."""
    from mmsearch.store import torchexact as gpu
    from mmsearch.store.vectors import VectorIndex

    monkeypatch.setattr(gpu, "cuda_device", lambda setting: None if setting is None else "cpu")
    monkeypatch.setattr(gpu, "fits", lambda n, dim, device: True)
    vectors, queries = unit(2000, 32, 2), unit(8, 32, 3)
    index = VectorIndex.create(32, "flat")
    index.add(np.arange(2000, dtype=np.int64), vectors)
    expected = index.search(queries, 7)  # gpu -1 (auto): the first search stays on FAISS
    assert index._gpu is None
    again = index.search(queries, 7)  # the second one moves to torch
    assert isinstance(index._gpu[1], gpu.TorchExact)
    np.testing.assert_array_equal(again.ids, expected.ids)
    np.testing.assert_allclose(again.scores, expected.scores, atol=1e-5)
    index.add(np.array([5000]), queries[:1])  # a change drops the copy; the next search has it
    assert index._gpu is None and index.search(queries[:1], 1).ids[0, 0] == 5000


# -- (5) text queries on the CPU --------------------------------------------------------------

def test_text_queries_stay_on_the_cpu_on_a_gpu_machine(home: Path, tiny_model: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mmsearch import Engine
    from mmsearch.models.device import text_device

    assert (text_device("auto"), text_device("cuda:1"), text_device("cpu")) == ("cpu", "cuda:1", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as auto sees it
    config, ckpt = tiny_model
    with Engine.open("q", model=str(config), pretrained=str(ckpt)) as engine:
        assert engine.device == "cuda"
        assert engine.text_embedder.device == "cpu"
        assert engine.embed_texts(["a red circle"]).shape[0] == 1


def test_index_decoder_setting_reaches_the_decoder(home: Path, tiny_model: tuple[Path, Path],
                                                    shapes: dict[Path, str]) -> None:
    """`mmsearch index --decoder processes` indexes what `--decoder threads` does, vector for vector."""
    from mmsearch import Engine

    config, ckpt = tiny_model
    vectors = []
    for decoder in ("threads", "processes"):
        with Engine.open(decoder, model=str(config), pretrained=str(ckpt), device="cpu",
                         decoder=decoder) as engine:
            assert engine.index([next(iter(shapes)).parent]).added == len(shapes)
            vectors.append(engine.store.image_vectors()[1])
    np.testing.assert_array_equal(vectors[0], vectors[1])
    with pytest.raises(UsageError, match="--decoder must be one of"):
        Engine.open("x", decoder="gpu")


# -- on a GPU machine only ----------------------------------------------------------------------

@needs_cuda
def test_cuda_vectors_match_the_cpu_path(tiny_model: tuple[Path, Path],
                                         flickr_images: list[Path]) -> None:
    from mmsearch.models import identify, load_embedder

    identity = identify(*(str(p) for p in tiny_model))
    cpu, cuda = load_embedder(identity, "cpu"), load_embedder(identity, "cuda")
    paths = flickr_images[:64]
    on_cpu = embedded(cpu, paths, decoder="threads")
    for decoder in ("threads", "processes", "nvjpeg"):
        ours = embedded(cuda, paths, decoder=decoder)
        assert ours[0] == on_cpu[0]
        assert (ours[1] * on_cpu[1]).sum(axis=1).min() >= 0.99, decoder


@needs_cuda
def test_cuda_torch_search_equals_faiss() -> None:
    from mmsearch.store.torchexact import TorchExact
    from mmsearch.store.vectors import VectorIndex

    vectors, queries = unit(100_000, 128, 4), unit(50, 128, 5)
    index = VectorIndex.create(128, "flat")
    index.add(np.arange(100_000, dtype=np.int64), vectors)
    index.gpu = None
    expected = index.search(queries, 10)
    scores, ids = TorchExact(np.arange(100_000), vectors, "cuda").search(queries, 10)
    np.testing.assert_array_equal(ids, expected.ids)
    np.testing.assert_allclose(scores, expected.scores, atol=1e-5)
