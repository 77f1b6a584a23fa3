"""The public service's request path, free of BentoML's service machinery so that it can be tested
in process: plan each request (``core.planner``), rank the rankable ones through a ``ModelPort``,
answer the rest from popularity, decode. Every ranking API is a ``QueryKind`` (its request model, its
planning function, its response model) down the same path: /recommend and /recommend_batch
(``RECOMMEND``), /similar_items (``SIMILAR_ITEMS``); the engine ranks both kinds of query in one batch.

Two ports, one per topology (``edge/topology.py``):

* ``LocalModel``: the engine in this process, behind this process's batcher. The model runs on the
  event loop itself: each process already has its own cores' worth of torch threads, so a thread
  hand-off would only add its cost.
* ``RemoteModel``: the ``Ranker`` service. Its worker can die (OOM killer, ``kill -9``) and BentoML's
  arbiter then starts another, which takes seconds to load the model; meanwhile calls hang on the
  listening socket the arbiter keeps. So the first failed call marks the model unavailable: from
  then on requests are refused at once with 503 + ``Retry-After`` (and ``/readyz`` says 503) while
  a background probe waits for the new worker; one log line when it goes, one when it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import Response

from ..core import routes as routing
from ..core.planner import Plan, Planner, RequestError
from ..core.ranking import RankQuery, RankResult
from ..core.sessions import StoreUnavailable
from ..schemas import (
    EventRequest,
    RankedItems,
    RecommendBatchRequest,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
)
from . import observability
from .batcher import Batcher, Overloaded
from .sessions import SessionHistory
from .variants import Ranked, Shadow, Snapshot

logger = logging.getLogger("recbole_bento")


class ModelUnavailable(Exception):
    """No model can rank right now; the message says why and when to retry (HTTP 503)."""


class ModelPort(Protocol):
    async def rank(self, queries: list[RankQuery]) -> Sequence[RankResult]: ...

    async def device(self) -> str: ...

    async def ready(self) -> bool: ...


class LocalModel:
    """The engine in this process, batched by this process's ``Batcher``."""

    def __init__(self, rank_many: Callable[[Sequence[RankQuery]], list[RankResult]], device: str) -> None:
        self._rank_many = rank_many
        self._device = device

    async def rank(self, queries: list[RankQuery]) -> Sequence[RankResult]:
        return self._rank_many(queries)

    async def device(self) -> str:
        return self._device

    async def ready(self) -> bool:
        return True


class RemoteModel:
    """The Ranker service through its ``bentoml.depends`` proxy, with its up/down state."""

    PROBE_INTERVAL_S = 0.2

    def __init__(
        self,
        rank: Callable[[list[RankQuery]], Awaitable[list[RankResult]]],
        device: Callable[[], Awaitable[str]],
        is_ready: Callable[[float], Awaitable[bool]],
        retry_after_s: int,
        transport_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._rank = rank
        self._device = device
        self._is_ready = is_ready
        self.retry_after_s = retry_after_s
        self._transport_errors = transport_errors
        self.down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        # Calls sent to a dead worker hang on the arbiter's listening socket: once the worker is
        # known to be down they are cancelled and answered 503 like the calls that follow.
        self._in_flight: set[asyncio.Future[list[RankResult]]] = set()
        self._seen_ready = False  # a worker answered once: from then on, silence means it went down

    def _unavailable(self) -> ModelUnavailable:
        return ModelUnavailable(f"the model worker is restarting: retry after {self.retry_after_s} s")

    async def rank(self, queries: list[RankQuery]) -> Sequence[RankResult]:
        if self.down_since is not None:
            raise self._unavailable()
        call = asyncio.ensure_future(self._rank(queries))
        self._in_flight.add(call)
        try:
            results = await call
            self._seen_ready = True
            return results
        except self._transport_errors as exc:
            self._went_down(exc)
            raise self._unavailable() from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.down_since is not None and not (current and current.cancelling()):
                raise self._unavailable() from None  # cancelled by _went_down, not by our caller
            raise
        finally:
            self._in_flight.discard(call)

    async def device(self) -> str:
        if self.down_since is not None:
            raise self._unavailable()
        try:
            return await self._device()
        except self._transport_errors as exc:
            self._went_down(exc)
            raise self._unavailable() from None

    async def ready(self) -> bool:
        if self.down_since is not None:
            return False
        # Half a second: the Ranker answers /readyz from its event loop while the model runs in a
        # thread, and a dead worker's calls hang on the arbiter's socket rather than fail.
        if await self._reachable(0.5):
            self._seen_ready = True
            return True
        if not self._seen_ready and not self._in_flight:
            return False  # still starting (no worker has answered yet): not ready, nothing went down
        self._went_down(TimeoutError("its /readyz did not answer 200 within 0.5 s"))
        return False

    async def _reachable(self, timeout_s: float) -> bool:
        try:
            return await asyncio.wait_for(self._is_ready(timeout_s), timeout_s)
        except (*self._transport_errors, asyncio.TimeoutError):
            return False

    def _went_down(self, exc: BaseException) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        logger.warning(
            "the model worker is unreachable (%s): answering 503 until it is back",
            str(exc).strip() or type(exc).__name__,
        )
        self._probe = asyncio.get_running_loop().create_task(self._wait_until_back())
        for call in self._in_flight:
            call.cancel()

    async def _wait_until_back(self) -> None:
        while not await self._reachable(1.0):
            await asyncio.sleep(self.PROBE_INTERVAL_S)
        assert self.down_since is not None
        logger.warning("the model worker is back after %.1f s: serving", time.monotonic() - self.down_since)
        self.down_since = None


@dataclass(frozen=True)
class QueryKind:
    """What a ranking API asks: how the planner maps its body, and the answer it gives."""

    request: type[BaseModel]
    plan: Callable[[Planner, Any], Plan]
    response: type[RankedItems]


# The planner's methods are looked up on the instance at each call, as any other call site would.
RECOMMEND = QueryKind(RecommendRequest, lambda planner, req: planner.plan(req), RecommendResponse)
SIMILAR_ITEMS = QueryKind(
    SimilarItemsRequest, lambda planner, req: planner.plan_similar(req), SimilarItemsResponse
)


def single_model(
    planner: Planner, model: ModelPort, *, model_tag: str, max_batch: int, max_wait_s: float, concurrency: int
) -> routing.Registry[Ranked]:
    """The registry of a server with one model: the implicit variant ``default``."""
    loaded = routing.Loaded(
        model_tag, planner, ranked(model, max_batch, max_wait_s, concurrency), 0, time.time(), 0.0
    )
    snapshot = routing.Snapshot(
        0,
        routing.single(model_tag),
        {routing.DEFAULT_VARIANT: routing.Served(routing.DEFAULT_VARIANT, 1.0, loaded)},
        models={model_tag: loaded},
    )
    return routing.Registry(snapshot)


def ranked(
    model: ModelPort, max_batch: int, max_wait_s: float, concurrency: int, holds: object = None
) -> Ranked:
    """The ranking handle of one model in this process: *model* behind its own batcher."""
    batched = Batcher(model.rank, max_batch=max_batch, max_wait_s=max_wait_s, concurrency=concurrency)
    return Ranked(model, batched, holds)


def assignment_key(request: Any) -> str | None:
    """What a request is assigned to a variant by: its ``assignment_key``, else its ``user_id``."""
    key = getattr(request, "assignment_key", None)
    if key is None:
        key = getattr(request, "user_id", None)
    return None if key is None else str(key)


class RequestPath:
    """Pick the variant, plan, rank (batched), fall back, decode: everything between the API and
    the models. Each request is answered on the registry's snapshot of its arrival."""

    def __init__(
        self,
        registry: routing.Registry[Ranked],
        *,
        retry_after_s: int,
        max_batch_requests: int = 0,
        shadow: Shadow | None = None,
        sessions: SessionHistory | None = None,
    ) -> None:
        self.registry = registry
        self.sessions = sessions  # server-side histories (edge/sessions.py); None: session_id refused
        self.retry_after_s = retry_after_s
        self.max_batch_requests = max_batch_requests  # entries per /recommend_batch body; 0 = no limit
        self.shadow = shadow

    # One method per JSON endpoint, called with its validated body by both ways in: the service's
    # ``@bentoml.api`` method and the fast path (``edge/fast_path.py``). RequestError: a 400.

    async def recommend(self, request: RecommendRequest) -> Response:
        """POST /recommend: top-k next items for one history."""
        return await self._with_sessions([request], batch=False)

    async def recommend_batch(self, body: RecommendBatchRequest) -> Response:
        """POST /recommend_batch: several /recommend bodies, answered in order."""
        if self.max_batch_requests and len(body.requests) > self.max_batch_requests:
            raise RequestError(
                f"at most {self.max_batch_requests} requests per batch, got {len(body.requests)}"
            )
        return await self._with_sessions(body.requests, batch=True)

    async def events(self, body: EventRequest) -> Response:
        """POST /events: append to a session's stored history."""
        try:
            session = await self._sessions().record(body.session_id, body.items, body.user_id)
        except StoreUnavailable as exc:
            return self._store_down(exc)
        answer = {"session_id": body.session_id, "length": len(session.items)}
        return Response(json.dumps(answer), media_type="application/json")

    async def _with_sessions(self, requests: Sequence[RecommendRequest], *, batch: bool) -> Response:
        """``respond`` to *requests*, those with a ``session_id`` carrying their stored history
        (``SessionHistory.resolve``) before anything is planned; 503 when the store cannot answer."""
        if any(r.session_id is not None for r in requests):
            try:
                requests = await self._sessions().resolve(requests)
            except StoreUnavailable as exc:
                return self._store_down(exc, ", or send the sequence without session_id")
        return await self.respond(requests, batch=batch)

    def _store_down(self, exc: StoreUnavailable, advice: str = "") -> Response:
        error = f"{exc}: retry after {self.retry_after_s} s{advice}"
        return error_response(503, error, retry_after_s=self.retry_after_s)

    def _sessions(self) -> SessionHistory:
        if self.sessions is None:
            raise RequestError("this server keeps no session histories: send the sequence without session_id")
        return self.sessions

    async def similar_items(self, request: SimilarItemsRequest) -> Response:
        """POST /similar_items: the items most like the given ones."""
        return await self.respond([request], batch=False, kind=SIMILAR_ITEMS)

    async def ready(self) -> bool:
        """Every model of the routes in force can rank."""
        ports = {id(m.model.port): m.model.port for m in self.registry.current.models.values()}
        return all([await port.ready() for port in ports.values()])

    async def answer(
        self, requests: Sequence[Any], *, kind: QueryKind = RECOMMEND, snapshot: Snapshot | None = None
    ) -> list[RankedItems]:
        """The answers of *kind* to *requests* (its request model), in order, each by its variant
        in *snapshot* (default: the current one); RequestError, ModelUnavailable or Overloaded
        otherwise. Queries of either kind share each model's batches."""
        snapshot = snapshot or self.registry.current
        chosen = [snapshot.pick(assignment_key(r), getattr(r, "variant", None)) for r in requests]
        plans = [kind.plan(v.planner, r) for v, r in zip(chosen, requests, strict=True)]  # before batching
        by_variant: dict[str, list[int]] = {}
        for i, served in enumerate(chosen):
            plans[i].query.model = served.tag  # which model ranks it (the Ranker holds several)
            by_variant.setdefault(served.name, []).append(i)
        groups = list(by_variant.values())
        ranked = await asyncio.gather(
            *(
                self._rank(chosen[g[0]].loaded.model, [plans[i].query for i in g if plans[i].rankable])
                for g in groups
            )
        )
        out: list[RankedItems | None] = [None] * len(requests)
        for group, results in zip(groups, ranked, strict=True):
            served = chosen[group[0]]
            planner = served.planner
            group_plans = [plans[i] for i in group]
            for i, plan, fields in zip(
                group, group_plans, planner.answers(group_plans, results), strict=True
            ):
                # our own values: nothing to validate
                out[i] = kind.response.model_construct(**fields, model=served.tag, variant=served.name)
                sent = len(plan.query.history) + len(plan.unknown)
                observability.answered(served.tag, served.name, sent, len(plan.unknown), plan.fallback)
                if plan.passing is not None:
                    observability.filtered(served.tag, served.name, plan.passing / planner.n_items)
        return cast(list[RankedItems], out)

    @staticmethod
    async def _rank(model: Ranked, queries: list[RankQuery]) -> Sequence[RankResult]:
        """A lone query joins the model's batches; several (a batch body) are one model call."""
        if len(queries) == 1:
            return [await model.batched(queries[0])]
        return await model.port.rank(queries) if queries else []

    async def respond(self, requests: Sequence[Any], *, batch: bool, kind: QueryKind = RECOMMEND) -> Response:
        """One HTTP response: 200 with the answer (``{"results": [...]}`` for a *batch*), or the 503
        a refusal gets. RequestError propagates: the service refuses it as BentoML does (400). Once
        the response is sent, the shadow model (if any) ranks the same requests."""
        snapshot = self.registry.current  # the request finishes on the models it started with
        try:
            answers = await self.answer(requests, kind=kind, snapshot=snapshot)
        except ModelUnavailable as exc:
            return error_response(503, str(exc), retry_after_s=self.retry_after_s)
        except Overloaded:
            error = f"the model is overloaded: retry after {self.retry_after_s} s"
            return error_response(503, error, retry_after_s=self.retry_after_s)
        # One body with a Content-Length: BentoML would send a returned model chunked, one more ASGI
        # message through every middleware. Same JSON.
        if batch:
            body = '{"results":[' + ",".join(a.model_dump_json() for a in answers) + "]}"
        else:
            body = answers[0].model_dump_json()
        later = None
        if self.shadow is not None and snapshot.shadow is not None:
            later = BackgroundTask(self.shadow.submit, snapshot, kind.plan, requests, answers)
        return Response(body, media_type="application/json", background=later)


def error_response(status: int, error: str, *, retry_after_s: int | None = None) -> Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return Response(
        json.dumps({"error": error}), status_code=status, media_type="application/json", headers=headers
    )
