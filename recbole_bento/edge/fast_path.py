"""The JSON endpoints answered in an ASGI middleware, the innermost of the public service's.

BentoML's per-request API dispatch (input spec, IO descriptors, serde, the service context, the
response wrapper) costs more CPU than a small model's ranking (docs/benchmarks.md). ``FastPath``
answers ``POST`` to each path in its ``Routes`` itself, with what that dispatch would do:

* the body is validated by ``model_validate_json`` on the endpoint's request model, the
  ``input_spec`` of its ``@bentoml.api`` method, as BentoML's JSON serde does (an empty body is
  ``{}``);
* the ``RequestPath`` method that the ``@bentoml.api`` method calls answers it;
* refusals are the 400 the guard would make of BentoML's (``{"error": ...}``, the same sentence)
  with the one WARNING line BentoML's logged refusal becomes; an unexpected exception is BentoML's
  500 and logged with its traceback;
* the response carries BentoML's ``Server`` header.

Everything else (other paths and methods, a non-JSON body) goes on to BentoML, whose
``@bentoml.api`` declarations stay: they publish the OpenAPI document and serve
``bentoml.SyncHTTPClient`` the same answers. The middlewares outside this one (BentoML's metrics,
tracing, timeout; the project's drain, refusal metrics and guard) see every request as before.
Requests take BentoML's dispatch instead while ``Routes.path`` is unset: before the service
instance registers its request path, and always with ``RECBOLE_BENTO_FAST_PATH=0`` or tracing on
(BentoML's response then carries the span's ``X-BentoML-Request-ID``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from ..core.planner import RequestError
from .guard import ASGIApp, Receive, Scope, Send, describe_validation_errors, refusal_line
from .request_path import RequestPath, error_response

logger = logging.getLogger("recbole_bento")

# BentoML's answer to an exception it did not expect (its endpoint wrapper's 500).
UNEXPECTED = "An unexpected error has occurred, please check the server log."


@dataclass(frozen=True)
class Endpoint:
    """One JSON endpoint: its body's model and the ``RequestPath`` method that answers it."""

    request: type[BaseModel]
    answer: Callable[[RequestPath, Any], Awaitable[Response]]


class Routes:
    """The fast path's endpoints by URL path, and the request path that answers them, registered
    by the service instance once it is built (``serve``)."""

    def __init__(self, endpoints: Mapping[str, Endpoint]) -> None:
        self.endpoints = dict(endpoints)
        self.path: RequestPath | None = None

    def serve(self, path: RequestPath | None) -> None:
        """Answer the endpoints with *path* from now on; None: leave them to BentoML."""
        self.path = path


class FastPath:
    def __init__(self, app: ASGIApp, *, routes: Routes, service_name: str) -> None:
        self.app = app
        self.routes = routes
        self.server = f"BentoML Service/{service_name}"  # BentoML's Server header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self.routes.path
        endpoint = self.routes.endpoints.get(scope.get("path", ""))
        if (
            path is None
            or endpoint is None
            or scope["type"] != "http"
            or scope["method"] != "POST"
            or not _is_json(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = await _body(receive)
        if body is None:
            return  # the client went away
        response = await self._answer(scope, endpoint, path, body)
        response.headers["server"] = self.server
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, endpoint: Endpoint, path: RequestPath, body: bytes) -> Response:
        try:
            request = endpoint.request.model_validate_json(body or b"{}")
            return await endpoint.answer(path, request)
        except ValidationError as exc:
            reason = describe_validation_errors(exc.errors(include_context=False, include_input=False))
            error = "invalid request: " + reason
        except RequestError as exc:
            reason = error = str(exc)
        except Exception:
            logger.exception("Exception on %s [%s]", scope["path"], scope["method"])
            return JSONResponse({"error": UNEXPECTED}, status_code=500)
        logger.warning(refusal_line(scope["method"], scope["path"], reason))
        return error_response(400, error)


def _is_json(scope: Scope) -> bool:
    """BentoML reads a body without Content-Type as JSON too (the guard sets it on every API call)."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return True


async def _body(receive: Receive) -> bytes | None:
    """The whole body (the guard has read it already and replays it as one message)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
