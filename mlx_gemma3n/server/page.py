"""The chat page: static files in server/ui/ (package data, no build step, nothing fetched from
elsewhere), served at `/` and `/ui/*` unless the server runs with --no-ui."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

UI_FOLDER = Path(__file__).resolve().parent / "ui"


async def index(request: Request) -> FileResponse:
    return FileResponse(UI_FOLDER / "index.html", media_type="text/html; charset=utf-8")


def page_routes() -> list:
    return [Route("/", index, methods=["GET"]), Mount("/ui", StaticFiles(directory=UI_FOLDER), name="ui")]
