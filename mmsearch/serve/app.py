"""The FastAPI application of ``mmsearch serve``: the JSON API, the page, thumbnails, originals.

Every library error becomes a JSON ``{"detail": "one line"}`` with a status: 400
bad input, 404 unknown id, 413 upload too big, 415 not an image, 503 model
unavailable, 500 a damaged index or a disk error. OpenAPI docs at ``/docs``.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any, Optional

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from mmsearch import __version__
from mmsearch.errors import (DecodeError, IndexNotFoundError, MMSearchError, ModelError,
                             UsageError)
from mmsearch.ingest.remote import read_url
from mmsearch.search.filters import Filters, lat_lon
from mmsearch.search.query import Query as SearchQuery
from mmsearch.serve.security import (COOKIE, OPEN_PATHS, Access, offered_token, servable,
                                     without_token)
from mmsearch.serve.service import SearchService
from mmsearch.serve.thumbs import thumbnail

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 25 << 20  # bytes


def create_app(service: SearchService, access: Access, *, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The application serving ``service`` under the rules of ``access``."""
    app = FastAPI(title="mmsearch", version=__version__,
                  description="Search a photo collection by meaning.")
    _guard(app, access, max_upload)
    app.add_exception_handler(MMSearchError, _library_error)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
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
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload + 4096:
            return JSONResponse({"detail": f"upload too big (at most {max_upload >> 20} MB)"},
                                status_code=413)
        return await call_next(request)


_STATUS = ((DecodeError, 415), (UsageError, 400), (IndexNotFoundError, 404), (ModelError, 503))


async def _library_error(request: Request, exc: Exception) -> JSONResponse:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return JSONResponse({"detail": message}, status_code=status)


async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's list of validation errors as the API's one line (400, like other bad input)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)


def filters(
    in_: Optional[str] = Query(None, alias="in", description="Only images under this folder."),
    after: Optional[str] = Query(None, description="Taken from the start of this period: 2023, 2023-07, 2023-07-14."),
    before: Optional[str] = Query(None, description="Taken up to the end of this period."),
    camera: Optional[str] = Query(None, description="Camera make or model contains this."),
    ext: Optional[str] = Query(None, description="File types, comma-separated: jpg,heic."),
    near: Optional[str] = Query(None, description="LAT,LON (with km)."),
    km: Optional[float] = Query(None, description="Radius around `near`, kilometres."),
    min_score: Optional[float] = Query(None, description="Lowest cosine score kept."),
    sort: str = Query("score", description="score, date (newest first) or date-asc."),
    dedup: bool = Query(False, description="Hide near-duplicates of better hits."),
) -> Filters:
    """The filters of a request (the CLI's query options)."""
    return Filters(within=in_ or None, after=after or None, before=before or None,
                   camera=camera or None, ext=tuple(ext.split(",")) if ext else (),
                   near=lat_lon(near), km=km, min_score=min_score, sort=sort, dedup=dedup)


def _image_id(raw: str, service: SearchService) -> tuple[int, dict[str, Any]]:
    """An id from a URL, and its catalog row; 404 for anything that is not an indexed image."""
    if not raw.isdigit() or len(raw) > 18:
        raise HTTPException(404, "no such image")
    record = service.record(int(raw))
    if record is None:
        raise HTTPException(404, "no such image")
    return int(raw), record


def _api_routes(app: FastAPI, service: SearchService, max_upload: int) -> None:
    from mmsearch.search.syntax import parse

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/search")
    def search(q: str = Query(..., description="Words, id:N, joined by + and -."),
               k: int = 50, offset: int = 0, f: Filters = Depends(filters)) -> dict[str, Any]:
        return {"query": q, **service.search(parse(q, is_file=lambda _: False), k, offset, f)}

    @app.get("/api/similar/{image_id}")
    def similar(image_id: str, k: int = 50, offset: int = 0,
                f: Filters = Depends(filters)) -> dict[str, Any]:
        number, _ = _image_id(image_id, service)
        return {"query": f"id:{number}", **service.search(SearchQuery.id(number), k, offset, f)}

    @app.post("/api/search/image")
    def search_image(file: UploadFile = File(...), k: int = 50, offset: int = 0,
                     f: Filters = Depends(filters)) -> dict[str, Any]:
        from mmsearch.ingest.decode import decode_bytes

        data = file.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"upload too big (at most {max_upload >> 20} MB)")
        image = decode_bytes(data)
        return {"query": f"image:{file.filename or 'upload'}",
                **service.search(SearchQuery.image(image), k, offset, f)}

    @app.get("/api/texts")
    def texts(image_id: str, k: int = 5) -> dict[str, Any]:
        number, _ = _image_id(image_id, service)
        return service.texts(number, k)


def _file_routes(app: FastAPI, service: SearchService) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/thumb/{image_id}")
    def thumb(image_id: str) -> FileResponse:
        _, record = _image_id(image_id, service)
        path = servable(record["path"], service.roots)
        if path is None:
            raise HTTPException(404, "no such image")
        try:
            cached = thumbnail(service.thumbs, path, record["content_hash"])
        except (DecodeError, OSError, UsageError):
            raise HTTPException(404, "this photo cannot be read any more") from None
        return FileResponse(cached, media_type="image/webp",
                            headers={"Cache-Control": "private, max-age=31536000, immutable"})

    @app.get("/original/{image_id}")
    def original(image_id: str) -> Response:
        _, record = _image_id(image_id, service)
        path = servable(record["path"], service.roots)
        if path is None:
            raise HTTPException(404, "no such image")
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(path, str):  # a URL: read through fsspec
            try:
                data = read_url(path)
            except (DecodeError, UsageError):
                raise HTTPException(404, "this photo cannot be read any more") from None
            kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return Response(data, media_type=kind, headers=headers)
        return FileResponse(path, headers=headers)
