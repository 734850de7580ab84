"""`mmsearch serve`: the HTTP API and the search page, until Ctrl-C (``--watch``: and keep
the index current meanwhile)."""

from __future__ import annotations

import secrets
import socket
from typing import Annotated, Optional

import typer

from mmsearch.cli.common import DeviceOpt, HomeOpt, IndexOpt, err, handle_errors
from mmsearch.cli.watching import RescanOpt, WatchOpt, watch_options
from mmsearch.errors import UsageError
from mmsearch.settings import DEVICE


@handle_errors
def serve_command(
    index: IndexOpt = None, home: HomeOpt = None, device: DeviceOpt = DEVICE,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback "
                                      "needs a token (or --no-auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    token: Annotated[Optional[str], typer.Option(help="Require this token (a ?token= URL sets "
                                                 "a cookie). Generated when listening beyond "
                                                 "loopback.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without a token even beyond "
                                          "loopback (anyone who can reach it sees your photos).")] = False,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
    watch: WatchOpt = False, rescan_every: RescanOpt = None,
) -> None:
    """Serve the search page and the JSON API over the index (the model stays loaded)."""
    from mmsearch.serve.security import Access, is_loopback
    from mmsearch.settings import resolve

    watching = watch_options(watch, rescan_every)
    if token is not None and no_auth:
        raise UsageError("--token and --no-auth contradict each other")
    if token is None and not no_auth and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    port = port or _free_port(host)
    settings = resolve(index=index, home=home, device=device)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    _run(settings, Access(host, token), host, port, url + (f"?token={token}" if token else ""),
         open_browser, watching)


def _run(settings, access, host: str, port: int, url: str, open_browser: bool,
         watching: dict | None = None) -> None:
    import uvicorn

    from mmsearch.serve.app import create_app
    from mmsearch.serve.service import SearchService

    service = SearchService(settings)
    try:
        app = create_app(service, access)
        typer.echo(f"mmsearch: serving index {settings.index!r} at {url} (Ctrl-C to stop)")
        if watching is not None:
            service.watch(err, **watching)
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


__all__ = ["serve_command"]
