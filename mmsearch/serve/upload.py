"""Uploads (``POST /api/search/image``): the photo is read into memory, never onto disk.

The body is read from the connection as it arrives and counted: once more than the
limit (plus :data:`FRAMING` for the multipart boundaries and part headers) has
arrived, the request is refused with 413 at once, whatever its Content-Length said
or whether it had one (chunked). The body is then split in memory by
python-multipart's parser and the field ``file`` kept. FastAPI's ``UploadFile`` is
not used: it spools any part over 1 MB to a temporary file. At most :data:`AT_ONCE`
uploads are held at a time; the others wait with their bodies still unread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import HTTPException, Request

from mmsearch.errors import UsageError

FRAMING = 64 << 10  # bytes of multipart framing allowed around the photo
AT_ONCE = 4
FIELD = "file"
NOT_MULTIPART = f"send the photo as the multipart/form-data field `{FIELD}`"
# The request body as the OpenAPI docs show it (the route reads it itself).
OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary"}}}}}}}


def too_big(limit: int) -> HTTPException:
    return HTTPException(413, f"upload too big (at most {limit >> 20} MB)")


class Uploads:
    """The uploads of one application: their size limit and how many are held at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.slots = asyncio.Semaphore(AT_ONCE)

    async def read(self, request: Request) -> tuple[bytes, str | None]:
        """(photo bytes, file name) of a request; 413 too big, 400 not multipart."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limit + FRAMING:
                raise too_big(self.limit)
        data, name = photo_part(bytes(body), request.headers.get("content-type", ""))
        if len(data) > self.limit:
            raise too_big(self.limit)
        return data, name


def photo_part(body: bytes, content_type: str) -> tuple[bytes, str | None]:
    """The bytes and file name of the multipart field ``file`` of ``body``."""
    multipart = _multipart()
    kind, params = multipart.parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UsageError(NOT_MULTIPART)
    parts = _Parts(multipart)
    try:
        parser = multipart.MultipartParser(params[b"boundary"], parts.callbacks())
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - python-multipart's errors vary between versions
        raise UsageError("the upload is not well-formed multipart/form-data") from None
    for name, filename, data in parts.done:
        if name == FIELD:
            return data, filename
    raise UsageError(NOT_MULTIPART)


class _Parts:
    """python-multipart callbacks collecting each part's name, file name and bytes."""

    def __init__(self, multipart: Any) -> None:
        self.multipart = multipart
        self.done: list[tuple[str, str | None, bytes]] = []
        self.data, self.header, self.value, self.disposition = bytearray(), b"", b"", b""

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_part_data": self._data,
                "on_header_field": self._field, "on_header_value": self._value,
                "on_header_end": self._header_end, "on_part_end": self._end}

    def _begin(self) -> None:
        self.data, self.header, self.value, self.disposition = bytearray(), b"", b"", b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]

    def _field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def _end(self) -> None:
        _, options = self.multipart.parse_options_header(self.disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self.done.append((name, None if filename is None else filename.decode("utf-8", "replace"),
                          bytes(self.data)))


def _multipart() -> Any:
    """python-multipart's module (named ``python_multipart`` since 0.0.13)."""
    try:
        import python_multipart.multipart as multipart
    except ImportError:  # pragma: no cover - older python-multipart
        import multipart.multipart as multipart  # type: ignore[no-redef]
    return multipart
