"""The built-in web pages: the chat playground at `/` and the live metrics dashboard at `/dashboard`, plain
HTML/JS/CSS shipped inside the package under `static/` (no front-end build, nothing fetched at run time)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# The pages and their files; none sits behind the API key (the playground asks for it and sends it to /v1/*).
PAGES = {"/": "index.html", "/dashboard": "dashboard.html"}


def install_web_pages(app: FastAPI) -> None:
    """Serve `PAGES` as HTML and everything under `static/` at `/static/<name>`."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for path, filename in PAGES.items():
        app.add_api_route(path, _page(STATIC_DIR / filename), methods=["GET"], response_class=HTMLResponse,
                          name=filename.split(".")[0])


def _page(file: Path):
    async def page() -> FileResponse:
        return FileResponse(file, media_type="text/html")

    page.__doc__ = f"The built-in web page `{file.name}`."
    return page
