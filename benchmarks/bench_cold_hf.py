"""Cold text queries for the multilingual and chinese presets: the torch path vs the ONNX
text tower, at full size.

    python benchmarks/bench_cold_hf.py [--runs 5] [--home indexes] [--models multilingual,chinese]

No pretrained weights offline, so both presets' architectures are built here with random
weights (speed does not depend on the values) and saved once under ``<home>/bench_cold_hf/``:

* ``multilingual``: open_clip's ``xlm-roberta-base-ViT-B-32`` config (an XLM-RoBERTa base
  text tower: 12 layers, 768 wide, 250,002-piece vocabulary; mean pooling, MLP projection;
  a ViT-B-32 image tower) as a ``local-dir:`` folder; its tokenizer a SentencePiece-Unigram
  model of XLM-R's size (250,002 pieces: real characters of many scripts plus synthetic
  pieces), since XLM-R's own cannot be downloaded here;
* ``chinese``: Chinese-CLIP ``chinese-clip-vit-base-patch16``'s sizes (a BERT base text
  tower over a 21,128-entry character vocabulary, a ViT-B/16 image tower, 512-d), in
  Hugging Face layout with ``vocab.txt`` only, as OFA-Sys ship it.

Each measured run is a new Python process that goes from nothing to the vector of one
Chinese query, timing its stages: *before*, the torch path these presets took (import
torch, transformers and open_clip; load the model the way ``load_text_encoder`` did: the
text tower alone where open_clip can, the whole Chinese-CLIP; encode); *after*,
``load_text_encoder`` with the exported tower in the home (import onnxruntime and
tokenizers; open the session and the tokenizer; encode). Before and after alternate run by
run, after one untimed run of each (page cache and .pyc warm). The export itself (once per
model: load with torch, export, check against torch) is timed in a process of its own, and
the two paths' vectors are compared. Writes ``benchmarks/results/cold_query_hf.txt`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _machine  # noqa: E402

QUERY = "一只在草地上奔跑的狗"  # "a dog running on the grass"
XLMR_SIZE = 250_002
BERT_ZH_SIZE = 21_128


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the models ------------------------------------------------------------------------------
def _scripts() -> list[str]:
    """Characters of many scripts, as a multilingual vocabulary holds them."""
    ranges = [(0x21, 0x7E), (0xC0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3)]
    return [chr(c) for a, b in ranges for c in range(a, b + 1)]


def xlmr_tokenizer() -> object:
    """A SentencePiece-Unigram tokenizer of XLM-R's size and layout (ids 0-3 ``<s> <pad> </s>
    <unk>``, ``<mask>`` last), its pieces real characters plus synthetic Latin pieces."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaTokenizerFast

    chars = _scripts()
    pieces = dict.fromkeys(["▁" + c for c in chars] + chars)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(pieces) < XLMR_SIZE - 5:
        n = int(rng.integers(2, 8))
        piece = "".join(rng.choice(letters, n))
        pieces.setdefault(("▁" + piece) if rng.random() < 0.5 else piece)
    scores = -np.log1p(np.arange(len(pieces), dtype=np.float64)) - 1.0
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, float(s)) for p, s in zip(pieces, scores)] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = TemplateProcessing(single="<s> $A </s>",
                                            special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


def build_multilingual(folder: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import XLMRobertaConfig

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tok = xlmr_tokenizer()
    for where in (folder, hf):
        tok.save_pretrained(str(where))
    XLMRobertaConfig(vocab_size=XLMR_SIZE, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     layer_norm_eps=1e-5).save_pretrained(str(hf))
    cfg = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    cfg["text_cfg"].update(hf_model_name=str(hf), hf_tokenizer_name=str(hf))
    preprocess = {"size": 224, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2), encoding="utf-8")
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))


def build_chinese(folder: Path) -> None:
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    head = ["[PAD]", *[f"[unused{i}]" for i in range(1, 100)], "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in _scripts() if not c.isspace()][:BERT_ZH_SIZE - len(head)]
    words = list(dict.fromkeys(head + chars))
    words += [f"##{i}" for i in range(BERT_ZH_SIZE - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    text = dict(vocab_size=BERT_ZH_SIZE, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                type_vocab_size=2)
    vision = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, image_size=224, patch_size=16)
    torch.manual_seed(0)
    model = ChineseCLIPModel(ChineseCLIPConfig(text_config=text, vision_config=vision,
                                               projection_dim=512))
    model.save_pretrained(str(folder))
    ChineseCLIPImageProcessor(size={"height": 224, "width": 224},
                              do_center_crop=False).save_pretrained(str(folder))


MODELS = {"multilingual": build_multilingual, "chinese": build_chinese}


def model_folder(home: Path, name: str) -> Path:
    """The random full-size model ``name`` under ``home`` (built once)."""
    folder = home / "bench_cold_hf" / name
    done = folder / "bench_built.json"
    if not done.is_file():
        progress(f"building the full-size {name} model (random weights)")
        started = time.perf_counter()
        MODELS[name](folder)
        done.write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return folder


def model_args(name: str, folder: Path) -> tuple[str, str | None]:
    return ("chinese", str(folder)) if name == "chinese" else (f"local-dir:{folder}", None)


# -- the measured processes ------------------------------------------------------------------
CHILD = r"""
import time
t0 = time.perf_counter()
import json, sys
path, model, pretrained, home, query = sys.argv[1:6]
if path == "torch" and model == "chinese":
    import torch, transformers  # noqa: F401 - what the torch path imports
elif path == "torch":
    import open_clip, torch, transformers  # noqa: F401
else:
    import onnxruntime, tokenizers  # noqa: F401 - what the ONNX path imports
from pathlib import Path
from mmsearch.models import identify
from mmsearch.models import backends, openclip
t1 = time.perf_counter()
ident = identify(model, None if pretrained == "-" else pretrained)
if path == "torch" and ident.backend == "chinese_clip":
    enc = backends.load_embedder(ident, "cpu", runtime="torch")  # what load_text_encoder did
elif path == "torch":
    enc = openclip.load_embedder(ident, "cpu", image_tower=False)
else:
    enc = backends.load_text_encoder(ident, "cpu", home=Path(home))
t2 = time.perf_counter()
v = enc.encode_texts([query])
t3 = time.perf_counter()
at_vector = time.time()
v2 = enc.encode_texts([query + "。"])
t4 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2,
                  "encode2_s": t4 - t3, "at_vector": at_vector, "encoder": type(enc).__name__,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "vector": v[0].tolist()}))
"""


def run_child(path: str, name: str, folder: Path, home: Path) -> dict:
    model, pretrained = model_args(name, folder)
    started = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, path, model, pretrained or "-", str(home),
                          QUERY], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["exit_s"] = time.time() - started
    result["wall_s"] = result.pop("at_vector") - started  # process start to the vector
    result["stderr"] = out.stderr.strip().splitlines()
    return result


def export_once(name: str, folder: Path, home: Path) -> dict:
    """The first ONNX-path process: loads with torch, exports, checks, encodes."""
    import shutil

    from mmsearch.models import identify
    from mmsearch.models.onnxtext import folder as export_folder

    target = export_folder(home, identify(*model_args(name, folder)))
    shutil.rmtree(target, ignore_errors=True)
    target.with_name(target.name + ".failed").unlink(missing_ok=True)
    progress(f"{name}: exporting the text tower")
    result = run_child("onnx", name, folder, home)
    result["export_mb"] = round(sum(p.stat().st_size for p in target.iterdir()) / 2**20, 1)
    return result


def med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def measure(name: str, home: Path, runs: int) -> dict:
    import numpy as np

    folder = model_folder(home, name)
    first = export_once(name, folder, home)
    for path in ("torch", "onnx"):  # untimed: page cache and .pyc warm
        run_child(path, name, folder, home)
    timed: dict[str, list[dict]] = {"torch": [], "onnx": []}
    loads = []
    for i in range(runs):
        for path in ("torch", "onnx"):
            timed[path].append(run_child(path, name, folder, home))
        loads.append(round(os.getloadavg()[0], 2))
        progress(f"{name}: round {i + 1}/{runs}: torch {timed['torch'][-1]['wall_s']:.2f}s, "
                 f"onnx {timed['onnx'][-1]['wall_s']:.2f}s")
    gap = float(np.abs(np.asarray(timed["torch"][0]["vector"])
                       - np.asarray(timed["onnx"][0]["vector"])).max())
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    keys = ("wall_s", "exit_s", "imports_s", "load_s", "encode_s", "encode2_s")
    summary = {p: {k: med(rs, k) for k in keys}
               | {"encoder": rs[0]["encoder"], "torch_imported": rs[0]["torch"],
                  "transformers_imported": rs[0]["transformers"],
                  "walls": [round(r["wall_s"], 2) for r in rs]} for p, rs in timed.items()}
    return {"model": name, "weights_mb": round(weights / 2**20, 1), "runs": runs,
            "export": {"wall_s": round(first["wall_s"], 1), "size_mb": first["export_mb"],
                       "note": next((s for s in first["stderr"] if "exported" in s), "")},
            "paths": summary, "max_abs_vector_gap": gap, "load_avg_1m_per_round": loads}


# -- the report ------------------------------------------------------------------------------
def report(results: list[dict], machine: dict, loads: tuple) -> str:
    lines = ["# bench_cold_hf: one cold Chinese text query, full-size random towers",
             *[f"# {k}: {v}" for k, v in machine.items()],
             f"# load average (1/5/15 min): {loads[0]} at start, {loads[1]} at end -- "
             f"{machine['cores']} cores; a load above that means other processes competed",
             f"# query: {QUERY!r}; each run a new process, median of the runs; "
             "before and after alternate run by run", ""]
    for r in results:
        t, o = r["paths"]["torch"], r["paths"]["onnx"]
        lines += [f"## {r['model']} ({r['weights_mb']:.0f} MB of weights)",
                  f"  before (torch path: {t['encoder']}) to the vector {t['wall_s']:.2f} s: "
                  f"imports "
                  f"{t['imports_s']:.2f} + load {t['load_s']:.2f} + encode {t['encode_s']:.3f} "
                  f"(+ python start); runs {t['walls']}; to process exit {t['exit_s']:.2f} s",
                  f"  after  (ONNX: {o['encoder']}) to the vector {o['wall_s']:.2f} s: "
                  f"imports "
                  f"{o['imports_s']:.2f} + load {o['load_s']:.2f} + encode {o['encode_s']:.3f} "
                  f"(+ python start); runs {o['walls']}; to process exit {o['exit_s']:.2f} s",
                  f"         torch imported: {o['torch_imported']}, "
                  f"transformers imported: {o['transformers_imported']}",
                  f"  speed-up of the cold query: {t['wall_s'] / o['wall_s']:.1f}x; a 2nd query in "
                  f"the same process: torch {t['encode2_s'] * 1e3:.0f} ms, "
                  f"ONNX {o['encode2_s'] * 1e3:.0f} ms",
                  f"  export (once per model, its own process: load with torch, export, check, "
                  f"encode): {r['export']['wall_s']} s, {r['export']['size_mb']} MB on disk",
                  f"  max |ONNX - torch| over the query vector: {r['max_abs_vector_gap']:.2e}; "
                  f"load average per round: {r['load_avg_1m_per_round']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--home", type=Path, default=ROOT / "indexes")
    parser.add_argument("--models", default="multilingual,chinese")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cold_query_hf")
    args = parser.parse_args()
    machine = _machine.describe()
    from importlib import metadata

    for pkg in ("transformers", "tokenizers", "onnxruntime"):
        machine[pkg] = metadata.version(pkg)
    start = os.getloadavg()
    results = [measure(name, args.home.resolve(), args.runs) for name in args.models.split(",")]
    text = report(results, machine, (list(map(lambda x: round(x, 2), start)),
                                     [round(x, 2) for x in os.getloadavg()]))
    print(text)
    args.out.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": machine, "query": QUERY, "results": results}, indent=2, ensure_ascii=False)
        + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
