"""The admins' page, ``GET /admin``: static files from ``api/static`` (HTML, a script, a style sheet).

The page signs in with an admin's API key, kept in the tab's session storage and sent as the
``apikey`` header to the admin API (``api.admin``); it draws its charts as inline SVG. A strict
Content-Security-Policy lets it run only its own script and talk only to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import HordeError

router = APIRouter()

STATIC = Path(__file__).resolve().parent / "static"

_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_ASSETS = {"admin.js": "text/javascript", "admin.css": "text/css"}


@router.get("/admin", include_in_schema=False)
async def admin_page() -> FileResponse:
    return FileResponse(STATIC / "admin.html", media_type="text/html", headers=_PAGE_HEADERS)


@router.get("/admin/{asset}", include_in_schema=False)
async def admin_asset(asset: str) -> FileResponse:
    if asset not in _ASSETS:
        raise HordeError("No such file.", rc="NotFound", status=404)
    return FileResponse(STATIC / asset, media_type=_ASSETS[asset], headers=_PAGE_HEADERS)
