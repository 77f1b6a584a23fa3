"""Several models behind one server, changed while it serves: the edge side of ``core/routes.py``.

Every worker process of ``bentoml serve`` holds its own registry (``core.routes.Registry``), so a
change of routes has to reach all of them. The way it travels:

1. ``POST /admin/routes`` lands on one API worker (``AdminApp``). Under a lock file it loads the new
   routes itself (``Host.propose``: store sha256 check, one warm-up call, the memory budget), swaps
   its own registry, and only then writes them with the next generation number to the server's
   state file (``StateFile``, an atomic rename). A load that fails answers the error and writes
   nothing: every worker keeps the routes it has.
2. SIGHUP to ``bentoml serve`` (the arbiter): it re-reads ``RECBOLE_BENTO_ROUTES``, checks it and
   writes it to the same state file (``loading.reread``, through ``bentoml_compat.on_hangup``).
3. Every worker polls the state file (``Host.watch``: one ``stat`` each ``POLL_S``) and applies a
   newer generation the same way, in a thread, while its event loop keeps serving. Each writes an
   acknowledgement (generation, result) next to the state file; the admin call waits for every
   sibling worker's before it answers, so its 200 means the whole server serves the new routes.

A request takes the registry's snapshot once, on arrival, and finishes on it: swapped models stay
alive until the last request holding them is answered, then their memory is returned
(``Host._release``). The state file sits in a folder of the arbiter's own (``run_dir``).

The shadow model (``Shadow``) ranks a request after its answer was sent, a bounded number at a
time: when it falls behind, requests are not shadowed (counted), never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import hmac
import json
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..core import routes as routing
from ..core.planner import RequestError
from ..core.ranking import RankQuery, RankResult
from . import observability
from .batcher import Batcher
from .guard import Receive, Scope, Send

logger = logging.getLogger("recbole_bento")

POLL_S = 0.5  # how often a worker looks at the state file
ACK_WAIT_S = 120.0  # an admin call waits this long for every worker to apply the new routes
CYCLES_AFTER_S = 5.0  # a swapped-out model still alive this long: look for reference cycles
GIVE_UP_S = 120.0  # ... and stop watching it after this long (requests time out long before)
SHADOW_IN_FLIGHT = 4  # shadow calls at once per worker; beyond that a request is not shadowed


@dataclass(frozen=True)
class Ranked:
    """What ranks for one loaded model in this process: the port (``request_path.ModelPort``),
    its batcher, and the object whose release frees the model's memory (the engine in process)."""

    port: Any
    batched: Batcher[RankQuery, RankResult]
    holds: object | None = None


Snapshot = routing.Snapshot[Ranked]


# ------------------------------------------------------------------------------------ shared state


def run_dir(arbiter_pid: int) -> Path:
    """The folder of one ``bentoml serve`` (its arbiter's pid): state file, lock, acknowledgements."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    return home / "run" / f"recbole-bento-{arbiter_pid}"


class StateFile:
    """``routes.json``: ``{"generation": N, "routes": {...}}``, replaced whole by rename. Read as
    untrusted input (size cap, the routes parser), like any file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "routes.json"
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the last read

    def changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_size) != self._seen

    def read(self) -> tuple[int, routing.Routes] | None:
        """(generation, routes), or None when there is no state file yet; RoutesError if damaged."""
        try:
            st = self.path.stat()
            data = self.path.read_bytes()[: routing.MAX_ROUTES_BYTES + 1]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise routing.RoutesError(f"{self.path}: {exc.strerror or exc}") from None
        self._seen = (st.st_mtime_ns, st.st_size)
        if len(data) > routing.MAX_ROUTES_BYTES:
            raise routing.RoutesError(f"{self.path}: larger than {routing.MAX_ROUTES_BYTES} bytes")
        try:
            state = json.loads(data)
        except ValueError:
            raise routing.RoutesError(f"{self.path}: not JSON") from None
        generation = state.get("generation") if isinstance(state, dict) else None
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise routing.RoutesError(f"{self.path}: no generation number")
        return generation, routing.from_mapping(state.get("routes"), str(self.path))

    def read_or_none(self) -> tuple[int, routing.Routes] | None:
        """``read``, with a damaged state file logged and taken as none."""
        try:
            return self.read()
        except routing.RoutesError as exc:
            logger.warning("routes state ignored: %s", exc)
            return None

    def clear(self) -> None:
        """Remove the state and acknowledgements (a new server whose pid an earlier one had)."""
        for path in (self.path, *self.folder.glob("ack-*.json")):
            with contextlib.suppress(OSError):
                path.unlink()

    def write(self, generation: int, routes: routing.Routes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.folder / f".routes.{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"generation": generation, "routes": routes.as_dict()}))
        os.replace(temporary, self.path)

    def lock(self) -> IO[str]:
        """One change of routes at a time across the server's processes: blocks until this process
        holds the lock; closing the returned file releases it."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = open(self.folder / "lock", "a")  # held across awaits, closed by the caller
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def acknowledge(self, generation: int, result: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self.folder / f".ack.{os.getpid()}.tmp"
        temporary.write_text(json.dumps({"generation": generation, "result": result}))
        os.replace(temporary, self.folder / f"ack-{os.getpid()}.json")

    def acknowledged(self, pid: int) -> tuple[int, str] | None:
        try:
            ack = json.loads((self.folder / f"ack-{pid}.json").read_bytes()[:4096])
            return int(ack["generation"]), str(ack["result"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


# ------------------------------------------------------------------------------------ the host


class WorkersBehind(Exception):
    """New routes this worker serves and published, that some other worker failed to apply."""

    def __init__(self, generation: int, behind: dict[int, str]) -> None:
        described = "; ".join(f"worker {pid}: {result}" for pid, result in sorted(behind.items()))
        super().__init__(
            f"routes generation {generation} is served by this worker but not by every other one "
            f"({described}): post the previous routes to roll back, or retry"
        )
        self.generation, self.behind = generation, behind


def swap_line(
    before: routing.Snapshot[Any] | None, after: routing.Routes, seconds: float, result: str
) -> str:
    """The one log line of a swap: from, to, load seconds, result."""

    def describe(routes: routing.Routes | None) -> str:
        if routes is None:
            return "-"
        shown = ",".join(f"{v.name}={v.model}@{v.weight:g}" for v in routes.variants)
        return shown + (f" shadow={routes.shadow}" if routes.shadow else "")

    old = before.routes if before is not None else None
    return f"routes swap: from {describe(old)} to {describe(after)}: {seconds:.2f} s, {result}"


class Host:
    """This process's variants: the registry, how a model is loaded here, and the state file."""

    def __init__(
        self,
        registry: routing.Registry[Ranked],
        build: Callable[[routing.Routes, int, Snapshot | None], Snapshot],
        state: StateFile | None,
        siblings: Callable[[], list[int]] = list,
        warm: Callable[[routing.Loaded[Ranked]], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self._build = build  # (routes, generation, previous) -> snapshot; SwapError
        self._warm = warm  # an asynchronous warm-up call per new model (split: through the Ranker)
        self.state = state
        self._siblings = siblings  # pids of the other worker processes of this server
        self._swapping = asyncio.Lock()
        self._retired: list[weakref.ref[object]] = []  # the models swapped out, until released
        self._retired_at = 0.0
        self._swept = False
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll the state file from now on (on the running event loop); idempotent."""
        if self._watcher is None and self.state is not None:
            self._watcher = asyncio.get_running_loop().create_task(self.watch())

    async def apply(self, routes: routing.Routes, generation: int) -> Snapshot:
        """Load (in a thread) and serve *routes*; SwapError changes nothing."""
        async with self._swapping:
            before = self.registry.current
            start = time.perf_counter()
            try:
                snapshot = await asyncio.to_thread(self._build, routes, generation, before)
                await self._warm_new(before, snapshot)
            except routing.SwapError as exc:
                logger.warning(swap_line(before, routes, time.perf_counter() - start, f"failed: {exc}"))
                raise
            self.registry.publish(snapshot)
            self._retire(before, snapshot)
            logger.info(
                swap_line(before, routes, time.perf_counter() - start, f"ok, generation {generation}")
            )
            return snapshot

    async def propose(self, routes: routing.Routes) -> Snapshot:
        """The admin call: load here first; on success publish to every worker and wait for them."""
        if self.state is None:
            return await self.apply(routes, self.registry.current.generation + 1)
        with await asyncio.to_thread(self.state.lock):
            on_file = await asyncio.to_thread(self.state.read_or_none)
            generation = max(self.registry.current.generation, on_file[0] if on_file else 0) + 1
            snapshot = await self.apply(routes, generation)
            self.state.write(generation, routes)
            self.state.acknowledge(generation, "ok")
        results = await self.wait_for_workers(generation)
        behind = {pid: result for pid, result in results.items() if result != "ok"}
        if behind:
            raise WorkersBehind(generation, behind)
        return snapshot

    async def wait_for_workers(self, generation: int, timeout_s: float = ACK_WAIT_S) -> dict[int, str]:
        """Each sibling worker's result for *generation*, once all answered; after *timeout_s* the
        silent ones are "no answer"."""
        assert self.state is not None
        deadline = time.monotonic() + timeout_s
        while True:
            results: dict[int, str] = {}
            siblings = self._siblings()
            for pid in siblings:
                ack = self.state.acknowledged(pid)
                if ack is not None and ack[0] >= generation:
                    results[pid] = ack[1]
            if len(results) == len(siblings):
                return results
            if time.monotonic() > deadline:
                return {pid: results.get(pid, f"no answer within {timeout_s:g} s") for pid in siblings}
            await asyncio.sleep(0.05)

    async def watch(self) -> None:
        """Apply each newer generation of the state file; log and keep serving on any failure."""
        assert self.state is not None
        while True:
            await asyncio.sleep(POLL_S)
            self._release()
            if not self.state.changed():
                continue
            try:
                found = self.state.read()
            except routing.RoutesError as exc:
                logger.warning("routes state ignored: %s", exc)
                continue
            if found is None or found[0] <= self.registry.current.generation:
                continue
            generation, routes = found
            try:
                await self.apply(routes, generation)
                result = "ok"
            except routing.SwapError as exc:
                result = f"failed: {exc}"
            except Exception as exc:  # a worker must outlive any bad routes
                logger.exception("routes swap to generation %d failed", generation)
                result = f"failed: {type(exc).__name__}: {exc}"
            self.state.acknowledge(generation, result)

    async def _warm_new(self, before: Snapshot, after: Snapshot) -> None:
        if self._warm is None:
            return
        for tag, loaded in after.models.items():
            if tag in before.models:
                continue
            try:
                await self._warm(loaded)
            except Exception as exc:  # the model worker could not load or rank it
                raise routing.SwapError(tag, f"the warm-up call failed: {exc}") from None

    def _retire(self, before: Snapshot, after: Snapshot) -> None:
        kept = {id(m.model) for m in after.models.values()}
        for loaded in before.models.values():
            if id(loaded.model) not in kept:
                target = loaded.model.holds if loaded.model.holds is not None else loaded.model
                self._retired.append(weakref.ref(target))
        self._retired_at, self._swept = time.monotonic(), False

    def _release(self) -> None:
        """Once no request holds a swapped-out model any more, return its memory to the system.
        References are checked each poll; a model still alive after ``CYCLES_AFTER_S`` may sit in a
        reference cycle that ``gc.freeze`` (start-up) hid from the collector: one collection over
        the frozen objects too. After ``GIVE_UP_S`` it is left to the collector and logged."""
        if not self._retired:
            return
        waited = time.monotonic() - self._retired_at
        if any(ref() is not None for ref in self._retired) and waited > CYCLES_AFTER_S and not self._swept:
            self._swept = True
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        alive = sum(ref() is not None for ref in self._retired)
        if alive and waited < GIVE_UP_S:
            return  # still answering requests admitted before the swap
        self._retired.clear()
        release_memory()
        if alive:
            logger.warning("routes swap: %d previous model(s) still referenced after %.0f s", alive, waited)
        else:
            logger.info("routes swap: the previous models' memory is released")


def release_memory() -> None:
    """Hand freed memory back: glibc keeps freed heap for reuse, torch's CUDA allocator its blocks."""
    import torch

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Hosted:
    """This worker's ``Host``, once the service instance has built it: the middlewares and the
    admin app are declared at import, before."""

    def __init__(self) -> None:
        self.host: Host | None = None

    def serve(self, host: Host) -> None:
        self.host = host

    def get(self) -> Host | None:
        return self.host

    def start(self) -> None:
        if self.host is not None:
            self.host.start()

    def refusal_labels(self) -> tuple[str, str]:
        """(model_tag, variant) of a refused request: the one variant's, else unattributed."""
        if self.host is None:
            return "", ""
        served = list(self.host.registry.current.variants.values())
        return (served[0].tag, served[0].name) if len(served) == 1 else ("", "")


# ------------------------------------------------------------------------------------ shadow


class Shadow:
    """Scores served requests with the shadow model, after their answer; at most *in_flight* at
    once, the rest dropped (``recbole_bento_shadow_dropped_total``)."""

    def __init__(self, in_flight: int = SHADOW_IN_FLIGHT) -> None:
        self.in_flight = in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(
        self, snapshot: Snapshot, plan: Callable[[Any], Any], requests: Sequence[Any], served: list[Any]
    ) -> None:
        """Shadow *requests* (answered with *served*) if the snapshot has a shadow and a slot is free;
        returns at once (a coroutine: Starlette runs a response's background on the event loop).
        *plan*: (planner, request) -> Plan, the endpoint's planning."""
        shadow = snapshot.shadow
        if shadow is None:
            return
        if len(self._tasks) >= self.in_flight:
            observability.shadow_dropped(shadow.tag, len(requests))
            return
        task = asyncio.get_running_loop().create_task(self._score(shadow, plan, requests, served))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(
        self,
        shadow: routing.Loaded[Ranked],
        plan: Callable[..., Any],
        requests: Sequence[Any],
        served: list[Any],
    ) -> None:
        try:
            plans = []
            for request, answer in zip(requests, served, strict=True):
                try:
                    plans.append((plan(shadow.planner, request), answer))
                except RequestError:
                    continue  # a request the shadow model cannot answer (a user id it needs ...)
            rankable = [(p, a) for p, a in plans if p.rankable]
            if not rankable:
                return
            for p, _ in rankable:
                p.query.model = shadow.tag
            results = await asyncio.gather(*(shadow.model.batched(p.query) for p, _ in rankable))
            for (_, answer), result in zip(rankable, results, strict=True):
                items = {shadow.planner.item_tokens[i] for i in result.items}
                wanted = answer.item_list
                overlap = len(items.intersection(wanted)) / len(wanted) if wanted else 1.0
                observability.shadow_overlap(shadow.tag, answer.variant, overlap)
        except Exception as exc:  # the shadow must never disturb serving
            logger.warning("shadow scoring with %s failed: %s", shadow.tag, exc)


# ------------------------------------------------------------------------------------ admin


class AdminApp:
    """``/admin/routes`` (mounted only with ``RECBOLE_BENTO_ADMIN_TOKEN``): GET the routes in force,
    POST new ones. ``Authorization: Bearer <token>``, compared in constant time; 401 otherwise."""

    def __init__(self, host: Callable[[], Host | None], token: str) -> None:
        self._host = host
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, body = await self._answer(scope, receive)
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 405:
            headers.append((b"allow", b"GET, POST"))
        raw = json.dumps(body).encode()
        headers.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    def authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", []):
            if key.lower() == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)
        return False

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        path = scope.get("path", "")
        if not path.endswith("/routes"):
            return 404, {
                "error": f"{scope['method']} {path}: no such endpoint; the admin API is /admin/routes"
            }
        if not self.authorized(scope):
            return 401, {"error": "admin endpoints need Authorization: Bearer <RECBOLE_BENTO_ADMIN_TOKEN>"}
        host = self._host()
        if host is None:
            return 503, {"error": "the service is still starting: retry in a few seconds"}
        if scope["method"] == "GET":
            return 200, describe(host.registry.current)
        if scope["method"] != "POST":
            return 405, {"error": f"{scope['method']} {path}: method not allowed, use GET or POST"}
        body = await _read_capped(receive, routing.MAX_ROUTES_BYTES)
        if body is None:
            return 413, {"error": f"the routes body is larger than {routing.MAX_ROUTES_BYTES} bytes"}
        try:
            routes = routing.from_mapping(json.loads(body), "routes")
        except (ValueError, RecursionError) as exc:
            reason = str(exc) if isinstance(exc, routing.RoutesError) else "the body is not JSON"
            return 400, {"error": reason}
        try:
            snapshot = await host.propose(routes)
        except routing.SwapError as exc:
            status = 507 if exc.budget else 422
            return status, {"error": f"routes not changed: {exc.model}: {exc.reason}", "model": exc.model}
        except WorkersBehind as exc:
            return 500, {"error": str(exc), "generation": exc.generation}
        return 200, describe(snapshot)


async def _read_capped(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def describe(snapshot: routing.Snapshot[Any]) -> dict[str, Any]:
    """The variants as ``/model_info`` and ``/admin/routes`` list them."""
    return {
        "generation": snapshot.generation,
        "variants": [
            {
                "name": s.name,
                "model": s.tag,
                "weight": s.weight,
                "status": "serving",
                "loaded_at": s.loaded.loaded_at,
                "load_seconds": round(s.loaded.load_seconds, 3),
            }
            for s in snapshot.variants.values()
        ],
        "shadow": None if snapshot.shadow is None else snapshot.shadow.tag,
        "salt": snapshot.routes.salt,
    }
