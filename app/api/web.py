"""The dashboard: `/` serves one static page (app/web/) that drives the public /v1 API from the browser.

No build step and no CDN: plain HTML, one script and one stylesheet, charts drawn as SVG by the script.
The page and its assets are public (API keys guard /v1 and /v2 only); the page sends the key the user
types, kept in the browser's sessionStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/static/`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
