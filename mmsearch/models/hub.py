"""Where a pretrained tag's weights come from, and a fast offline check before downloading.

open_clip fetches a tag's weights through huggingface_hub, which retries for
tens of seconds when there is no network and logs warnings on the way. This
module finds the weights in the local cache without touching the network,
probes the download host once with a short TCP connect, and fails with one
clear :class:`~mmsearch.errors.ModelError` line instead. :func:`quiet_hub`
keeps huggingface_hub and open_clip silent around the real download.

Nothing here imports torch, open_clip or huggingface_hub at module level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from mmsearch.errors import ModelError

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
CLIP_CACHE = "~/.cache/clip"  # where open_clip keeps what it downloads from a URL
_TRUE = {"1", "true", "yes", "on"}
_HUB_LOGGERS = ("huggingface_hub", "huggingface_hub.utils")
_QUIET_MODULES = r"(huggingface_hub|open_clip)(\.|$)"


@dataclass(frozen=True)
class WeightsSource:
    """Where open_clip downloads a tag's weights: a hub repo + file, or a plain URL.

    ``filename`` is the file open_clip asks the hub for first (the safetensors
    variant when safetensors is installed); ``fallbacks`` are the files it
    tries next, in order, when the first one cannot be fetched.
    """

    repo_id: str | None
    filename: str | None
    url: str | None
    fallbacks: tuple[str, ...] = ()
    file: str | None = None  # a tag registered with a local file: open_clip uses it as it is

    @property
    def filenames(self) -> tuple[str, ...]:
        """Every hub file open_clip may use, in the order it tries them."""
        return ((self.filename,) if self.filename else ()) + self.fallbacks

    @property
    def endpoint(self) -> str:
        """The base URL contacted: ``HF_ENDPOINT`` (or huggingface.co) for hub repos, else the URL."""
        if self.repo_id:
            return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        return self.url or ""

    @property
    def host(self) -> str:
        """The host name the download connects to (before any proxy)."""
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        """The endpoint's explicit port, else 443 for https and 80 for http."""
        parts = urlsplit(self.endpoint)
        return parts.port or (80 if parts.scheme == "http" else 443)


def weights_source(arch: str, tag: str) -> WeightsSource:
    """Where open_clip 3.3.0 would download ``arch``/``tag``'s weights from.

    Mirrors ``open_clip.pretrained.download_pretrained``: the hub is preferred
    when huggingface_hub is installed; an ``hf_hub`` entry ``org/name/file``
    names repo and file, ``org/name/`` means ``open_clip_pytorch_model.bin``;
    with safetensors installed a ``.safetensors`` twin is tried first.
    Raises :class:`ModelError` for an unknown tag.
    """
    import open_clip
    from open_clip import pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(arch.replace("/", "-"), tag)
    if cfg.get("file"):
        return WeightsSource(None, None, None, file=str(cfg["file"]))
    hub_entry, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub_entry and oc_pretrained.has_hf_hub():
        repo_id, filename = os.path.split(hub_entry)
        names = _hub_filenames(filename or open_clip.constants.HF_WEIGHTS_NAME)
        return WeightsSource(repo_id, names[0], None, names[1:])
    if url:
        return WeightsSource(None, None, url)
    raise ModelError(f"{arch} has no downloadable pretrained tag {tag!r}")


def _hub_filenames(filename: str) -> tuple[str, ...]:
    """``filename`` preceded by its safetensors alternatives, as open_clip tries them."""
    from open_clip import constants
    from open_clip import pretrained as oc_pretrained

    if not getattr(oc_pretrained, "_has_safetensors", False):
        return (filename,)
    if filename == constants.HF_WEIGHTS_NAME:
        return (constants.HF_SAFE_WEIGHTS_NAME, filename)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def cached_weights(arch: str, tag: str) -> str | None:
    """The local file of ``arch``/``tag``'s weights if already cached, else None; no network.

    Hub repos are looked up with huggingface_hub's ``try_to_load_from_cache``
    (revision ``main``, in the cache huggingface_hub resolved from
    ``HF_HUB_CACHE`` / ``HF_HOME`` when imported: the one open_clip downloads to);
    URL downloads in open_clip's ``~/.cache/clip/<basename>``. The SHA256 that
    open_clip checks for some URL downloads is not verified here.
    """
    return cached_file(weights_source(arch, tag))


def cached_file(source: WeightsSource) -> str | None:
    """The local file of ``source`` if already cached, else None; no network, no open_clip."""
    if source.file:
        return source.file if os.path.isfile(source.file) else None
    if source.url:
        path = os.path.join(os.path.expanduser(CLIP_CACHE), os.path.basename(source.url))
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    for filename in source.filenames:
        path = try_to_load_from_cache(repo_id=source.repo_id, filename=filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def check_download(arch: str, tag: str, *, timeout: float = 3.0) -> str | None:
    """The cached weights' path; else None when the download host answers; else ModelError.

    Fails fast (one line) when ``HF_HUB_OFFLINE`` is set or no TCP connection to
    the host (or to the https/http proxy in the environment) opens within
    ``timeout`` seconds, DNS lookup included.
    """
    path = cached_weights(arch, tag)
    if path is not None:
        return path
    source = weights_source(arch, tag)
    if source.file:
        raise ModelError(f"weights file of {arch} / {tag} not found: {source.file}")
    if source.repo_id and _hub_offline():
        reason = "HF_HUB_OFFLINE is set and they are not in the cache"
    elif not _connectable(*_address(source), timeout):
        reason = f"{source.host} is unreachable (offline?)"
    else:
        return None
    raise ModelError(
        f"cannot download weights {arch} / {tag}: {reason}; download them once where there is "
        "network (open_clip caches them), or pass --pretrained /path/to/checkpoint.pt")


def _hub_offline() -> bool:
    """Whether huggingface_hub's offline mode is asked for in the environment."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _address(source: WeightsSource) -> tuple[str, int]:
    """(host, port) to connect to: the proxy for the endpoint's scheme if one is set, else the host."""
    scheme = urlsplit(source.endpoint).scheme or "https"
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(source.host, proxies):
        return source.host, source.port
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _connectable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` s (DNS included)."""
    opened: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except (OSError, ValueError):
            pass

    worker = threading.Thread(target=attempt, name="mmsearch-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)  # a resolver that hangs is abandoned, not waited for
    return bool(opened)


class _FromOpenClip(logging.Filter):
    """Drops records open_clip logs through the root logger (``logging.warning(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """While active, huggingface_hub and open_clip print nothing; everything is restored on exit.

    Silences the huggingface_hub loggers (level above CRITICAL), its progress
    bars, warnings raised from huggingface_hub/open_clip modules, and the
    records open_clip logs through the root logger. Without huggingface_hub
    installed it does nothing.
    """
    try:
        from huggingface_hub import utils as hub_utils
    except ImportError:
        yield
        return
    with _warnings_ignored(), _loggers_silenced(), _bars_disabled(hub_utils):
        yield


@contextlib.contextmanager
def _warnings_ignored() -> Iterator[None]:
    """Ignore ``warnings`` raised from huggingface_hub and open_clip modules."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        yield


@contextlib.contextmanager
def _loggers_silenced() -> Iterator[None]:
    """Raise the huggingface_hub loggers above CRITICAL and filter open_clip's root records."""
    loggers = [logging.getLogger(name) for name in _hub_loggers()]
    levels = [logger.level for logger in loggers]
    root, root_filter = logging.getLogger(), _FromOpenClip()
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    root.addFilter(root_filter)
    try:
        yield
    finally:
        root.removeFilter(root_filter)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _bars_disabled(hub_utils: Any) -> Iterator[None]:
    """Disable huggingface_hub's progress bars; re-enable them after only if they were on."""
    were_on = not hub_utils.are_progress_bars_disabled()
    if were_on:
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            hub_utils.enable_progress_bars()


def _hub_loggers() -> list[str]:
    """huggingface_hub's logger names: the package, its utils, and every child already created."""
    children = [name for name, logger in logging.root.manager.loggerDict.items()
                if name.startswith("huggingface_hub.") and isinstance(logger, logging.Logger)]
    return sorted(set(_HUB_LOGGERS).union(children))
