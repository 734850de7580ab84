"""Write a trained model as a folder open_clip loads (``local-dir:FOLDER``) plus a manifest.

    FOLDER/open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
    FOLDER/open_clip_model.safetensors  the state dict
    FOLDER/mmsearch_manifest.json       base model, data hash, settings, metrics

The folder appears complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsearch.errors import UsageError
from mmsearch.eval.datasets import RetrievalDataset
from mmsearch.models.identity import MANIFEST, ModelIdentity

if TYPE_CHECKING:  # pragma: no cover
    from mmsearch.models.openclip import Embedder

CONFIG, WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def check_target(folder: Path) -> Path:
    """Refuse an output folder that already holds something (nothing is overwritten)."""
    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} already exists and is not empty: choose another --out")
    return folder


def model_config(embedder: "Embedder") -> dict[str, Any]:
    """The open_clip model config of a loaded model (QuickGELU said when the model uses it)."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from mmsearch.models.openclip import open_clip_name

    cfg = open_clip.get_model_config(open_clip_name(embedder.identity))
    if cfg is None:
        raise UsageError(f"no open_clip config for {embedder.identity.describe()}")
    cfg = json.loads(json.dumps(cfg))
    if any(isinstance(m, QuickGELU) for m in embedder.torch_model.modules()):
        cfg["quick_gelu"] = True  # OpenAI weights: open_clip sets it from the tag, not the config
    return cfg


def save_model(model: Any, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any],
               folder: Path, manifest: dict[str, Any]) -> Path:
    """Write the three files into ``folder`` (which must be absent or empty)."""
    from safetensors.torch import save_file

    folder = check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg":
                                          _plain(preprocess_cfg)}, indent=2) + "\n")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    if folder.exists():
        folder.rmdir()  # empty (checked above)
    os.replace(tmp, folder)
    return folder


def base_record(identity: ModelIdentity) -> dict[str, Any]:
    """The base model's identity, as the manifest stores it (its image tower's identity)."""
    return json.loads(identity.to_json())


def data_hash(*datasets: RetrievalDataset) -> str:
    """A short hash of the pairs (file names and captions), to tell training sets apart."""
    digest = hashlib.blake2b(digest_size=8)
    for ds in datasets:
        for path in ds.image_paths:
            digest.update(path.name.encode())
        for caption, owner in zip(ds.captions, ds.caption_image):
            digest.update(f"{int(owner)}\0{caption}\0".encode())
    return digest.hexdigest()


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
