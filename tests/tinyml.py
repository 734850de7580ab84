"""A tiny *multilingual* open_clip model for tests, with a Hugging Face text tower.

Like open_clip's ``xlm-roberta-base-ViT-B-32`` (a ``CustomTextCLIP`` whose text
tower is a transformers model wrapped by ``open_clip.hf_model.HFTextEncoder``),
but tiny and built entirely offline: a 2-layer BERT (hidden 32) over a
character-level WordPiece vocabulary, and the tiny ModifiedResNet image tower of
:mod:`tinyclip`.  It is trained in seconds on :func:`tinyclip.draw_shape`
images with English ("a red circle") *and* Chinese ("一个红色的圆") captions.

:func:`build_tiny_multilingual` writes a directory ``D`` in open_clip's
``local-dir:`` layout, so that (offline; nothing is downloaded)::

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{D}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{D}")

work (``pretrained`` is ignored by open_clip for ``local-dir:`` names).  Layout::

    D/open_clip_config.json       {"model_cfg": {...}, "preprocess_cfg": {...}}
    D/open_clip_model.safetensors the whole CLIP state dict (open_clip loads it strict=True)
    D/vocab.txt, tokenizer.json, tokenizer_config.json, ...
                                  the tokenizer: for a local-dir model open_clip's
                                  get_tokenizer ALWAYS loads AutoTokenizer from D itself
                                  (text_cfg.hf_tokenizer_name only has to be non-empty)
    D/hf/config.json              the BERT config (no weights): text_cfg.hf_model_name
                                  is the absolute path of D/hf; with CLIP weights in D,
                                  open_clip builds the tower with AutoModel.from_config
                                  (hf_model_pretrained=False), then loads the checkpoint
    D/hf/vocab.txt, ...           the same tokenizer again (hf_tokenizer_name = D/hf)
    D/tinyml.meta.json            recipe + training stats, written last (cache marker)

Notes on open_clip 3.3.0 behaviour this relies on:

* Any ``*.safetensors`` / ``*.bin`` / ``*.pth`` file in ``D`` is a candidate CLIP
  checkpoint, so the HF directory must not hold weights and D must hold only ours.
* ``text_cfg.hf_model_name`` is passed to ``AutoConfig.from_pretrained``: a
  relative path would be relative to the *working directory*, so it is written
  absolute, and rewritten by :func:`build_tiny_multilingual` when a cached D is
  found at another place.
* Loading ``local-dir:D`` with no weights file and ``pretrained_text=True`` (the
  default) would call ``AutoModel.from_pretrained(D/hf)`` and fail: while
  building (before weights exist) we pass ``pretrained_text=False``.
* The tokenizer vocabulary is character level: every character of the captions,
  plus ``##c`` continuation pieces for the Latin letters (WordPiece needs them to
  spell an English word letter by letter; CJK characters are split one by one by
  BERT's pre-tokenizer).  Characters outside it become ``[UNK]``.
"""
from __future__ import annotations

import json
import math
import os
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tinyclip  # noqa: E402

ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
ZH_SHAPES = {"circle": "圆", "square": "正方形", "triangle": "三角形"}

CONTEXT_LENGTH = 32
IMAGE_SIZE = tinyclip.IMAGE_SIZE  # 32: the tiny ResNet learns shape fastest at 32 px
EMBED_DIM = 64
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

BERT = {  # transformers.BertConfig kwargs
    "vocab_size": None,  # filled in from the vocabulary
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}

STEPS = 250
_POOL_PER_COMBO = 100
_GROUPS = 4  # per step: 2 batches with English captions, 2 with Chinese
_LR = 2e-3
_WEIGHT_DECAY = 0.05
_WARMUP = 20
_THREADS = 1  # see tinyclip._THREADS: 2 threads spin-wait badly on a shared 2-core box
_RECIPE_VERSION = 1

META_NAME = "tinyml.meta.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def caption_zh(color: str, shape: str) -> str:
    """The Chinese caption, e.g. ``一个红色的圆`` ("a red circle")."""
    return f"一个{ZH_COLORS[color]}的{ZH_SHAPES[shape]}"


def captions_en() -> list[str]:
    return [tinyclip.caption(c, s) for c, s in tinyclip.combos()]


def captions_zh() -> list[str]:
    return [caption_zh(c, s) for c, s in tinyclip.combos()]


def vocabulary() -> list[str]:
    """The WordPiece vocabulary: specials, every character of the captions (plus the
    Latin lowercase letters and digits), and ``##`` continuations of the Latin ones."""
    chars = set(string.ascii_lowercase + string.digits)
    for text in captions_en() + captions_zh():
        chars.update(ch for ch in text if not ch.isspace())
    chars = sorted(chars)
    latin = [c for c in chars if c.isascii()]
    return list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in latin]


def model_cfg(hf_dir: Path) -> dict:
    hf_dir = str(Path(hf_dir).resolve())
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": [1, 1, 1, 1],
            "width": 8,
            "head_width": 32,
        },
        "text_cfg": {
            "hf_model_name": hf_dir,
            "hf_tokenizer_name": hf_dir,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT_LENGTH,
        },
    }


PREPROCESS_CFG = {
    "size": IMAGE_SIZE,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def _recipe(seed: int, steps: int) -> dict:
    return {"seed": seed, "version": _RECIPE_VERSION, "steps": steps, "groups": _GROUPS,
            "pool_per_combo": _POOL_PER_COMBO, "lr": _LR, "weight_decay": _WEIGHT_DECAY,
            "warmup": _WARMUP, "threads": _THREADS, "bert": BERT, "vocab": vocabulary(),
            "model_cfg": model_cfg(Path("/")), "preprocess_cfg": PREPROCESS_CFG}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_layout(out_dir: Path) -> Path:
    """Write everything of D but the weights: open_clip config, tokenizer, BERT config."""
    from transformers import BertConfig, BertTokenizerFast

    out_dir = Path(out_dir).resolve()
    hf_dir = out_dir / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # NOTE: transformers 5.x BertTokenizer(vocab_file=...) ignores the file; from_pretrained reads it
    tok = BertTokenizerFast.from_pretrained(str(hf_dir), model_max_length=CONTEXT_LENGTH)
    assert len(tok) == len(vocab), (len(tok), len(vocab))
    tok.save_pretrained(str(hf_dir))
    tok.save_pretrained(str(out_dir))  # open_clip's get_tokenizer reads D itself
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertConfig(**{**BERT, "vocab_size": len(vocab)}).save_pretrained(str(hf_dir))
    _write_open_clip_config(out_dir)
    return out_dir


def _write_open_clip_config(out_dir: Path) -> None:
    text = json.dumps({"model_cfg": model_cfg(out_dir / "hf"), "preprocess_cfg": PREPROCESS_CFG},
                      indent=2, ensure_ascii=False) + "\n"
    path = out_dir / "open_clip_config.json"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        _atomic_write_text(path, text)


def build_tiny_multilingual(out_dir: Path, steps: int = STEPS, seed: int = 0) -> Path:
    """Build (or reuse) the tiny multilingual CLIP in ``out_dir``; return it (absolute).

    Deterministic for a given ``seed`` and ``steps`` (same torch build): a fixed
    number of AdamW steps of symmetric InfoNCE, on 1 thread.  A finished model
    of the same recipe already in ``out_dir`` is reused (its absolute paths are
    rewritten if the directory moved).
    """
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_NAME
    weights = out_dir / WEIGHTS_NAME
    recipe = _recipe(seed, steps)
    if weights.is_file() and meta_path.is_file() and (out_dir / "hf" / "config.json").is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
        if meta.get("recipe") == recipe and meta.get("complete"):
            _write_open_clip_config(out_dir)  # absolute paths follow the directory
            return out_dir
    meta_path.unlink(missing_ok=True)
    for stale in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.bin")):
        stale.unlink()  # open_clip would pick up any of them as the checkpoint

    write_layout(out_dir)
    name = f"local-dir:{out_dir}"
    start = time.monotonic()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(name)

        pairs = tinyclip.combos()
        n = len(pairs)
        texts = [tokenizer(captions_en()), tokenizer(captions_zh())]  # 2 x (n, context_length)
        base = tinyclip.TRAIN_SEED_BASE * (seed + 1)
        pool = torch.stack([
            torch.stack([preprocess(tinyclip.draw_shape(c, s, seed=base + k)) for (c, s) in pairs])
            for k in range(_POOL_PER_COMBO)
        ])

        gen = torch.Generator().manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=_LR, weight_decay=_WEIGHT_DECAY,
                                betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / _WARMUP)
            * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        labels = torch.arange(n)
        model.train()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            # _GROUPS batches of n (image, caption) pairs, one image per combo; the
            # first half of the batches is captioned in English, the rest in Chinese.
            ks = torch.randint(0, _POOL_PER_COMBO, (_GROUPS, n), generator=gen)
            images = pool[ks, torch.arange(n)].flatten(0, 1)
            img_f = F.normalize(model.encode_image(images), dim=-1).view(_GROUPS, n, -1)
            txt_f = F.normalize(model.encode_text(torch.cat(texts)), dim=-1).view(2, n, -1)
            txt_f = txt_f.repeat_interleave(_GROUPS // 2, dim=0)  # (_GROUPS, n, d)
            logits = model.logit_scale.exp() * img_f @ txt_f.transpose(1, 2)  # (G, n img, n txt)
            lab = labels.repeat(_GROUPS)
            loss = tinyclip.contrastive_step(model, logits, lab, opt, sched)
        model.eval()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tmp = out_dir / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, weights)
    finally:
        torch.set_num_threads(old_threads)

    _atomic_write_text(meta_path, json.dumps({
        "recipe": recipe, "complete": True, "steps_done": steps,
        "final_loss": round(float(loss), 5),
        "seconds": round(time.monotonic() - start, 2),
    }, indent=2, ensure_ascii=False) + "\n")
    return out_dir
