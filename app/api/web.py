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

# The page loads only its own script and stylesheet and talks only to this service: nothing inline, from another
# host, or in a frame (X-Frame-Options, on every answer, app/origin_guard.py, says the same for older browsers).
DASHBOARD_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
                 "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": DASHBOARD_CSP})


def install_dashboard(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/static/`."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
