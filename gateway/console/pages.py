"""The console's single page and its static files (``gateway/console/static``), served as they are.

Everything the page runs is in this folder (plain ES modules, CSS, inline SVG): no CDN, nothing
fetched at run time. ``/console`` and every ``/console/...`` page path answer ``index.html``; the
page's router picks the view from the path. A Content-Security-Policy keeps the page to its own
origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
PAGE_HEADERS = {
    **HEADERS,
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "x-frame-options": "DENY",
}

router = APIRouter()


def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_TYPES[".html"], headers=PAGE_HEADERS)


@router.get("/console", include_in_schema=False)
async def console_root() -> FileResponse:
    return _index()


@router.get("/console/static/{path:path}", include_in_schema=False)
async def static_file(path: str, request: Request) -> FileResponse:
    file = (STATIC_DIR / path).resolve()
    if not file.is_relative_to(STATIC_DIR) or not file.is_file() or file.suffix not in _TYPES:
        raise HTTPException(404)
    return FileResponse(file, media_type=_TYPES[file.suffix], headers=HEADERS)


@router.get("/console/{path:path}", include_in_schema=False)
async def console_page(path: str) -> FileResponse:
    """Any page of the single-page app (``/console/models/tiny``...); not the API."""
    if path == "api" or path.startswith("api/"):
        raise HTTPException(404)
    return _index()
