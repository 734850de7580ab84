"""mmsearch.models.hub: where a tag's weights come from, the cache lookup, the fast offline check, quiet_hub.

Everything runs offline against real open_clip / huggingface_hub code: caches are
temporary folders laid out as huggingface_hub lays them out, and reachable hosts
are real TCP listeners on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mmsearch.errors import ModelError
from mmsearch.models import hub

ARCH, TAG = "ViT-B-32", "laion2b_s34b_b79k"
REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
SAFE, BIN = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"
COMMIT = "a" * 40
ENV_VARS = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY",
            "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache under tmp, and an environment free of proxies/offline/endpoint."""
    import huggingface_hub.constants as constants

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))  # read at import time by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache: Path, repo_id: str, filename: str, data: bytes = b"weights") -> Path:
    """Store a file as huggingface_hub does: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return link


@pytest.fixture
def sockets(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Records (instead of making) every DNS lookup and TCP connection attempt."""
    calls: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise OSError("network touched")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real TCP server socket on 127.0.0.1 (connections complete in the backlog)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- weights_source ------------------------------------------------------------------------------


def test_weights_source_of_the_default_model_is_the_laion_hub_repo(hf_cache: Path) -> None:
    source = hub.weights_source(ARCH, TAG)
    assert source.repo_id == REPO
    assert source.url is None
    assert (source.filename, source.fallbacks) == (SAFE, (BIN,))  # safetensors is installed: tried first
    assert source.filenames == (SAFE, BIN)
    assert (source.host, source.port) == ("huggingface.co", 443)


def test_weights_source_normalises_like_open_clip(hf_cache: Path) -> None:
    assert hub.weights_source("ViT-B/32", "LAION2B-S34B-B79K") == hub.weights_source(ARCH, TAG)


def test_weights_source_of_an_explicit_hub_file_tries_its_safetensors_twin_first(hf_cache: Path) -> None:
    source = hub.weights_source("ViTamin-S", "datacomp1b")
    assert source.repo_id == "jienengchen/ViTamin-S"
    assert source.filenames == ("pytorch_model.safetensors", "pytorch_model.bin")


def test_weights_source_of_an_unknown_tag_is_a_model_error(hf_cache: Path) -> None:
    with pytest.raises(ModelError, match="no-such-tag"):
        hub.weights_source(ARCH, "no-such-tag")


def test_host_and_port_follow_hf_endpoint(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org:8443/")
    source = hub.weights_source(ARCH, TAG)
    assert (source.host, source.port) == ("hf-mirror.example.org", 8443)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local")
    assert (source.host, source.port) == ("mirror.local", 80)


@pytest.mark.parametrize("cached", [SAFE, BIN])
def test_open_clip_itself_resolves_the_file_cached_weights_finds(
        hf_cache: Path, monkeypatch: pytest.MonkeyPatch, cached: str) -> None:
    """open_clip's real download_pretrained (hub offline mode, so no network) agrees with our lookup."""
    import huggingface_hub.constants as constants
    import open_clip

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = put_in_cache(hf_cache, REPO, cached)
    with hub.quiet_hub():
        resolved = open_clip.download_pretrained(open_clip.get_pretrained_cfg(ARCH, TAG))
    assert resolved == hub.cached_weights(ARCH, TAG) == str(path)


# --- cached_weights ------------------------------------------------------------------------------


def test_cached_weights_is_none_for_an_empty_cache(hf_cache: Path) -> None:
    assert hub.cached_weights(ARCH, TAG) is None


def test_cached_weights_finds_the_safetensors_file(hf_cache: Path, sockets: list[tuple]) -> None:
    path = put_in_cache(hf_cache, REPO, SAFE)
    found = hub.cached_weights(ARCH, TAG)
    assert found == str(path)
    assert Path(found).read_bytes() == b"weights"
    assert sockets == []


def test_cached_weights_prefers_safetensors_and_falls_back_to_the_bin(hf_cache: Path) -> None:
    bin_path = put_in_cache(hf_cache, REPO, BIN)
    assert hub.cached_weights(ARCH, TAG) == str(bin_path)
    safe_path = put_in_cache(hf_cache, REPO, SAFE, b"safe")
    assert hub.cached_weights(ARCH, TAG) == str(safe_path)


def test_cached_weights_ignores_other_repos_and_no_exist_markers(hf_cache: Path) -> None:
    put_in_cache(hf_cache, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", SAFE)
    no_exist = hf_cache / ("models--" + REPO.replace("/", "--")) / ".no_exist" / COMMIT / SAFE
    no_exist.parent.mkdir(parents=True)
    no_exist.touch()
    (no_exist.parents[2] / "refs").mkdir()
    (no_exist.parents[2] / "refs" / "main").write_text(COMMIT)
    assert hub.cached_weights(ARCH, TAG) is None


def test_cached_weights_honours_hf_hub_cache(
        tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    other = tmp_path / "elsewhere"
    put_in_cache(other, REPO, SAFE)
    assert hub.cached_weights(ARCH, TAG) is None
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(other))
    snapshot = other / ("models--" + REPO.replace("/", "--")) / "snapshots" / COMMIT
    assert hub.cached_weights(ARCH, TAG) == str(snapshot / SAFE)


# --- check_download ------------------------------------------------------------------------------


def test_check_download_fails_fast_offline_with_one_line(
        hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without network: the name does not resolve (no packet leaves here)."""
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns(socket.getaddrinfo))
    start = time.monotonic()
    try:
        result = hub.check_download(ARCH, TAG)
    except ModelError as exc:
        elapsed = time.monotonic() - start
        message = str(exc)
    else:
        pytest.fail(f"check_download returned {result!r} with no DNS")
    assert elapsed < 2.0  # bounds a hang; not a benchmark
    assert "\n" not in message
    assert message.startswith(f"cannot download weights {ARCH} / {TAG}: huggingface.co is unreachable")
    assert "--pretrained" in message


def test_check_download_refused_port_is_unreachable(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ModelError, match=r"127\.0\.0\.1 is unreachable.*--pretrained"):
        hub.check_download(ARCH, TAG)


def test_check_download_is_bounded_by_its_timeout(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver or connect that hangs is abandoned after ``timeout`` (simulated: a stalled connect)."""
    release = threading.Event()

    def stall(*args: object, **kwargs: object) -> None:
        release.wait(10)
        raise OSError("stalled")

    monkeypatch.setattr(socket, "create_connection", stall)
    start = time.monotonic()
    try:
        with pytest.raises(ModelError, match="huggingface.co is unreachable"):
            hub.check_download(ARCH, TAG, timeout=0.3)
        assert 0.25 < time.monotonic() - start < 2.0
    finally:
        release.set()


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_check_download_with_hf_hub_offline_opens_no_socket(
        hf_cache: Path, sockets: list[tuple], monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ModelError) as info:
        hub.check_download(ARCH, TAG)
    assert sockets == []
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert f"{ARCH} / {TAG}" in message and "--pretrained" in message


def test_check_download_returns_cached_weights_without_the_network(
        hf_cache: Path, sockets: list[tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    path = put_in_cache(hf_cache, REPO, SAFE)
    assert hub.check_download(ARCH, TAG) == str(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.check_download(ARCH, TAG) == str(path)
    assert sockets == []


def test_check_download_lets_a_reachable_endpoint_download(
        hf_cache: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    port = listener.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub.check_download(ARCH, TAG) is None
    listener.settimeout(2.0)
    peer, _ = listener.accept()  # the probe really connected to the endpoint's own port
    peer.close()


def test_check_download_probes_the_https_proxy(
        hf_cache: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = f"127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns(socket.getaddrinfo))  # huggingface.co never resolves
    monkeypatch.setenv("HTTPS_PROXY", f"http://{proxy}")
    assert hub.check_download(ARCH, TAG) is None
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ModelError, match="huggingface.co is unreachable"):
        hub.check_download(ARCH, TAG)
    monkeypatch.setenv("https_proxy", proxy)  # lower case wins, as in urllib/requests; no scheme
    assert hub.check_download(ARCH, TAG) is None
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    with pytest.raises(ModelError, match="huggingface.co is unreachable"):
        hub.check_download(ARCH, TAG)  # bypassed: the host itself is probed


def _no_dns(real: Callable[..., Any]) -> Callable[..., Any]:
    """getaddrinfo that resolves IP literals only (as an offline resolver would)."""
    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "huggingface.co":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)
    return lookup


# --- quiet_hub -----------------------------------------------------------------------------------


def test_quiet_hub_silences_hub_loggers_and_restores_levels(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub_logger = logging.getLogger("huggingface_hub")
    child = logging.getLogger("huggingface_hub.file_download")
    utils_logger = logging.getLogger("huggingface_hub.utils")
    hub_logger.setLevel(logging.INFO)
    child.setLevel(logging.DEBUG)
    try:
        with hub.quiet_hub():
            hub_logger.warning("retrying in 1s")
            hub_logger.error("cannot reach huggingface.co")
            child.warning("child warning")
            utils_logger.critical("utils critical")
        assert caplog.records == []
        assert capfd.readouterr() == ("", "")
        levels = (hub_logger.level, child.level, utils_logger.level)
        assert levels == (logging.INFO, logging.DEBUG, logging.NOTSET)
        hub_logger.warning("audible again")
        assert [r.getMessage() for r in caplog.records] == ["audible again"]
    finally:
        hub_logger.setLevel(logging.WARNING)
        child.setLevel(logging.NOTSET)


def test_quiet_hub_silences_open_clip_root_logging(
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    import open_clip

    caplog.set_level(logging.INFO)
    with hub.quiet_hub(), pytest.raises(RuntimeError):
        open_clip.create_model(ARCH, pretrained="no-such-tag")  # logs an error through the root logger
    assert caplog.records == []
    assert capfd.readouterr() == ("", "")
    assert logging.getLogger().filters == []
    with pytest.raises(RuntimeError):
        open_clip.create_model(ARCH, pretrained="no-such-tag")
    assert any("no-such-tag" in r.getMessage() for r in caplog.records)


def test_quiet_hub_silences_hub_warnings_and_progress_bars() -> None:
    from huggingface_hub import utils as hub_utils

    assert not hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with hub.quiet_hub():
            assert hub_utils.are_progress_bars_disabled()
            warnings.warn_explicit("hub says", UserWarning, "file_download.py", 1,
                                   module="huggingface_hub.file_download")
            warnings.warn_explicit("clip says", UserWarning, "pretrained.py", 1,
                                   module="open_clip.pretrained")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="mmsearch.x")
    assert [str(w.message) for w in caught] == ["ours"]
    assert not hub_utils.are_progress_bars_disabled()


def test_quiet_hub_leaves_disabled_progress_bars_disabled() -> None:
    from huggingface_hub import utils as hub_utils

    hub_utils.disable_progress_bars()
    try:
        with hub.quiet_hub():
            pass
        assert hub_utils.are_progress_bars_disabled()
    finally:
        hub_utils.enable_progress_bars()


def test_quiet_hub_restores_on_error() -> None:
    hub_logger = logging.getLogger("huggingface_hub")
    before = hub_logger.level
    with pytest.raises(ValueError), hub.quiet_hub():
        raise ValueError("boom")
    assert hub_logger.level == before
    assert logging.getLogger().filters == []


def test_quiet_hub_without_huggingface_hub_just_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with hub.quiet_hub():
        ran = True
    assert ran


# --- module hygiene -------------------------------------------------------------------------------


def test_importing_hub_loads_no_heavy_library() -> None:
    code = ("import sys, mmsearch.models.hub; "
            "print(sorted(m for m in ('torch', 'open_clip', 'huggingface_hub', 'faiss')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.stdout.strip() == "[]"
