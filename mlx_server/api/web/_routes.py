"""The blueprint behind the chat page (see the package docstring)."""

from __future__ import annotations

import functools
from importlib import resources

from quart import Blueprint, Response
from werkzeug.exceptions import NotFound

ASSET_PREFIX = "/ui/"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}

bp = Blueprint("web", __name__)


@functools.cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file: name -> (bytes, content type), read once from the package."""
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("mlx_server.api.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def asset_names() -> list[str]:
    return sorted(_assets())


def _serve(name: str) -> Response:
    found = _assets().get(name)
    if found is None:
        raise NotFound()  # the app's JSON 404
    body, content_type = found
    response = Response(body, status=200, content_type=content_type)
    h = response.headers
    h["Cache-Control"] = "no-cache"  # revalidate: a new server version serves a new page
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    if content_type.startswith("text/html"):
        h["Content-Security-Policy"] = CSP
        h["X-Frame-Options"] = "DENY"
    return response


@bp.get("/")
async def index() -> Response:
    return _serve("index.html")


@bp.get(f"{ASSET_PREFIX}<name>")
async def asset(name: str) -> Response:
    return _serve(name)
