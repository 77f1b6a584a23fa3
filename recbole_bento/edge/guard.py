"""The public service's front door: an ASGI middleware between BentoML's traffic layer and the API.

A POST to an API path goes through, in this order:

1. ``Content-Length`` over ``max_body_bytes``: 413 before anything is read;
2. the body is read whole, before the request takes a concurrency slot, so clients that send
   their body slowly cannot lock others out: it must arrive within ``body_timeout_s`` (else 408),
   a chunked body is cut as soon as it crosses ``max_body_bytes`` (413), and at most
   ``max_pending_bodies`` requests may still be waiting for the rest of their body at once (one
   more: 429 with ``Retry-After``). Memory held by unfinished bodies is bounded by
   ``max_pending_bodies * max_body_bytes``;
3. the body is JSON: no ``Content-Type`` or a JSON one (``application/json``, ``*/*+json``) is read
   as JSON; a body declared as anything else (``multipart/form-data``, ``text/plain``, ``curl -d``'s
   ``application/x-www-form-urlencoded``) is refused with 415 whatever it holds, in either layout
   (BentoML would parse form fields, and answers a ``multipart/form-data`` without a boundary with
   500);
4. at most ``max_concurrency`` requests in the API at once; one more gets 429 with ``Retry-After``
   (BentoML's own ``traffic.max_concurrency`` answers 429 without it).

Every 4xx body is ``{"error": "<one actionable sentence>"}``, the shape the OpenAPI document
promises: BentoML answers pydantic errors with a list under ``detail`` and wraps other client
errors in a one-element list; Starlette answers unknown paths (404) and methods (405) in plain
text. ``GET /docs`` redirects to BentoML's API page at ``/``, and ``/docs.json`` lists these
refusals (``amend_openapi``). Accepted and answered requests are counted and logged at shutdown,
so a graceful stop can be checked: every request that got in was answered.

docs/errors.md lists every status this produces.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger("recbole_bento")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Rewrite = Callable[[bytes], bytes]

# pydantic's names for the branches of a union ("int", "constrained-str", "list[...]"): not fields.
_UNION_TAGS = {"int", "str", "constrained-str", "float", "bool", "none", "dict", "list"}
# Sent with a refusal that leaves part of the body unread: the connection cannot carry another request.
_CLOSE: Headers = [(b"connection", b"close")]
DOCS_PATH = "/docs"  # the README's address of the API page; BentoML serves it at "/"
OPENAPI_PATH = "/docs.json"


class Refused(Exception):
    """A request refused at the door: the status, the sentence, and extra response headers."""

    def __init__(self, status: int, error: str, headers: Headers = ()) -> None:
        super().__init__(error)
        self.status, self.error, self.headers = status, error, list(headers)


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_paths: list[str],
        max_body_bytes: int,
        api_prefixes: tuple[str, ...] = (),
        openapi_paths: dict[str, Any] | None = None,
        max_concurrency: int,
        retry_after_s: int,
        body_timeout_s: int,
        max_pending_bodies: int,
    ) -> None:
        self.app = app
        self.api_paths = tuple(api_paths)
        # Paths under these answer other methods too (GET and DELETE /sessions/{id}), through the
        # same limits; what they answer is already {"error": ...} JSON.
        self.api_prefixes = api_prefixes
        self.openapi_paths = openapi_paths or {}  # documented here: BentoML lists only its own routes
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.retry_after_s = retry_after_s
        self.body_timeout_s = body_timeout_s
        self.max_pending_bodies = max_pending_bodies
        self.in_progress = 0  # requests in the API (their body is in)
        self.pending_bodies = 0  # requests still waiting for the rest of their body
        self.accepted = 0  # got past the limits and reached the API
        self.answered = 0  # ... and their response went out complete
        self.refused = 0  # answered 4xx here, at the door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._watch_lifespan(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == DOCS_PATH and scope["method"] in ("GET", "HEAD"):
            await _respond(send, 307, b"", [(b"location", b"/")])
            return
        post = scope["method"] == "POST"
        if not (scope["path"] in self.api_paths and post or scope["path"].startswith(self.api_prefixes)):
            await self._call_app(scope, receive, send, api=False)
            return
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client went away
            if post:
                scope = _as_json(scope)
            if self.max_concurrency and self.in_progress >= self.max_concurrency:
                raise Refused(
                    429,
                    f"too many requests in progress (limit {self.max_concurrency}, "
                    f"RECBOLE_BENTO_MAX_CONCURRENCY): retry after {self.retry_after_s} s",
                    self._retry_after(),
                )
        except Refused as refusal:
            self.refused += 1
            await _json(send, refusal.status, refusal.error, refusal.headers)
            return
        self.in_progress += 1
        self.accepted += 1
        try:
            if await self._call_app(scope, _replay(body, receive), send, api=True):
                self.answered += 1
        finally:
            self.in_progress -= 1

    def _retry_after(self) -> Headers:
        return [(b"retry-after", str(self.retry_after_s).encode())]

    # ---------------------------------------------------------------- the body, before a slot

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, None when the client went away; ``Refused`` past a limit."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refused(400, f"Content-Length {declared!r} is not a byte count", _CLOSE)
            if limit and int(declared) > limit:
                raise self._too_large(f"{int(declared)} bytes")
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s if self.body_timeout_s else None
        message = await self._next(receive, deadline)
        if message["type"] == "http.disconnect":
            return None
        if not message.get("more_body", False):
            return self._within_limit(message.get("body", b""), 0)
        if self.max_pending_bodies and self.pending_bodies >= self.max_pending_bodies:
            raise Refused(
                429,
                f"too many requests still sending their body (limit {self.max_pending_bodies}, "
                "RECBOLE_BENTO_MAX_PENDING_BODIES): send the whole body at once, or retry after "
                f"{self.retry_after_s} s",
                self._retry_after() + _CLOSE,
            )
        self.pending_bodies += 1
        try:
            chunks = [self._within_limit(message.get("body", b""), 0)]
            size = len(chunks[0])
            while message.get("more_body", False):
                message = await self._next(receive, deadline)
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(self._within_limit(message.get("body", b""), size))
                size += len(chunks[-1])
            return b"".join(chunks)
        finally:
            self.pending_bodies -= 1

    async def _next(self, receive: Receive, deadline: float | None) -> Message:
        if deadline is None:
            return await receive()
        try:
            return await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise Refused(
                408,
                f"the request body did not arrive within {self.body_timeout_s} s "
                "(RECBOLE_BENTO_BODY_TIMEOUT_S): send the whole body at once",
                _CLOSE,
            ) from None

    def _within_limit(self, chunk: bytes, before: int) -> bytes:
        if self.max_body_bytes and before + len(chunk) > self.max_body_bytes:
            raise self._too_large(f"more than {self.max_body_bytes} bytes")
        return chunk

    def _too_large(self, size: str) -> Refused:
        return Refused(
            413,
            f"the request body is {size}; the limit is {self.max_body_bytes} bytes "
            "(RECBOLE_BENTO_MAX_BODY_BYTES): split it into several requests",
            _CLOSE,
        )

    # ---------------------------------------------------------------- error bodies

    def _rewriter(self, scope: Scope, api: bool) -> Callable[[Message], Rewrite | None]:
        """Which answers of the app get a new JSON body, and how (None: passed through as is).

        On an API path BentoML's 4xx bodies become one sentence (``_rewrite_error``); elsewhere the
        router's plain-text 404 and 405 are replaced (the 405's ``Allow`` header is kept), and the
        OpenAPI document is amended (``amend_openapi``)."""

        def pick(head: Message) -> Rewrite | None:
            status = head["status"]
            if api:
                return _rewrite_error if 400 <= status < 500 else None
            if status in (404, 405):
                return lambda _body: json.dumps({"error": self._routing_error(scope, head)}).encode()
            if status == 200 and scope["path"] == OPENAPI_PATH:
                return lambda body: json.dumps(
                    amend_openapi(json.loads(body), self.api_paths, self.openapi_paths)
                ).encode()
            return None

        return pick

    async def _call_app(self, scope: Scope, receive: Receive, send: Send, *, api: bool) -> bool:
        """Run the app, rewriting the answers ``_rewriter`` picks. True once answered."""
        pick = self._rewriter(scope, api)
        held: Message | None = None
        rewrite: Rewrite | None = None
        parts: list[bytes] = []
        done = False

        async def _send(message: Message) -> None:
            nonlocal held, rewrite, done
            if message["type"] == "http.response.start":
                rewrite = pick(message)
                if rewrite is not None:
                    held = message  # hold the head until the body can be rewritten
                    return
            if held is not None and rewrite is not None and message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = rewrite(b"".join(parts))
                headers = [
                    (k, v)
                    for k, v in held.get("headers", [])
                    if k.lower() not in (b"content-length", b"content-type")
                ]
                await _respond(send, held["status"], body, [(b"content-type", b"application/json"), *headers])
                done = True
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True

        await self.app(scope, receive, _send)
        return done

    def _routing_error(self, scope: Scope, head: Message) -> str:
        where = f"{scope['method']} {scope['path']}"
        if head["status"] == 405:
            allowed = _header(head, b"allow") or "POST"
            return f"{where}: method not allowed, use {allowed}"
        api = ", ".join(f"POST {path}" for path in self.api_paths)
        return f"{where}: no such endpoint; the API is {api}, documented at {DOCS_PATH}"

    # ---------------------------------------------------------------- shutdown report

    def _watch_lifespan(self, receive: Receive) -> Receive:
        async def _receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                logger.info(
                    "shutdown: answered %d of %d accepted requests (%d refused at the door, %d in progress)",
                    self.answered,
                    self.accepted,
                    self.refused,
                    self.in_progress,
                )
            return message

        return _receive


# The refusals of the front door, documented on every API operation of /docs.json.
REFUSALS = {
    "408": "the body did not arrive within RECBOLE_BENTO_BODY_TIMEOUT_S",
    "413": "the body is larger than RECBOLE_BENTO_MAX_BODY_BYTES",
    "415": "the body is declared as something other than JSON",
    "429": "too many requests in progress, or still sending their body: see Retry-After",
}


def amend_openapi(
    doc: dict[str, Any], api_paths: tuple[str, ...], extra_paths: dict[str, Any] | None = None
) -> dict[str, Any]:
    """BentoML's OpenAPI document, made true to what the service answers: an API operation's body
    is required (the service refuses a request without one), the front door's refusals are
    listed with the error body every 4xx has, and the routes BentoML does not know of (a mounted
    app's, *extra_paths*: path -> OpenAPI path item) are added."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}
    doc.setdefault("paths", {}).update(extra_paths or {})
    for path in api_paths:
        for operation in doc.get("paths", {}).get(path, {}).values():
            if "requestBody" in operation:
                operation["requestBody"]["required"] = True
            responses = operation.setdefault("responses", {})
            for status, description in REFUSALS.items():
                responses.setdefault(status, {"description": description, "content": error})
    return doc


def _as_json(scope: Scope) -> Scope:
    """*scope* with ``Content-Type: application/json``, which BentoML and the fast path read with
    their JSON parser; ``Refused`` (415) for a body declared as anything but JSON, whatever it holds.
    Decided here, before either layout's code sees the request, so both answer alike."""
    declared = _header(scope, b"content-type")
    media_type = (declared or "").split(";")[0].strip().lower()
    if media_type == "application/json":
        return scope
    if media_type and not media_type.endswith("+json"):
        raise Refused(
            415,
            f"the body is sent as {declared}: this API reads JSON, "
            "send it with Content-Type: application/json",
        )
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # what follows the body: http.disconnect

    return _receive


def _header(scope: Scope | Message, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _json(send: Send, status: int, error: str, headers: Headers = ()) -> None:
    body = json.dumps({"error": error}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), *headers])


async def _respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _rewrite_error(raw: bytes) -> bytes:
    """BentoML's 4xx bodies -> {"error": "..."}; anything unexpected is passed through."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML 1.4 wraps InvalidArgument bodies in a list
    if not isinstance(data, dict) or "error" not in data:
        return raw
    detail = data.get("detail")
    if isinstance(detail, list) and detail:
        error = "invalid request: " + describe_validation_errors(detail)
    else:
        error = str(data["error"])
    return json.dumps({"error": error}).encode()


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic's error list -> "sequence[0]: Input should be a valid integer or ...; topk: ..."."""
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = [part for part in err.get("loc", []) if not _is_union_tag(part)]
        where = (
            "body"
            if not loc
            else str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
        )
        message = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({message.removeprefix('Invalid JSON: ')})"
        messages = by_field.setdefault(where, [])
        if message not in messages:
            messages.append(message)
    return "; ".join(f"{where}: {' or '.join(messages)}" for where, messages in by_field.items())


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


class _ClientErrorsAsWarnings(logging.Filter):
    """BentoML logs each refused request at ERROR with a full traceback: hostile traffic would fill
    the log with stack traces. A client error (pydantic validation, a BentoML 4xx) becomes one
    WARNING line; server errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
        if exc is not None and _is_client_error(exc):
            errors = getattr(exc, "errors", None)
            reason = (
                describe_validation_errors(errors(include_input=False))
                if callable(errors)
                else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            )
            path, method = (record.args + ("?", "?"))[:2] if isinstance(record.args, tuple) else ("?", "?")
            record.msg = refusal_line(method, path, reason)
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def refusal_line(method: str, path: str, reason: str) -> str:
    """The one log line of a request refused as invalid, wherever it was refused."""
    return f"refused {method} {path}: {reason}"[:500]


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and int(exc.error_code) < 500


def quiet_client_errors() -> None:
    """On the handlers of BentoML's ``bentoml`` logger, which every BentoML module logs through (a
    handler's filter sees its children's records too; a logger's sees only its own). First in line,
    so that BentoML's own filter on the handler renders the new level."""
    quiet = _ClientErrorsAsWarnings()
    for handler in logging.getLogger("bentoml").handlers:
        if not any(isinstance(f, _ClientErrorsAsWarnings) for f in handler.filters):
            handler.filters.insert(0, quiet)
