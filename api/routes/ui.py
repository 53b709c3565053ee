"""The web console: its static files at `/ui/`, and a browser asking for `/` (Accept: text/html) sent there. The
files are public (the page asks for a key itself); every API call the page makes goes through auth as usual."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.errors import ApiError
from contracts import ErrorCode

UI_PATH = "/ui"
STATIC_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"

router = APIRouter(tags=["console"], include_in_schema=False)


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    """Browsers land on the console; anything else asking for `/` gets the API's 404."""
    if "text/html" not in request.headers.get("accept", ""):
        raise ApiError(ErrorCode.NOT_FOUND, "no route GET /: the API lives under /v1 (docs at /docs)")
    return RedirectResponse(f"{UI_PATH}/", status_code=307)


@router.get(UI_PATH)
async def console_without_slash() -> RedirectResponse:
    return RedirectResponse(f"{UI_PATH}/", status_code=307)


# The page loads nothing but its own files and talks only to this API; no other site may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@router.get(f"{UI_PATH}/")
async def console() -> FileResponse:
    # no-cache: a redeployed API serves its new console on the next load, not a stale cached one
    return FileResponse(
        STATIC_DIR / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


def mount_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(UI_PATH, StaticFiles(directory=STATIC_DIR), name="console")
