"""Server-side sessions on the public service: ``SessionHistory`` records events and turns a request
that names a ``session_id`` into one that carries the stored history; ``SessionsApp`` answers
``GET`` and ``DELETE /sessions/{id}``. The store (``core/sessions.py``) is the only copy of a
history: every API worker reads and writes it directly, so no worker answers from a stale one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..core.planner import ExternalId
from ..core.sessions import SESSION_ID_PATTERN, Session, SessionStore, StoreUnavailable, check_session_id
from .guard import Receive, Scope, Send

R = TypeVar("R")
PREFIX = "/sessions/"


def _user(user_id: ExternalId | None) -> str | None:
    return None if user_id is None else str(user_id)


class SessionHistory:
    """A store and the window to keep: the largest ``max_history_length`` of the served models,
    asked at each append."""

    def __init__(self, store: SessionStore, window: Callable[[], int]) -> None:
        self.store = store
        self.window = window

    async def record(
        self, session_id: str, items: Sequence[ExternalId], user_id: ExternalId | None
    ) -> Session:
        """Append *items* to the session: the session as stored afterwards. StoreUnavailable: a 503.
        Of a long *items* only the last window's worth is sent: the rest would be trimmed anyway."""
        keep = self.window()
        return await self.store.append(session_id, [str(x) for x in items[-keep:]], _user(user_id), keep)

    async def resolve(self, requests: Sequence[R]) -> list[R]:
        """*requests* as the planner takes them: one with a ``session_id`` gets the stored history
        as its ``sequence``, after its own ``sequence`` is recorded (most recent last), and the stored
        user id unless it sends one. The others are returned as they are."""
        out = []
        for request in requests:
            session_id: str | None = getattr(request, "session_id", None)
            if session_id is None:
                out.append(request)
                continue
            sent, user_id = request.sequence, request.user_id  # type: ignore[attr-defined]
            if sent:
                session = await self.record(session_id, sent, user_id)
            else:
                session = await self.store.get(session_id) or Session()
            user = user_id if user_id is not None else session.user_id
            out.append(request.model_copy(update={"sequence": session.items, "user_id": user}))  # type: ignore[attr-defined]
        return out


class SessionsApp:
    """``GET /sessions/{id}`` (the stored history, 404 when there is none) and ``DELETE
    /sessions/{id}`` (forget it: a user's erasure request), mounted on the public service behind
    the request guard. Every refusal is ``{"error": ...}``. Answers 503 until the service instance
    registers its ``SessionHistory`` (``serve``)."""

    def __init__(self, max_id_bytes: int, retry_after_s: int) -> None:
        self.max_id_bytes = max_id_bytes
        self.retry_after_s = retry_after_s
        self.history: SessionHistory | None = None

    def serve(self, history: SessionHistory) -> None:
        self.history = history

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI path item of ``/sessions/{session_id}``, for the service's /docs.json."""
        id_schema: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": SESSION_ID_PATTERN}
        if self.max_id_bytes:
            id_schema["maxLength"] = self.max_id_bytes
        parameter = {"name": "session_id", "in": "path", "required": True, "schema": id_schema}
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}

        def answers(ok: str, ok_schema: dict[str, Any], refusals: dict[str, str]) -> dict[str, Any]:
            out = {"200": {"description": ok, "content": {"application/json": {"schema": ok_schema}}}}
            refusals = {"400": "not a session id", "503": "the session store is down", **refusals}
            out.update({status: {"description": why, "content": error} for status, why in refusals.items()})
            return out

        history = {
            "type": "object",
            "required": ["session_id", "items", "user_id", "length"],
            "properties": {
                "session_id": {"type": "string"},
                "items": {"type": "array", "items": {"type": "string"}, "description": "oldest first"},
                "user_id": {"type": "string", "nullable": True},
                "length": {"type": "integer"},
            },
        }
        deleted = {
            "type": "object",
            "required": ["session_id", "deleted"],
            "properties": {"session_id": {"type": "string"}, "deleted": {"type": "boolean"}},
        }
        return {
            PREFIX + "{session_id}": {
                "get": {
                    "summary": "The session's stored history (POST /events appends to it)",
                    "parameters": [parameter],
                    "responses": answers("the history", history, {"404": "no stored history"}),
                },
                "delete": {
                    "summary": "Forget the session (a user's erasure request)",
                    "parameters": [parameter],
                    "responses": answers("whether a history was stored", deleted, {}),
                },
            }
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, body, headers = await self._answer(scope["method"], scope["path"])
        raw = json.dumps(body).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *headers]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": raw})

    async def _answer(self, method: str, path: str) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        retry = [(b"retry-after", str(self.retry_after_s).encode())]
        if method not in ("GET", "DELETE"):
            error = f"{method} {path}: method not allowed, use GET or DELETE"
            return 405, {"error": error}, [(b"allow", b"GET, DELETE")]
        try:
            session_id = check_session_id(
                path.removeprefix(PREFIX) if path.startswith(PREFIX) else "", self.max_id_bytes
            )
        except ValueError as exc:
            return 400, {"error": f"{method} /sessions/{{session_id}}: {exc}"}, []
        if self.history is None:
            return 503, {"error": f"the service is starting: retry after {self.retry_after_s} s"}, retry
        store = self.history.store
        try:
            if method == "DELETE":
                return 200, {"session_id": session_id, "deleted": await store.delete(session_id)}, []
            session = await store.get(session_id)
        except StoreUnavailable as exc:
            return 503, {"error": f"{exc}: retry after {self.retry_after_s} s"}, retry
        if session is None:
            error = f"no stored history for session {session_id!r}: never sent, expired, evicted or deleted"
            return 404, {"error": error}, []
        body = {
            "session_id": session_id,
            "items": session.items,
            "user_id": session.user_id,
            "length": len(session.items),
        }
        return 200, body, []
