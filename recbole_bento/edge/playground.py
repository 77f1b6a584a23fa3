"""The playground: a page served by the service itself to try the served model in a browser.

``GET /playground`` is one HTML page, a script and a style sheet, shipped in this package
(``static/``): no build step, nothing fetched from elsewhere. The page calls the public API as any
client would (``/model_info``, ``/items``, ``/recommend``, ``/similar_items``), so it needs no
token and sees exactly the answers and refusals a client gets.

Every file is sent with a Content-Security-Policy that allows only this origin's script, style and
API (no inline script, no other origin, no framing) and ``X-Content-Type-Options: nosniff``; the
script writes every value it shows as text (``textContent``), never as HTML.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PATH = "/playground"
STATIC = Path(__file__).parent / "static"
# URL path -> (file in STATIC, media type)
FILES = {
    PATH: ("playground.html", "text/html; charset=utf-8"),
    f"{PATH}/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    f"{PATH}/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def app() -> Starlette:
    """The playground's routes, to mount at the service's root (their paths are absolute)."""
    routes = []
    for path, (name, media_type) in FILES.items():
        body = (STATIC / name).read_bytes()

        async def endpoint(_: Request, body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        routes.append(Route(path, endpoint, methods=["GET", "HEAD"]))
    return Starlette(routes=routes)
