"""The FastAPI application of ``mmsearch serve``: the JSON API, the page, thumbnails, originals.

Every error becomes a JSON ``{"detail": "one line"}`` with a status: 400 bad
input, 404 unknown id, 413 upload too big, 415 not an image, 503 model unavailable,
500 a damaged index, a disk error or a bug. A 5xx answer says only what happened
and to look at the server's log, where the full message (with paths) goes: no
answer shows the server's paths. OpenAPI docs at ``/docs``.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from mmsearch import __version__
from mmsearch.errors import (CorruptIndexError, DecodeError, IndexNotFoundError, MMSearchError,
                             ModelError, UsageError, first_line)
from mmsearch.ingest import video as video_decoder
from mmsearch.ingest.remote import read_url
from mmsearch.locations import video_of
from mmsearch.search.filters import OPTIONS, Filters, from_options
from mmsearch.search.query import Query as SearchQuery
from mmsearch.search.query import image_id as read_id
from mmsearch.serve.security import (COOKIE, OPEN_PATHS, Access, offered_token, servable,
                                     without_token)
from mmsearch.serve.service import SearchService
from mmsearch.serve.thumbs import frame_thumbnail, frame_thumbnail_bytes, thumbnail
from mmsearch.serve.upload import FRAMING, OPENAPI, Uploads, too_big

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 25 << 20  # bytes
log = logging.getLogger("mmsearch.serve")


def create_app(service: SearchService, access: Access, *, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The application serving ``service`` under the rules of ``access``."""
    app = FastAPI(title="mmsearch", version=__version__,
                  description="Search a photo collection by meaning.")
    _guard(app, access, max_upload)
    app.add_exception_handler(MMSearchError, _library_error)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(Exception, _unexpected)
    _api_routes(app, service, max_upload)
    _file_routes(app, service)
    app.mount("/static", _RevalidatedFiles(directory=STATIC), name="static")
    return app


class _RevalidatedFiles(StaticFiles):
    """The page's files, revalidated on every load (cheap, with ETags), so an upgrade never
    pairs a new index.html with an old app.js."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _guard(app: FastAPI, access: Access, max_upload: int) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if not access.host_allowed(request.headers.get("host")):
            return JSONResponse({"detail": "unknown Host header"}, status_code=400)
        if access.token is not None and request.url.path not in OPEN_PATHS:
            offered = request.query_params.get("token")
            if offered is not None and access.token_ok(offered):
                target = without_token(request.url.path, list(request.query_params.multi_items()))
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(COOKIE, offered, httponly=True, samesite="strict")
                return response
            if not access.token_ok(offered_token(request.headers, request.cookies)):
                return JSONResponse({"detail": "a token is needed: open the URL `mmsearch serve` "
                                               "printed"}, status_code=401)
        length = request.headers.get("content-length") or ""
        if length.isascii() and length.isdigit() and (len(length) > 15
                                                      or int(length) > max_upload + FRAMING):
            refused = too_big(max_upload)
            return JSONResponse({"detail": refused.detail}, status_code=refused.status_code)
        return await call_next(request)


_STATUS = ((DecodeError, 415), (UsageError, 400), (IndexNotFoundError, 404), (ModelError, 503))
# What a 5xx answer says; the error itself (which may name the server's paths) is logged.
_PUBLIC = ((CorruptIndexError, "the index is damaged: run `mmsearch check` on the server"),
           (ModelError, "the model is unavailable"), (Exception, "the server failed to answer"))


def _public(exc: Exception) -> str:
    return next(m for kind, m in _PUBLIC if isinstance(exc, kind)) + " (its log says why)"


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    message = first_line(exc)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, message)
        message = _public(exc)
    return JSONResponse({"detail": message}, status_code=status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged with its traceback, answered as JSON without one."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": _public(exc)}, status_code=500)


async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's list of validation errors as the API's one line (400, like other bad input)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)


def _option(name: str, default: Any = None) -> Any:
    """A query parameter as :data:`mmsearch.search.filters.OPTIONS` declares it."""
    return Query(default, alias=name, description=OPTIONS[name].help)


def filters(
    in_: Optional[str] = _option("in"), after: Optional[str] = _option("after"),
    before: Optional[str] = _option("before"), camera: Optional[str] = _option("camera"),
    ext: Optional[str] = _option("ext"), near: Optional[str] = _option("near"),
    km: Optional[float] = _option("km"), min_score: Optional[float] = _option("min_score"),
    sort: str = _option("sort", "score"), dedup: bool = _option("dedup", False),
    type_: Optional[str] = _option("type"), moments: bool = _option("moments", False),
) -> Filters:
    """The filters of a request (the CLI's query options)."""
    return from_options(within=in_, after=after, before=before, camera=camera, ext=ext,
                        near=near, km=km, min_score=min_score, sort=sort, dedup=dedup,
                        type=type_, moments=moments)


def _image_id(raw: str, service: SearchService) -> tuple[int, dict[str, Any]]:
    """An id from a URL, and its catalog row; 404 for anything that is not an indexed image."""
    try:
        number = read_id(raw)
    except UsageError:
        raise HTTPException(404, "no such image") from None
    record = service.record(number)
    if record is None:
        raise HTTPException(404, "no such image")
    return number, record


def _file(record: dict[str, Any], service: SearchService) -> Path | str:
    """The file an id serves (a photo; for a moment, its video) while it is servable; 404
    otherwise."""
    video = video_of(record["path"]) if record.get("video_id") is not None else None
    path = servable(video or record["path"], service.roots)
    if path is None:
        raise HTTPException(404, "no such image")
    return path


def _thumbnail(service: SearchService, path: Path | str, record: dict[str, Any],
               t: float | None) -> Path | bytes:
    """The cached thumbnail of an id: its photo's, or its video's frame at the moment's time;
    with ``t``, the video's frame at that time instead (held within the video), not cached."""
    if record.get("video_id") is None:
        return thumbnail(service.thumbs, path, record["content_hash"])
    video = service.video(record["video_id"])
    if video is None or not isinstance(path, Path):
        raise HTTPException(404, "no such image")
    if not video_decoder.available():
        raise HTTPException(503, video_decoder.INSTALL)
    if t is None:
        return frame_thumbnail(service.thumbs, path, video["content_hash"],
                               float(record["time_s"] or 0.0))
    seconds = max(0.0, min(t, video["duration"]) if video["duration"] else t)
    return frame_thumbnail_bytes(path, seconds)


def _api_routes(app: FastAPI, service: SearchService, max_upload: int) -> None:
    from mmsearch.search.syntax import parse

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {**service.info(), "filters": {
            name: {"help": o.help, "max_chars": o.max_chars} for name, o in OPTIONS.items()}}

    @app.get("/api/search")
    def search(q: str = Query(..., description="Words, id:N, joined by + and -."),
               k: int = 50, offset: int = 0, f: Filters = Depends(filters)) -> dict[str, Any]:
        return {"query": q, **service.search(parse(q, is_file=lambda _: False), k, offset, f)}

    @app.get("/api/similar/{image_id}")
    def similar(image_id: str, k: int = 50, offset: int = 0,
                f: Filters = Depends(filters)) -> dict[str, Any]:
        number, _ = _image_id(image_id, service)
        return {"query": f"id:{number}", **service.search(SearchQuery.id(number), k, offset, f)}

    uploads = Uploads(max_upload)

    @app.post("/api/search/image", openapi_extra=OPENAPI)
    async def search_image(request: Request, k: int = 50, offset: int = 0,
                           f: Filters = Depends(filters)) -> dict[str, Any]:
        async with uploads.slots:
            data, name = await uploads.read(request)
            return await run_in_threadpool(_search_photo, service, data, name, k, offset, f)

    @app.get("/api/texts")
    def texts(image_id: str, k: int = 5) -> dict[str, Any]:
        number, _ = _image_id(image_id, service)
        return service.texts(number, k)


def _search_photo(service: SearchService, data: bytes, name: str | None, k: int, offset: int,
                  f: Filters) -> dict[str, Any]:
    from mmsearch.ingest.decode import decode_bytes

    image = decode_bytes(data)
    return {"query": f"image:{name or 'upload'}",
            **service.search(SearchQuery.image(image), k, offset, f)}


def _file_routes(app: FastAPI, service: SearchService) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/thumb/{image_id}")
    def thumb(image_id: str, t: Optional[float] = Query(
            None, allow_inf_nan=False,
            description="A moment of a video: its frame at this time (seconds) instead.")
              ) -> Response:
        _, record = _image_id(image_id, service)
        path = _file(record, service)
        what = "photo" if record.get("video_id") is None else "video"
        try:
            cached = _thumbnail(service, path, record, t)
        except (DecodeError, OSError, UsageError):
            raise HTTPException(404, f"this {what} cannot be read any more") from None
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        if isinstance(cached, bytes):
            return Response(cached, media_type="image/webp", headers=headers)
        return FileResponse(cached, media_type="image/webp", headers=headers)

    @app.get("/original/{image_id}")
    def original(image_id: str) -> Response:
        _, record = _image_id(image_id, service)
        path = _file(record, service)
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(path, str):  # a URL: read through fsspec
            try:
                data = read_url(path)
            except (DecodeError, UsageError):
                raise HTTPException(404, "this photo cannot be read any more") from None
            kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return Response(data, media_type=kind, headers=headers)
        return FileResponse(path, headers=headers)
