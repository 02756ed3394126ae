"""The chat page at `/`: plain HTML, CSS and ES modules shipped inside the package (no CDN, no
build step), served from `static/` through `importlib.resources`.

The page is a client like any other: it lists models with `GET /v1/models` and streams answers
from `POST /v1/chat/completions`, sending the API key the user typed as a Bearer token. So the
page and its assets need no key (they hold no data; access control guards only `/v1/`), while
every call the page makes keeps the server's auth, limits and CORS exactly as they are.

Only the files in `static/` are served, looked up by exact name (no paths: nothing outside the
package can be named), with a Content-Security-Policy that lets the page run only its own
scripts and talk only to its own origin: model output is rendered as DOM text, never as HTML,
and the policy is the second wall behind that.
"""

from __future__ import annotations

from ._routes import ASSET_PREFIX, CSP, asset_names, bp

__all__ = ["ASSET_PREFIX", "CSP", "asset_names", "bp"]
