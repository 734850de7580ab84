"""The text tower through ONNX Runtime's graph (mmsearch/models/textgraph.py): equal to
open_clip's ``encode_text``, taken from the second text, and the numpy tower answering
wherever the graph cannot run; its protobuf writer against onnx's own messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmsearch.models import identify, load_embedder, onnxproto, textgraph, texttower
from test_texttower import TEXTS, open_clip_vectors, random_checkpoint, variant_config

pytestmark = pytest.mark.usefixtures("home")

WORDS = "a small red circle beside a big blue square on a white table near a door".split()


def graph_tower(config: Path, ckpt: Path, home: Path) -> texttower.TextTower:
    tower = texttower.load(config.stem, str(config), ckpt, home)
    assert tower is not None and tower.runtime == "numpy"
    tower.warm()
    assert tower.runtime == "onnxruntime", "expected ONNX Runtime's graph after warm()"
    return tower


def test_texts_alone_and_together_equal_open_clip(tiny_model: tuple[Path, Path],
                                                  home: Path) -> None:
    """Texts of 2 to 16 tokens one at a time (1 to 15 rows after the start token), a batch of
    texts of different lengths (one cut at the context's end), and a text again."""
    config, ckpt = tiny_model
    texts = [" ".join(WORDS[:n]) for n in range(len(WORDS) + 1)]
    ref = load_embedder(identify(str(config), str(ckpt)), "cpu").encode_texts(texts)
    tower = graph_tower(config, ckpt, home)
    alone = np.concatenate([tower.encode([t]) for t in texts])
    assert alone.dtype == np.float32 and np.abs(alone - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-6)
    together = tower.encode(TEXTS)
    assert np.abs(together - open_clip_vectors(config, ckpt)).max() < 1e-5
    np.testing.assert_array_equal(tower.encode([texts[5]]), alone[5:6])


def test_quick_gelu_towers_equal_open_clip(tmp_path: Path, tiny_config: Path, home: Path) -> None:
    config = variant_config(tiny_config, tmp_path, "tinyclip-quickgelu", quick_gelu=True)
    ckpt = tmp_path / "qg.pt"
    random_checkpoint(config, ckpt)
    tower = graph_tower(config, ckpt, home)
    assert tower.spec.quick_gelu
    assert np.abs(tower.encode(TEXTS) - open_clip_vectors(config, ckpt)).max() < 1e-5


def test_the_second_text_goes_through_the_graph(tiny_model: tuple[Path, Path], home: Path) -> None:
    """A one-query process never builds the graph; a second text switches, and the vectors
    stay those of the numpy tower (to float32 rounding)."""
    config, ckpt = tiny_model
    tower = texttower.load(config.stem, str(config), ckpt, home)
    first = tower.encode(TEXTS)
    assert tower.runtime == "numpy"
    second = tower.encode(TEXTS)
    assert tower.runtime == "onnxruntime"
    assert np.abs(first - second).max() < 1e-6


@pytest.mark.parametrize("why", ["one core", "no onnxruntime", "build fails", "not asked"])
def test_the_numpy_tower_answers_where_the_graph_cannot(
        tiny_model: tuple[Path, Path], home: Path, monkeypatch: pytest.MonkeyPatch,
        why: str) -> None:
    config, ckpt = tiny_model
    if why == "one core":
        monkeypatch.setattr(textgraph, "cores", lambda: 1)
    elif why == "no onnxruntime":
        real = textgraph.importlib.util.find_spec
        monkeypatch.setattr(textgraph.importlib.util, "find_spec",
                            lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    elif why == "build fails":
        def fail(*args: object) -> None:
            raise RuntimeError("Could not find an implementation for Attention(1)")
        monkeypatch.setattr(textgraph, "build", fail)
    tower = texttower.load(config.stem, str(config), ckpt, home, graph=why != "not asked")
    tower.warm()
    assert tower.runtime == "numpy"
    assert np.abs(tower.encode(TEXTS) - open_clip_vectors(config, ckpt)).max() < 1e-5


def test_vit_b_32_random_weights_equal_open_clip(tmp_path: Path) -> None:
    """The full-size text tower (12 layers, width 512, 8 heads) to 1e-4."""
    import open_clip
    import torch

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    ckpt = tmp_path / "vit-b-32-text.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}, ckpt)
    texts = [*TEXTS, "a dog runs along the beach with a red ball in its mouth", "一只猫 🐱"]
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)), dim=-1).numpy()
    tower = texttower.load("ViT-B-32", None, ckpt, tmp_path / "home")
    tower.warm()
    assert tower.runtime == "onnxruntime"
    assert np.abs(tower.encode(texts) - ref).max() < 1e-4
    alone = np.concatenate([tower.encode([t]) for t in texts])
    assert np.abs(alone - ref).max() < 1e-4


def test_the_protobuf_writer_makes_onnx_s_own_messages() -> None:
    """Each message :mod:`onnxproto` writes parses with onnx into the message onnx.helper
    builds for the same thing."""
    from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

    node = onnxproto.node("Attention", ["y", "w", "", "past"], ["out", "present"],
                          textgraph.MS, num_heads=8, unidirectional=1, epsilon=1e-5,
                          axes=[-1, 2])
    want = helper.make_node("Attention", ["y", "w", "", "past"], ["out", "present"],
                            domain=textgraph.MS, num_heads=8, unidirectional=1, epsilon=1e-5,
                            axes=[-1, 2])
    assert NodeProto.FromString(node) == want
    assert NodeProto.FromString(onnxproto.node("MatMul", ["a", "b"], ["c"])) == \
        helper.make_node("MatMul", ["a", "b"], ["c"])

    floats = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5
    ints = np.array([-1, 512], dtype=np.int64)
    for array in (floats, ints):
        assert TensorProto.FromString(onnxproto.tensor("t", array)) == \
            numpy_helper.from_array(array, "t")
    ext = TensorProto.FromString(onnxproto.tensor("w", floats, "mem"))
    assert ext.data_location == TensorProto.EXTERNAL and list(ext.dims) == [2, 3, 4]
    assert {e.key: e.value for e in ext.external_data} == {
        "location": "mem", "offset": "0", "length": str(floats.nbytes)}

    dims = ["b", None, 512]
    assert ValueInfoProto.FromString(onnxproto.value_info("x", onnxproto.FLOAT, dims)) == \
        helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    assert ValueInfoProto.FromString(onnxproto.value_info("y", onnxproto.INT64, None)) == \
        helper.make_tensor_value_info("y", TensorProto.INT64, None)

    model = ModelProto.FromString(onnxproto.model(
        [node], [onnxproto.tensor("t", ints)], [onnxproto.value_info("y", onnxproto.FLOAT, [1])],
        [onnxproto.value_info("out", onnxproto.FLOAT, None)], {"": 17, textgraph.MS: 1}, "g"))
    assert model.ir_version == onnxproto.IR_VERSION and model.graph.name == "g"
    assert {o.domain: o.version for o in model.opset_import} == {"": 17, textgraph.MS: 1}
    assert model.graph.node[0] == want and len(model.graph.initializer) == 1


def test_memory_collapsed_into_huge_pages_keeps_its_contents() -> None:
    """What ``build`` does to ONNX Runtime's packed weights, on memory of known contents:
    the mappings that appeared are found, collapsed where Linux 6.1+ gives huge pages
    (counted in the process's AnonHugePages), and read back unchanged."""
    import mmap
    import platform

    from mmsearch.models import hugepages

    before = hugepages.anonymous()
    size = 16 << 20
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(memory, np.float32)
    data[:] = np.arange(data.size, dtype=np.float32)
    new = hugepages.anonymous() - before
    assert any(end - start >= size for start, end in new)
    done = hugepages.collapse(new)
    np.testing.assert_array_equal(data, np.arange(data.size, dtype=np.float32))
    release = tuple(int(p) for p in platform.release().split(".")[:2] if p.isdigit())
    if hugepages.available() and release >= (6, 1):
        assert done >= size - (2 << 20)  # all but a partial first or last 2 MiB
    else:
        assert done == 0
    del data
    memory.close()


def test_a_graph_that_fails_on_a_query_leaves_numpy_answering(
        tiny_model: tuple[Path, Path], home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Never a failed query for a faster path: the graph's error is one warning, the query
    is answered by the numpy tower, and so are the next ones."""
    config, ckpt = tiny_model
    tower = graph_tower(config, ckpt, home)

    def broken(x: np.ndarray, ends: np.ndarray) -> np.ndarray:
        raise RuntimeError("Non-zero status code returned while running Attention node\nmore")

    tower._graph.run = broken
    with caplog.at_level("WARNING", logger="mmsearch.models.texttower"):
        got = tower.encode(TEXTS)
    assert tower.runtime == "numpy"
    assert np.abs(got - open_clip_vectors(config, ckpt)).max() < 1e-5
    assert [r.getMessage() for r in caplog.records] == [
        "text queries go on in numpy: ONNX Runtime's graph failed (Non-zero status code "
        "returned while running Attention node)"]


def test_texts_from_several_threads_build_one_graph(
        tiny_model: tuple[Path, Path], home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    config, ckpt = tiny_model
    tower = texttower.load(config.stem, str(config), ckpt, home)
    built = []
    real = textgraph.build

    def counted(*args: object) -> textgraph.TextGraph:
        built.append(1)
        return real(*args)

    monkeypatch.setattr(textgraph, "build", counted)
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda t: tower.encode([t]), TEXTS * 3))
    assert len(built) == 1 and tower.runtime == "onnxruntime"
    ref = open_clip_vectors(config, ckpt)
    assert np.abs(np.concatenate(out) - np.concatenate([ref] * 3)).max() < 1e-5
