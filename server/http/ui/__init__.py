"""The web page (/ui/): a console for an API key's collection and for trying images.

Static files only (index.html, app.js as a plain ES module, style.css): no build step, no external
assets. The page talks to the server through the public REST API alone, as any client would.

Mount with `routes + ui_routes()` in create_app.
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent
PREFIX = "/ui"


async def _ui_root(request: Request) -> Response:
    """/ui -> /ui/ (relative asset URLs need the slash); /ui/ itself may arrive here too.

    The Gate middleware drops trailing slashes (Spring matches `/x/` as `/x`), so `/ui/` reaches
    this route as `/ui`: the raw path, which it leaves alone, tells the two apart.
    """
    raw = request.scope.get("raw_path") or request.url.path.encode()
    if raw.split(b"?", 1)[0].endswith(b"/"):
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})
    target = request.scope.get("root_path", "") + PREFIX + "/"
    if request.url.query:
        target += "?" + request.url.query
    return RedirectResponse(target, status_code=307)


class _UiFiles(StaticFiles):
    """StaticFiles that never serves this package's Python sources."""

    async def get_response(self, path: str, scope) -> Response:  # type: ignore[override]
        if path.endswith((".py", ".pyc")) or "__pycache__" in path:
            from starlette.exceptions import HTTPException

            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        # Revalidate (ETag / Last-Modified) so an upgraded server's page is picked up at once.
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def ui_routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, _ui_root, methods=["GET", "HEAD"]),
        Mount(PREFIX, app=_UiFiles(directory=UI_DIR, html=True), name="ui"),
    ]
