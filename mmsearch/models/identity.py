"""Which model an index was built with: :class:`ModelIdentity`, resolved from user input.

Pure Python: resolving ``--model``/``--pretrained`` never imports torch. The
identity is stored in the catalog (as JSON) and compared on every later open,
so an index is never searched with vectors from another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from mmsearch.errors import ModelError, ModelMismatchError, UsageError

# ViT-B-32 at 224 px runs at ~10-20 images/s on a 2-core CPU and its LAION-2B
# weights are the most widely quoted open_clip baseline (Flickr30K text->image R@1 66.8).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
NO_WEIGHTS = "none"  # random weights: only for speed benchmarks, never for search quality
OPEN_CLIP = "open_clip"
CHINESE_CLIP = "chinese_clip"
BACKENDS = (OPEN_CLIP, CHINESE_CLIP)
LOCAL_DIR = "local-dir:"  # open_clip's own layout: a folder with open_clip_config.json and weights
# Names a user can remember (--model NAME): backend, architecture, default weights.
# multilingual: open_clip's XLM-RoBERTa text tower with LAION-5B ViT-B-32 (512-d, MIT; reads
#   ~100 languages, no language code needed; Flickr30K en t->i R@1 64.5, XTD10 zh 50.8).
# chinese: OFA-Sys Chinese-CLIP ViT-B/16 (transformers; Flickr30K-CN t->i R@1 62.7, COCO-CN 62.2).
PRESETS = {
    "multilingual": (OPEN_CLIP, "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
    "chinese": (CHINESE_CLIP, "chinese-clip-vit-base-patch16", "OFA-Sys/chinese-clip-vit-base-patch16"),
}
MANIFEST = "mmsearch_manifest.json"  # written by finetune/distill beside open_clip's files
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FP32, INT8 = "fp32", "int8"  # image vector precisions (ModelIdentity.image_precision)
_FINGERPRINT_CHUNK = 4 << 20


@dataclass(frozen=True)
class ModelIdentity:
    """What an index was built with; stored in the catalog as JSON.

    ``fingerprint`` identifies the weights: the tag for open_clip downloads, the
    size plus a hash of the first and last 4 MiB for a local checkpoint file
    (cheap enough for every query; moved or renamed files still match).
    ``backend`` names the library that runs the model (today only ``open_clip``).
    ``text_pretrained``/``text_fingerprint`` identify a text tower whose weights
    come from elsewhere than the model's (a fine-tuned or multilingual tower);
    None means the model's own. ``image_precision`` is ``int8`` for an index whose
    image vectors come from the int8-quantised tower (``--runtime onnx-int8``): not
    equal to fp32 ones (cosine ~0.99), so an index holds one kind only.
    """

    arch: str
    pretrained: str
    fingerprint: str
    config_path: str | None = None
    backend: str = OPEN_CLIP
    text_pretrained: str | None = None
    text_fingerprint: str | None = None
    image_precision: str = FP32

    def to_json(self) -> str:
        data = asdict(self)
        if self.image_precision == FP32:  # records written before int8 existed read the same
            del data["image_precision"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelIdentity":
        """Read a stored identity; a schema-v1 record (no backend, no text tower) reads as open_clip."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        """What decides the text vectors: compared before mixing query and index vectors."""
        return self.backend, self.arch, self.fingerprint, self.text_fingerprint

    def describe(self) -> str:
        text = f" + text tower {self.text_pretrained}" if self.text_pretrained else ""
        backend = "" if self.backend == OPEN_CLIP else f" ({self.backend})"
        return f"{self.arch} / {self.pretrained}{text}{backend}"

    def check_same(self, other: "ModelIdentity") -> None:
        """Raise :class:`ModelMismatchError` unless ``other`` is the same model and weights."""
        if self.key != other.key:
            raise ModelMismatchError(
                f"this index was built with {self.describe()}, not {other.describe()}; "
                "use the same --model/--pretrained, or another --index"
            )


def identify(model: str | None, pretrained: str | None) -> ModelIdentity:
    """Resolve user input into a :class:`ModelIdentity` without importing torch.

    ``model``: an open_clip architecture, an open_clip config JSON, ``local-dir:FOLDER``
    (open_clip's layout, weights included) or a preset (:data:`PRESETS`).
    """
    if model is not None and model.lower() in PRESETS:
        return _preset(model.lower(), pretrained)
    if model is not None and model.startswith(LOCAL_DIR):
        return _local_dir(model[len(LOCAL_DIR):], pretrained)
    if model is None and pretrained is None:
        model, pretrained = DEFAULT_MODEL, DEFAULT_PRETRAINED
    elif model is None:
        model = DEFAULT_MODEL
    elif pretrained is None:
        if model != DEFAULT_MODEL:
            raise UsageError(f"--model {model} needs --pretrained TAG or FILE (or '{NO_WEIGHTS}')")
        pretrained = DEFAULT_PRETRAINED
    arch, config_path = _resolve_arch(model)
    return ModelIdentity(arch, *_resolve_weights(pretrained), config_path=config_path)


def _preset(name: str, pretrained: str | None) -> ModelIdentity:
    backend, arch, default = PRESETS[name]
    if backend == OPEN_CLIP:
        return ModelIdentity(arch, *_resolve_weights(pretrained or default))
    weights = pretrained or default
    folder = Path(weights).expanduser()
    if folder.is_dir():
        return ModelIdentity(arch, str(folder.resolve()), "dir:" + _folder_fingerprint(folder, _HF_WEIGHTS),
                             backend=backend)
    if weights.startswith(("/", ".", "~")) or weights.count("/") != 1:  # not a hub id org/name
        raise ModelError(f"model folder not found: {folder}")
    return ModelIdentity(arch, weights, f"hub:{weights}", backend=backend)


def _local_dir(folder_text: str, pretrained: str | None) -> ModelIdentity:
    """An open_clip ``local-dir:`` model: the folder holds the config and the weights."""
    if pretrained not in (None, ""):
        raise UsageError("a local-dir: model carries its own weights: leave out --pretrained")
    folder = Path(folder_text).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise ModelError(f"no open_clip model folder at {folder} (it needs open_clip_config.json)")
    fingerprint = f"dir:{_folder_fingerprint(folder, _OPEN_CLIP_WEIGHTS)}"
    base = text_tower_base(folder)
    if base is not None:  # a fine-tuned text tower on a base model's unchanged image tower
        return replace(base, text_pretrained=str(folder.resolve()), text_fingerprint=fingerprint)
    return ModelIdentity(f"{LOCAL_DIR}{folder.name}", str(folder.resolve()), fingerprint)


def text_tower_base(folder: Path) -> ModelIdentity | None:
    """The base model of a folder whose manifest says only its text tower was trained, else None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("towers_changed") != ["text"]:
            return None
        base = ModelIdentity.from_json(json.dumps(data["base"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unreadable model manifest {manifest}: {exc}") from exc
    return replace(base, text_pretrained=None, text_fingerprint=None)


def same_image_tower(a: ModelIdentity, b: ModelIdentity) -> bool:
    """True when ``a`` and ``b`` embed images identically (they may differ in the text tower)."""
    return (a.backend, a.arch, a.fingerprint) == (b.backend, b.arch, b.fingerprint)


def check_precision(stored: ModelIdentity, made: str, runtime: str) -> None:
    """Refuse image vectors of precision ``made`` (by ``runtime``) for an index holding the other."""
    if stored.image_precision != made:
        other = "onnx-int8" if stored.image_precision == INT8 else "torch or onnx"
        raise ModelMismatchError(
            f"this index holds {stored.image_precision} image vectors; --runtime {runtime} makes "
            f"{made} ones, and an index does not mix them: use --runtime {other} (or auto), "
            "or another --index")


def _folder_fingerprint(folder: Path, names: tuple[str, ...]) -> str:
    """The fingerprint of the first weights file of ``names`` present in ``folder``."""
    for name in names:
        if (folder / name).is_file():
            return file_fingerprint(folder / name)
    raise ModelError(f"no weights in {folder} (looked for {', '.join(names)})")


def check_loaded(stored: ModelIdentity, asked: ModelIdentity | None) -> ModelIdentity:
    """The identity to load for an existing index, refusing a different model. A model that
    differs only in its text tower (a fine-tuned one) is accepted: the images stay valid."""
    if asked is not None:
        if not same_image_tower(stored, asked):
            stored.check_same(asked)
        # same weights, possibly at a new path, or another text tower; the index's precision
        return replace(asked, image_precision=stored.image_precision)
    return stored


def _resolve_arch(model: str) -> tuple[str, str | None]:
    if model.endswith(".json") or os.sep in model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelError(f"model config not found: {path}")
        return path.stem, str(path.resolve())
    return model, None


def _resolve_weights(pretrained: str) -> tuple[str, str]:
    if pretrained.lower() == NO_WEIGHTS:
        return NO_WEIGHTS, NO_WEIGHTS
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), file_fingerprint(path)
    if os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise ModelError(f"checkpoint file not found: {path}")
    return pretrained, f"tag:{pretrained}"


def file_fingerprint(path: Path) -> str:
    """``file:<size>:<blake2b of the first and last 4 MiB>`` of a checkpoint."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_CHUNK))
        if size > 2 * _FINGERPRINT_CHUNK:
            f.seek(size - _FINGERPRINT_CHUNK)
            digest.update(f.read())
    return f"file:{size}:{digest.hexdigest()}"


def checked_file(identity: ModelIdentity) -> str:
    """The checkpoint path of a file identity, refusing a file whose weights have changed."""
    path = Path(identity.pretrained)
    if not path.is_file():
        raise ModelError(f"checkpoint file not found: {path} (pass --pretrained with its new place)")
    if file_fingerprint(path) != identity.fingerprint:
        raise ModelMismatchError(f"checkpoint {path} is not the file this index was built with "
                                 "(its contents changed); pass --pretrained with the original file")
    return str(path)


def checked_folder(identity: ModelIdentity, names: tuple[str, ...] = _OPEN_CLIP_WEIGHTS) -> str:
    """The folder of a ``dir:`` identity, refusing one whose weights have changed."""
    folder = Path(identity.pretrained)
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder} (pass --model with its new place)")
    if "dir:" + _folder_fingerprint(folder, names) != identity.fingerprint:
        raise ModelMismatchError(f"the weights in {folder} are not the ones this index was built "
                                 "with (they changed)")
    return str(folder)


def checked_text_folder(identity: ModelIdentity) -> str:
    """The folder of a fine-tuned text tower, refusing one whose weights have changed."""
    assert identity.text_pretrained and identity.text_fingerprint
    return checked_folder(replace(identity, pretrained=identity.text_pretrained,
                                  fingerprint=identity.text_fingerprint))


def hf_weight_names() -> tuple[str, ...]:
    return _HF_WEIGHTS


def check_supported(identity: ModelIdentity) -> None:
    """Refuse, with one line, an identity this version cannot load."""
    if identity.backend not in BACKENDS:
        raise ModelError(f"this index was built with the {identity.backend!r} backend, which this "
                         f"mmsearch does not have (it has: {', '.join(BACKENDS)}); upgrade mmsearch")
    if identity.text_pretrained and identity.backend != OPEN_CLIP:
        raise ModelError(f"this index uses a separate text tower ({identity.text_pretrained}) "
                         f"with the {identity.backend} backend, which this mmsearch cannot load")
