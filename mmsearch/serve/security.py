"""Who may ask, and which files may be served.

* Host header: a server bound to a loopback address answers only requests whose
  Host is a loopback name (a DNS-rebinding page gets 400).
* Token: required when the server listens beyond loopback (unless ``--no-auth``)
  or when one is given. Accepted as ``Authorization: Bearer T``, as the
  ``mmsearch_token`` cookie, or once as ``?token=T``, which sets that cookie
  (HttpOnly, SameSite=Strict) and redirects to the same URL without it.
  Compared in constant time.
* Files are served by catalog id only, and only while the file, symlinks
  resolved, is still under a folder that was indexed. A photo indexed from a URL
  (``s3://bucket/photos/a.jpg``, by the Ray runner) is served when it lies under a
  URL that was indexed; the server reads it with the credentials it runs with.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from mmsearch.locations import Roots, is_url

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
COOKIE = "mmsearch_token"
OPEN_PATHS = frozenset({"/healthz"})


@dataclass(frozen=True)
class Access:
    """The access rules of one server: its bind address and its token (None: no auth)."""

    host: str
    token: str | None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's Host header may be answered (see the module)."""
        if not header:
            return False
        return hostname(header) in LOOPBACK_NAMES if self.loopback else True

    def token_ok(self, offered: str | None) -> bool:
        if self.token is None:
            return True
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())


def hostname(header: str) -> str:
    """The host name of a Host header, without its port (``[::1]:8000`` -> ``[::1]``)."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[:end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def offered_token(headers, cookies) -> str | None:
    """The token a request carries (Authorization header, else cookie)."""
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return cookies.get(COOKIE)


def without_token(path: str, params: list[tuple[str, str]]) -> str:
    """The URL to redirect to once a ``?token=`` has been turned into a cookie."""
    rest = [(k, v) for k, v in params if k != "token"]
    return path + ("?" + urlencode(rest) if rest else "")


def servable(path: str, roots: list[str] | None) -> Path | str | None:
    """``path`` (a catalog path) resolved, if it is a regular file still under an indexed root
    (a URL: as it is, if under an indexed URL; whether it still exists is seen on reading).

    ``roots`` None (an index made before roots were recorded): the file must stay in
    its own folder once symlinks are resolved.
    """
    if is_url(path):
        inside = path in Roots(r for r in roots or [] if is_url(r))
        return path if inside and "/../" not in path + "/" else None
    try:
        real = Path(os.path.realpath(path))
        if not real.is_file():
            return None
    except OSError:
        return None
    allowed = roots if roots is not None else [os.path.dirname(path)]
    if str(real) in Roots(allowed):  # under a root as recorded: every folder of a real path
        return real                  # is real, so it is under that root resolved too
    return real if str(real) in Roots(os.path.realpath(r) for r in allowed) else None
