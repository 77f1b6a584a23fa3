"""The public service's front door: an ASGI middleware between BentoML's traffic layer and the API.

* at most ``max_concurrency`` API requests in progress; one more gets 429 with ``Retry-After``
  (BentoML's own ``traffic.max_concurrency`` answers 429 without it);
* request bodies over ``max_body_bytes`` get 413, refused from ``Content-Length`` before anything is
  read, or as soon as a chunked body crosses the limit: a body is never held beyond the limit;
* every 4xx body is ``{"error": "<one actionable sentence>"}``, the shape the OpenAPI document
  promises: BentoML answers pydantic errors with a list under ``detail`` and wraps other client
  errors in a one-element list;
* counts accepted and answered requests and logs them at shutdown, so a graceful stop can be
  checked: every request that got in was answered.

docs/errors.md lists every status this produces.
"""

from __future__ import annotations

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

# pydantic's names for the branches of a union ("int", "constrained-str", "list[...]"): not fields.
_UNION_TAGS = {"int", "str", "constrained-str", "float", "bool", "none", "dict", "list"}


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_paths: list[str],
        max_body_bytes: int,
        max_concurrency: int,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.api_paths = frozenset(api_paths)
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.retry_after_s = retry_after_s
        self.in_progress = 0
        self.accepted = 0  # got past the limits and reached the API
        self.answered = 0  # ... and their response went out complete
        self.refused = 0  # answered 429 / 413 here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._watch_lifespan(receive), send)
            return
        if scope["type"] != "http" or scope["path"] not in self.api_paths:
            await self.app(scope, receive, send)
            return
        if self.max_concurrency and self.in_progress >= self.max_concurrency:
            self.refused += 1
            await _json(
                send,
                429,
                f"too many requests in progress (limit {self.max_concurrency}, "
                f"RECBOLE_BENTO_MAX_CONCURRENCY): retry after {self.retry_after_s} s",
                headers=[(b"retry-after", str(self.retry_after_s).encode())],
            )
            return
        self.in_progress += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            self.accepted += 1
            if await self._call_app(scope, _replay(body, receive), send):
                self.answered += 1
        finally:
            self.in_progress -= 1

    # ---------------------------------------------------------------- body limit

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a 413/400 has been sent (or the client went away)."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _json(send, 400, f"Content-Length {declared!r} is not a byte count")
                self.refused += 1
                return None
            if limit and int(declared) > limit:
                await self._too_large(send, f"{int(declared)} bytes")
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit and size > limit:
                await self._too_large(send, f"more than {limit} bytes")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, size: str) -> None:
        self.refused += 1
        await _json(
            send,
            413,
            f"the request body is {size}; the limit is {self.max_body_bytes} bytes "
            "(RECBOLE_BENTO_MAX_BODY_BYTES): split it into several requests",
        )

    # ---------------------------------------------------------------- error bodies

    async def _call_app(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Run the API; rewrite 4xx bodies into one actionable message. True once answered."""
        held: Message | None = None
        parts: list[bytes] = []
        done = False

        async def _send(message: Message) -> None:
            nonlocal held, done
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                held = message  # hold the head until the body can be rewritten
                return
            if held is not None and message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _rewrite_error(b"".join(parts))
                headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                done = True
                return
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True

        await self.app(scope, receive, _send)
        return done

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


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # what follows the body: http.disconnect

    return _receive


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _json(send: Send, status: int, error: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
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
            record.msg = f"refused {method} {path}: {reason}"[:500]
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and int(exc.error_code) < 500


def quiet_client_errors() -> None:
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsAsWarnings())
