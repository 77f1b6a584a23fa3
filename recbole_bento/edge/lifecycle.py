"""A bounded, lossless stop of `bentoml serve` on SIGTERM / SIGINT.

What BentoML 1.4 does on its own: the arbiter (the `bentoml serve` process) forwards SIGTERM to every
worker at once, and each worker's uvicorn stops accepting and then waits, without any limit, for the
requests it holds. So (1) the ranking worker stops while the public worker still has accepted requests
that need it, and those are answered 500; (2) nothing bounds how long the stop takes (`bentoml serve`
has no graceful-timeout option; circus waits a day before SIGKILL).

``install`` wraps uvicorn's signal handlers in a worker:

* every worker gets a deadline: ``grace_s`` after the first signal it exits (status 1) whatever it is
  still doing, and logs that it did;
* a worker other services call (the ranker) keeps serving after the signal until no calling worker
  is left, then lets uvicorn stop;
* the public worker first drains for ``drain_s``: it keeps answering, but ``/readyz`` says 503
  (``draining()``) and every response carries ``Connection: close`` (``DrainMiddleware``), so load
  balancers take it out and keep-alive clients open their next connection elsewhere instead of
  sending on a socket that is about to close (a reset). Then uvicorn stops accepting, finishes
  what it holds and exits. The sequence with Kubernetes: docs/operations.md.

The coupling to BentoML's and uvicorn's internals, in one list: uvicorn's handler is recognised by
its owner's module (``uvicorn.*``) and called as ``handler(sig, frame)``; sibling workers of the
same ``bentoml serve`` are recognised by the module and ``--service-name`` flag on their command
line (``bentoml_compat.WORKER_MODULE``, checked at start-up). ``install`` logs a warning when it
finds no handler to wrap.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .. import bentoml_compat

logger = logging.getLogger("recbole_bento")

_WORKER_MODULE = bentoml_compat.WORKER_MODULE  # checked at start-up


_draining = threading.Event()


def draining() -> bool:
    """True from the stop signal on: readiness fails first."""
    return _draining.is_set()


def install(service_name: str, grace_s: int, *, outlive_callers: bool, drain_s: float = 0) -> bool:
    """Wrap the running uvicorn's SIGTERM/SIGINT handlers; False (and a warning) where there are
    none to wrap: the worker then stops as uvicorn alone does, without drain or deadline."""
    reason = None
    if threading.current_thread() is not threading.main_thread():
        reason = "not on the main thread"  # signal handlers can only be set from there
    else:
        state = _State(service_name, grace_s, outlive_callers, drain_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if _is_server_handler(previous):
                signal.signal(sig, state.handler(previous))
            else:
                reason = f"the {signal.Signals(sig).name} handler is {previous!r}, not uvicorn's"
    if reason is not None:
        logger.warning(
            "%s: graceful stop not installed (%s): a stop signal ends it without drain or deadline",
            service_name,
            reason,
        )
    return reason is None


def _is_server_handler(handler: Any) -> bool:
    """uvicorn's own handler (or ours around it): never wrap a test runner's or a REPL's."""
    if not callable(handler):
        return False
    owner = getattr(handler, "__self__", None)
    if owner is not None and type(owner).__module__.startswith("uvicorn"):
        return True
    return getattr(handler, "__wrapped_server_handler__", False)


class _State:
    def __init__(self, service_name: str, grace_s: int, outlive_callers: bool, drain_s: float) -> None:
        self.service_name = service_name
        self.grace_s = grace_s
        self.outlive_callers = outlive_callers
        self.drain_s = drain_s
        self.signalled = False
        self.forwarded = False

    def handler(self, previous: Callable[[int, FrameType | None], Any]) -> Callable[..., None]:
        def _handle(sig: int, frame: FrameType | None) -> None:
            if not self.signalled:
                self.signalled = True
                _draining.set()
                logger.info(
                    "%s: %s: %sfinishing accepted requests, exiting within %s",
                    self.service_name,
                    signal.Signals(sig).name,
                    f"draining for {self.drain_s:g} s (readyz 503, Connection: close), then "
                    if self.drain_s
                    else "",
                    f"{self.grace_s} s" if self.grace_s else "no limit (RECBOLE_BENTO_SHUTDOWN_GRACE_S=0)",
                )
                if self.grace_s:
                    threading.Thread(target=self._deadline, daemon=True, name="shutdown-deadline").start()
                if self.outlive_callers or self.drain_s:
                    threading.Thread(
                        target=self._stop_later, args=(previous, sig), daemon=True, name="drain"
                    ).start()
                    return
                self.forwarded = True
            if self.forwarded:
                previous(sig, frame)

        _handle.__wrapped_server_handler__ = True  # type: ignore[attr-defined]
        return _handle

    def _stop_later(self, previous: Callable[[int, FrameType | None], Any], sig: int) -> None:
        time.sleep(self.drain_s)
        if self.outlive_callers:
            while callers(self.service_name):
                time.sleep(0.1)
            logger.info("%s: no calling service left, stopping", self.service_name)
        self.forwarded = True
        previous(sig, None)  # uvicorn's handler only sets a flag its main loop polls

    def _deadline(self) -> None:
        time.sleep(self.grace_s)
        logger.error(
            "%s: still busy %d s after the stop signal (RECBOLE_BENTO_SHUTDOWN_GRACE_S): exiting now",
            self.service_name,
            self.grace_s,
        )
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        os._exit(1)


def callers(service_name: str) -> list[int]:
    """PIDs of the live sibling workers (same `bentoml serve` arbiter) that serve another service."""
    return [pid for pid, name in siblings() if name != service_name]


def siblings() -> list[tuple[int, str]]:
    """(pid, service name) of the live sibling workers of this one, this one left out."""
    import psutil

    try:
        me = psutil.Process()
        parent = me.parent()
        children = parent.children() if parent is not None else []
    except psutil.Error:
        return []
    out = []
    for proc in children:
        try:
            if proc.pid == me.pid or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if _WORKER_MODULE in cmd and "--service-name" in cmd:
            at = cmd.index("--service-name") + 1
            out.append((proc.pid, cmd[at] if at < len(cmd) else ""))
    return out


class DrainMiddleware:
    """ASGI: once the stop signal came (``draining()``), every HTTP response says ``Connection:
    close``, so a keep-alive client sends its next request on a new connection, never on this one
    while it closes."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http" or not _draining.is_set():
            await self.app(scope, receive, send)
            return

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, _send)
