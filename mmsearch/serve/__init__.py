"""``mmsearch serve``: the HTTP API and the search page, over one warm :class:`~mmsearch.Engine`.

``app``       the FastAPI application: routes, error -> status mapping
``service``   the engine behind a lock, hits as JSON with thumbnail/original URLs
``security``  Host check, token auth (cookie), files served by id under indexed roots only
``thumbs``    thumbnails cached beside the index, keyed by content hash and size
``upload``    a photo uploaded to search by, read into memory only (bounded as it arrives)
``static/``   the page: plain HTML, CSS and JS (no build step, no CDN)

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart).
"""
