"""What ``mmsearch models`` lists: the models a user can name, and the ones already here.

:func:`list_models` gives one :class:`ModelEntry` per model: the default, the presets
(:data:`~.identity.PRESETS`), a few suggested open_clip models (:data:`SUGGESTED`), every
open_clip tag whose weights are cached, and the models recorded in indexes (passed in by
the caller, who reads the catalogs). For each: its size (:mod:`.configsize`), whether its
weights are here (:mod:`.hub`, which never touches the network), which runtimes are ready,
and its published figures (``published.csv``, vendored with its sources). Importing
open_clip takes seconds: it happens only when a weights cache holds something and the
tags' download places are not kept under the home yet (:func:`_tag_sources`); torch only
when ONNX exports under the home have to be matched to a model.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from mmsearch.models import configsize, texttower, towerfile
from mmsearch.models.hub import CLIP_CACHE, WeightsSource, cached_file, weights_source
from mmsearch.models.identity import (CHINESE_CLIP, DEFAULT_MODEL, DEFAULT_PRETRAINED, NO_WEIGHTS,
                                      PRESETS, ModelIdentity, file_fingerprint, hf_weight_names,
                                      identify)
from mmsearch.models.onnxtower import FOLDER as ONNX_FOLDER
from mmsearch.models.onnxtower import onnx_path

# A runtime's state for a model (ModelEntry.runtimes), and the weights' (ModelEntry.weights).
READY, FIRST_USE, MISSING, NOT_INSTALLED = "ready", "first use", "missing", "not installed"
NA = "n/a"
CACHED, NOT_CACHED, RANDOM = "cached", "not cached", "random"
RUNTIMES = ("torch", "onnx", "onnx-int8", "numpy-text")
SHAPE_FIGURES = ("params_m", "image_size", "embed_dim")  # published sizes, not benchmarks
PUBLISHED = Path(__file__).with_name("published.csv")
TAGS_FILE = Path(".models") / "open_clip_tags.json"  # under the home: see _tag_sources
Facts = dict[str, tuple[float, str]]  # published figure name -> (value, source name)


@dataclass(frozen=True)
class Suggestion:
    arch: str
    pretrained: str
    use: str


# open_clip models worth knowing beside the default: faster ones for a laptop CPU, better
# ones for a GPU. MobileCLIP2's image towers come from timm.
SUGGESTED = (
    Suggestion("MobileCLIP2-S0", "dfndr2b", "laptop, fastest"),
    Suggestion("MobileCLIP2-S2", "dfndr2b", "laptop"),
    Suggestion("ViT-B-16", "laion2b_s34b_b88k", "GPU"),
    Suggestion("ViT-L-14", "laion2b_s32b_b82k", "GPU"),
)
PRESET_USES = {"multilingual": "~100 languages", "chinese": "Chinese"}


@dataclass(frozen=True)
class IndexedModel:
    """A model recorded in an index, and where a tag's weights were cached when it was built."""

    index: str
    identity: ModelIdentity
    weights_file: str | None = None


@dataclass
class ModelEntry:
    """One listed model. ``name`` is what picks it: ``default``, a preset, or ``ARCH / TAG``
    (``flags`` spells the options). ``listed_as``: default, preset, suggested, cached, index.
    ``runtimes`` maps each of :data:`RUNTIMES` to READY, FIRST_USE (downloads, exports or
    writes on first use), MISSING, NOT_INSTALLED or NA. ``figures``: published percentages
    by name (``flickr30k_t2i_r1``: Flickr30K text->image R@1), from ``figures_source``."""

    name: str
    arch: str
    pretrained: str
    backend: str
    flags: str
    use: str | None = None
    listed_as: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    params: int | None = None
    params_from: str | None = None  # config, open_clip build, published
    image_size: int | None = None
    embed_dim: int | None = None
    weights: str = NOT_CACHED
    weights_path: str | None = None
    runtimes: dict[str, str] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    figures_source: str | None = None


def list_models(home: Path, indexed: Iterable[IndexedModel] = ()) -> list[ModelEntry]:
    """The named models first (default, presets, suggestions), then cached and indexed ones."""
    here = _Here(home)
    entries: dict[tuple, ModelEntry] = {}
    for name, identity, use, kind in _named():
        _entry(entries, identity, here, name=name, use=use).listed_as.append(kind)
    for (arch, tag), path in here.cached_tags().items():
        _entry(entries, identify(arch, tag), here, weights_file=path).listed_as.append("cached")
    for item in indexed:
        entry = _entry(entries, item.identity, here, weights_file=item.weights_file)
        entry.indexes.append(item.index)
        if "index" not in entry.listed_as:
            entry.listed_as.append("index")
    return list(entries.values())


def _named() -> list[tuple[str, ModelIdentity, str | None, str]]:
    """(name, identity, use, kind) of the default, the presets and the suggestions."""
    named = [("default", identify(DEFAULT_MODEL, DEFAULT_PRETRAINED), "laptop", "default")]
    named += [(p, identify(p, None), PRESET_USES.get(p), "preset") for p in PRESETS]
    named += [(f"{s.arch} / {s.pretrained}", identify(s.arch, s.pretrained), s.use, "suggested")
              for s in SUGGESTED]
    return named


def _key(identity: ModelIdentity) -> tuple:
    return identity.backend, identity.arch, identity.fingerprint, identity.text_fingerprint


def _entry(entries: dict[tuple, ModelEntry], identity: ModelIdentity, here: "_Here", *,
           name: str | None = None, use: str | None = None,
           weights_file: str | None = None) -> ModelEntry:
    """The entry of ``identity``, described the first time it is met."""
    key = _key(identity)
    if key not in entries:
        entries[key] = _describe(identity, here, name or _name(identity), use, weights_file)
    return entries[key]


def _name(identity: ModelIdentity) -> str:
    shown = identity.pretrained
    if "/" in shown and (identity.fingerprint.startswith(("file:", "dir:"))):
        shown = Path(shown).name  # a local checkpoint: its file name says enough here
    return f"{identity.arch} / {shown}" + (" (int8)" if identity.image_precision == "int8" else "")


def _flags(identity: ModelIdentity, name: str) -> str:
    if name == "default":
        return ""
    if name in PRESETS:
        return f"--model {name}"
    if identity.arch.startswith("local-dir:") or identity.text_pretrained:
        return f"--model local-dir:{identity.text_pretrained or identity.pretrained}"
    model = identity.config_path or identity.arch
    return f"--model {model} --pretrained {identity.pretrained}"


def _describe(identity: ModelIdentity, here: "_Here", name: str, use: str | None,
              weights_file: str | None) -> ModelEntry:
    cfg = _config(identity)
    published = identity.fingerprint.startswith(("tag:", "hub:")) and not (
        identity.config_path or identity.text_pretrained)  # the published weights, unchanged
    facts = here.published.get((identity.arch, identity.pretrained), {}) if published else {}
    entry = ModelEntry(name, identity.arch, identity.pretrained, identity.backend,
                       _flags(identity, name), use)
    entry.params, entry.params_from = _params(identity, cfg, facts)
    entry.image_size = _size(cfg and configsize.image_size(cfg), facts, "image_size")
    entry.embed_dim = _size(cfg and configsize.embed_dim(cfg), facts, "embed_dim")
    entry.weights, entry.weights_path = here.weights(identity, weights_file)
    entry.runtimes = here.runtimes(identity, entry, cfg)
    entry.figures = {k: v for k, (v, _) in facts.items() if k not in SHAPE_FIGURES}
    sources = sorted({s for k, (_, s) in facts.items() if k in entry.figures})
    entry.figures_source = "; ".join(here.sources.get(s, s) for s in sources) or None
    return entry


def _config(identity: ModelIdentity) -> dict | None:
    if identity.backend == CHINESE_CLIP:
        return None
    return configsize.model_config(identity.arch, _config_file(identity))


def _params(identity: ModelIdentity, cfg: dict | None,
            facts: Facts) -> tuple[int | None, str | None]:
    """The parameter count and where it comes from: the config, open_clip's build, or a paper."""
    counted = configsize.count_parameters(cfg) if cfg else None
    if counted is not None:
        return counted, "config"
    if cfg and identity.config_path is None and identity.arch in configsize.COUNTED:
        return configsize.COUNTED[identity.arch], "open_clip build"
    if "params_m" in facts:
        return round(facts["params_m"][0] * 1e6), "published"
    return None, None


def _size(from_config: int | None, facts: Facts, name: str) -> int | None:
    if from_config:
        return from_config
    return int(facts[name][0]) if name in facts else None


def read_published(path: Path = PUBLISHED) -> tuple[dict[tuple[str, str], Facts], dict[str, str]]:
    """The vendored figures: {(arch, pretrained): {figure: (value, source)}}, and each
    source's description (its ``# source NAME: ...`` comment line)."""
    figures: dict[tuple[str, str], Facts] = {}
    sources: dict[str, str] = {}
    with path.open(encoding="utf-8", newline="") as f:
        lines = []
        for line in f:
            if line.startswith("# source "):
                name, _, text = line[len("# source "):].partition(":")
                sources[name.strip()] = text.strip().rstrip(":")
            elif not line.startswith("#"):
                lines.append(line)
    for row in csv.DictReader(lines):
        figures.setdefault((row["arch"], row["pretrained"]), {})[row["figure"]] = (
            float(row["value"]), row["source"])
    return figures, sources


class _Here:
    """What is on this machine: cached weights, ONNX exports and text-tower files under the
    home, ONNX Runtime; each looked up once, lazily."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.published, self.sources = read_published()
        self._tags: dict[tuple[str, str], str] | None = None
        self._onnx = importlib.util.find_spec("onnxruntime") is not None
        exports = home / ONNX_FOLDER
        self._exports = exports.is_dir() and any(exports.glob("*.onnx"))
        self._anything = _caches_hold_anything()

    def cached_tags(self) -> dict[tuple[str, str], str]:
        """{(arch, tag): file} of every open_clip tag whose weights are cached."""
        if self._tags is None:
            sources = _tag_sources(self.home) if self._anything else {}
            self._tags = {key: path for key, source in sources.items()
                          if (path := cached_file(source))}
        return self._tags

    def weights(self, identity: ModelIdentity, recorded: str | None) -> tuple[str, str | None]:
        """(CACHED / NOT_CACHED / MISSING / RANDOM, the local file or folder)."""
        if identity.pretrained == NO_WEIGHTS:
            return RANDOM, None
        fp = identity.text_fingerprint if identity.text_pretrained else identity.fingerprint
        if fp.startswith(("file:", "dir:")):
            path = Path(identity.text_pretrained or identity.pretrained)
            return (CACHED, str(path)) if path.exists() else (MISSING, None)
        if fp.startswith("hub:"):  # a Hugging Face id (Chinese-CLIP): never downloaded by us
            path = _hub_file(identity.pretrained) if self._anything else None
            return (CACHED, path) if path else (NOT_CACHED, None)
        if recorded and Path(recorded).is_file():
            return CACHED, recorded
        path = self.cached_tags().get((identity.arch, identity.pretrained))
        return (CACHED, path) if path else (NOT_CACHED, None)

    def runtimes(self, identity: ModelIdentity, entry: ModelEntry,
                 cfg: dict | None) -> dict[str, str]:
        torch = _torch_state(identity, entry.weights)
        if identity.backend == CHINESE_CLIP:
            return {"torch": torch, "onnx": NA, "onnx-int8": NA, "numpy-text": NA}
        onnx = {r: self._onnx_state(identity, entry, r, torch) for r in ("onnx", "onnx-int8")}
        return {"torch": torch, **onnx, "numpy-text": self._text_state(identity, entry, cfg, torch)}

    def _onnx_state(self, identity: ModelIdentity, entry: ModelEntry, runtime: str,
                    torch: str) -> str:
        if not self._onnx:
            return NOT_INSTALLED
        if torch != READY:
            return torch
        if self._exports and entry.image_size:  # onnx_path imports torch: its version is in
            if onnx_path(self.home, identity, entry.image_size, runtime).is_file():  # the key
                return READY
        return FIRST_USE

    def _text_state(self, identity: ModelIdentity, entry: ModelEntry, cfg: dict | None,
                    torch: str) -> str:
        """The numpy text tower: NA unless the config is a plain CLIP text tower whose
        weights are (or will be) a file; READY once its file under the home is current."""
        if not cfg or identity.pretrained == NO_WEIGHTS:
            return NA
        spec = texttower.text_spec(identity.arch, _config_file(identity))
        if spec is None:
            return NA
        if torch != READY:
            return torch
        source = _text_weights(identity, entry.weights_path)
        if source is None:
            return NA
        found = towerfile.header(towerfile.tower_path(self.home, source, spec.to_json()))
        fresh = found is not None and found[1].get("source") == file_fingerprint(source)
        return READY if fresh else FIRST_USE


def _torch_state(identity: ModelIdentity, weights: str) -> str:
    """READY with the weights here; FIRST_USE for a tag open_clip downloads; else MISSING
    (a moved file, a Chinese-CLIP id not in the Hugging Face cache: never downloaded)."""
    if weights in (CACHED, RANDOM):
        return READY
    downloads = weights == NOT_CACHED and identity.fingerprint.startswith("tag:")
    return FIRST_USE if downloads else MISSING


def _config_file(identity: ModelIdentity) -> str | None:
    """The config file of ``identity``: a model folder's (a fine-tuned text tower's folder
    holds the whole model), a config JSON, or None for an architecture open_clip names."""
    folder = identity.text_pretrained or (
        identity.pretrained if identity.fingerprint.startswith("dir:") else None)
    return str(Path(folder) / "open_clip_config.json") if folder else identity.config_path


def _text_weights(identity: ModelIdentity, weights_path: str | None) -> Path | None:
    """The file the numpy text tower is converted from (a model folder's safetensors)."""
    if weights_path is None:
        return None
    path = Path(weights_path)
    if path.is_dir():
        path = path / "open_clip_model.safetensors"
    return path if path.is_file() else None


def _caches_hold_anything() -> bool:
    """Whether a weights cache holds anything: open_clip's folder of URL downloads, or a model
    in huggingface_hub's cache. When neither does, no tag is cached."""
    if _entries(Path(CLIP_CACHE).expanduser()):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return any(name.startswith("models--") for name in _entries(Path(constants.HF_HUB_CACHE)))


def _entries(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def _tag_sources(home: Path) -> dict[tuple[str, str], WeightsSource]:
    """Where open_clip downloads each of its tags (:func:`.hub.weights_source`). Reading its
    registry means importing open_clip (seconds), so the answer is kept under the home
    (:data:`TAGS_FILE`) for this open_clip version and these optional libraries."""
    key = _registry_key()
    if key is None:  # open_clip is not installed
        return {}
    path = home / TAGS_FILE
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["key"] == key:
            return {(arch, tag): WeightsSource(**{**s, "fallbacks": tuple(s["fallbacks"])})
                    for arch, tags in kept["tags"].items() for tag, s in tags.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, from another version, or damaged: read open_clip's registry again
    sources = _sources_from_open_clip()
    tags: dict[str, dict] = {}
    for (arch, tag), source in sources.items():
        tags.setdefault(arch, {})[tag] = asdict(source)
    _write_json(path, {"key": key, "tags": tags})
    return sources


def _registry_key() -> str | None:
    """The installed open_clip's version and the libraries that change where it downloads."""
    from importlib import metadata

    try:
        version = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        return None
    return " ".join([version, *(n for n in ("huggingface_hub", "safetensors")
                                if importlib.util.find_spec(n) is not None)])


def _sources_from_open_clip() -> dict[tuple[str, str], WeightsSource]:
    import open_clip

    found = {}
    for arch, tag in open_clip.list_pretrained():
        try:
            found[(arch, tag)] = weights_source(arch, tag)
        except Exception:  # noqa: BLE001 - an entry hub.py cannot read: never found cached
            continue
    return found


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically; a home that cannot be written just keeps nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _hub_file(repo_id: str) -> str | None:
    """The cached weights file of a Hugging Face model repo, without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in hf_weight_names():
        path = try_to_load_from_cache(repo_id=repo_id, filename=name)
        if isinstance(path, str) and Path(path).is_file():
            return path
    return None


__all__ = ["IndexedModel", "ModelEntry", "RUNTIMES", "SUGGESTED", "list_models", "read_published"]
