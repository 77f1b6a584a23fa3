"""BentoML services: a public API (validation, id mapping, filters, popularity fallback) and the
model, either in a batchable ranking service behind it (split) or inside it (in-process): one
setting, ``RECBOLE_BENTO_TOPOLOGY``, defaults picked from what is served (edge/topology.py).

    RECBOLE_BENTO_MODEL=<name[:version]> bentoml serve .     # unset: the newest imported model
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import bentoml
import torch
from bentoml.exceptions import InvalidArgument
from bentoml.models import BentoModel
from pydantic import BaseModel
from starlette.responses import Response

from recbole_bento import bentoml_compat
from recbole_bento.core import routes as routing
from recbole_bento.core.attributes import ItemAttributes
from recbole_bento.core.catalogue import CatalogueError
from recbole_bento.core.planner import RequestError
from recbole_bento.core.ranking import RankQuery, RankResult
from recbole_bento.core.sessions import Limits, StoreError, open_store, store_address
from recbole_bento.edge import (
    fast_path,
    guard,
    lifecycle,
    loading,
    observability,
    playground,
    startup,
    topology,
    variants,
)
from recbole_bento.edge.request_path import RemoteModel, RequestPath
from recbole_bento.edge.sessions import SessionHistory, SessionsApp
from recbole_bento.schemas import (
    CatalogueItem,
    EventRequest,
    EventResponse,
    ItemsRequest,
    ItemsResponse,
    ModelInfo,
    RecommendBatchResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsResponse,
    requests_for,
)
from recbole_bento.settings import SETTINGS

logger = logging.getLogger("recbole_bento")
API_PATHS = ["/recommend", "/recommend_batch", "/similar_items", "/model_info", "/items", "/events"]
STARTED = startup.start(SETTINGS, traced_paths=[*API_PATHS, "/rank"])
MODEL_TAG = STARTED.tag
# The bodies as this model takes them: /docs.json lists its own filterable fields.
_ATTRIBUTES = ItemAttributes.load(
    Path(STARTED.model.path), int(STARTED.model.info.metadata["item_count"]) + 1
)
BODIES = requests_for(_ATTRIBUTES.kinds() if _ATTRIBUTES else {}, STARTED.routes.names())
DEVICE = STARTED.device
TRACING = STARTED.tracing
_MODELS_BYTES = sum(loading.estimate(t) for t in {str(m.tag) for m in STARTED.models.values()})
if SETTINGS.memory_budget_mb and _MODELS_BYTES > SETTINGS.memory_budget_mb * 2**20:
    raise SystemExit(
        f"recbole-bento: the routes' models take ~{_MODELS_BYTES / 2**20:.0f} MiB per process that holds "
        f"them, over RECBOLE_BENTO_MEMORY_BUDGET_MB={SETTINGS.memory_budget_mb}"
    )
LAYOUT = topology.choose(
    SETTINGS,
    DEVICE,
    topology.available_cores(),
    topology.RUNTIME_BYTES + _MODELS_BYTES,  # every model of the routes, per process that holds models
    topology.available_memory(),
)
# Routes changed while serving (docs/operations.md, "Model lifecycle"): the state file every
# worker follows sits in a folder of the `bentoml serve` process (the arbiter: this process's
# parent in a worker). There, SIGHUP re-reads RECBOLE_BENTO_ROUTES into it.
IN_WORKER = bentoml.server_context.worker_index is not None
ROUTES_STATE = variants.StateFile(variants.run_dir(os.getppid() if IN_WORKER else os.getpid()))
if not IN_WORKER:
    ROUTES_STATE.clear()  # a folder left by an earlier server whose pid this one got
    if SETTINGS.routes and STARTED.compatible:  # circus's handler checked (bentoml_compat)
        bentoml_compat.on_hangup(lambda: loading.reread(SETTINGS.routes or "", ROUTES_STATE))
BATCHING = loading.Batching(
    SETTINGS.max_batch_size, SETTINGS.max_latency_ms / 1000, concurrency=LAYOUT.ranker_workers or 1
)
HOSTED = variants.Hosted()  # this worker's variants, once the service instance has built them
ACCESS_LOG = {"access": {"enabled": bool(SETTINGS.access_log)}}  # off unless asked: docs/configuration.md
# The JSON endpoints: each @bentoml.api method below and the fast path (edge/fast_path.py) answer
# its body with the same RequestPath method.
FAST_ROUTES = fast_path.Routes(
    {
        "/recommend": fast_path.Endpoint(BODIES.recommend, RequestPath.recommend),
        "/recommend_batch": fast_path.Endpoint(BODIES.recommend_batch, RequestPath.recommend_batch),
        "/similar_items": fast_path.Endpoint(BODIES.similar_items, RequestPath.similar_items),
        "/events": fast_path.Endpoint(EventRequest, RequestPath.events),
    }
)
# GET and DELETE /sessions/{id}, answered with each worker's SessionHistory once it is built.
SESSIONS_APP = SessionsApp(SETTINGS.max_session_id_bytes, SETTINGS.retry_after_s)


def start_models() -> None:
    """In a process that ranks (the Ranker, or each in-process API worker)."""
    torch.set_num_threads(LAYOUT.torch_threads)
    logger.info("loading %s on %s; %s", ", ".join(STARTED.models), DEVICE, LAYOUT.describe())


@bentoml.service(
    name="recbole_ranker",
    workers=LAYOUT.ranker_workers or 1,
    # BentoML closes a pooled runner connection after max_requests/max_age while other requests
    # may still be in flight on it (upstream issue 5540): never recycle.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
    traffic={"timeout": SETTINGS.request_timeout_s},
    tracing=TRACING,
    logging=ACCESS_LOG,
)
class Ranker:
    """The split topology's model worker: scores whole batches of histories; similar-items queries
    ride in the same batches (``RankQuery.kind``). Only started where ``Recommender`` depends on it
    (``RECBOLE_BENTO_TOPOLOGY``, edge/topology.py)."""

    stored_model = BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        start_models()
        named = {str(m.tag) for m in STARTED.models.values()}
        self.models = loading.RankerModels(MODEL_TAG, named, DEVICE, SETTINGS.block_items, ROUTES_STATE)
        for tag in sorted(named):
            self.models.engine(tag)
        self.models.watch()
        # On SIGTERM keep ranking until the public service has answered what it accepted.
        lifecycle.install("recbole_ranker", SETTINGS.shutdown_grace_s, outlive_callers=True)
        bentoml_compat.freeze_startup_objects()  # no 200 ms full-GC pauses under load

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def rank(self, queries: list[RankQuery]) -> list[RankResult]:
        return self.models.rank(queries)  # each by the model it names (RankQuery.model)

    @bentoml.api
    def device(self) -> str:
        return DEVICE


try:  # a session store setting that names nothing usable stops the server here, in one line
    store_address(SETTINGS.session_store)
except StoreError as exc:
    raise SystemExit(f"recbole-bento: {exc}") from None


def session_history(window: Callable[[], int]) -> SessionHistory:
    """This worker's view of the session store that every worker (and replica) shares: the store
    is opened here, in each worker, never at import (``bentoml build`` imports this module)."""
    home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")  # BentoML's own default
    store = open_store(
        SETTINGS.session_store,
        home / "sessions" / "sessions.sqlite3",
        ttl_s=SETTINGS.session_ttl,
        max_sessions=SETTINGS.session_max,
        timeout_s=SETTINGS.session_timeout_ms / 1000,
        limits=Limits(
            max_items=max(SETTINGS.max_history, SETTINGS.max_event_items),
            max_id_length=SETTINGS.max_id_length,
        ),
    )
    if bentoml.server_context.worker_index in (None, 1):
        logger.info("session histories in %s", store.name)
    return SessionHistory(store, window)


@bentoml.service(
    name="recbole_recommender",
    workers=LAYOUT.api_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    tracing=TRACING,
    logging=ACCESS_LOG,
    runner_probe={"enabled": False},  # __is_ready__ probes the Ranker itself, with a short timeout
)
class Recommender:
    """Public API. Everything a request can get wrong is refused here, before batching; the rest
    goes down ``edge/request_path.py`` to the model: the Ranker service (split) or this process's
    own engine (in-process), batched in this process either way."""

    stored_model = BentoModel(MODEL_TAG)
    if LAYOUT.split:  # in-process, no Ranker is declared, started or packed into the Bento
        ranker = bentoml.depends(Ranker)

    def __init__(self) -> None:
        stored = self.stored_model
        self.metadata = dict(stored.info.metadata)
        self.sessions = session_history(self.longest_window)
        SESSIONS_APP.serve(self.sessions)
        warm = None
        if LAYOUT.split:
            ranker = self.ranker  # its endpoints exist once the worker serves: looked up per call
            remote = RemoteModel(
                lambda queries: ranker.to_async.rank(queries),
                lambda: ranker.to_async.device(),
                ranker.is_ready,
                retry_after_s=SETTINGS.retry_after_s,
                transport_errors=(aiohttp.ClientError, OSError),  # BentoML's proxy runs on aiohttp
            )
            load = loading.remote(remote, SETTINGS.max_topk, BATCHING)
            warm = loading.warm_remote
        else:
            start_models()
            load = loading.in_process(DEVICE, SETTINGS.block_items, SETTINGS.max_topk, BATCHING)
        build = loading.builder(load, SETTINGS.memory_budget_mb * 2**20)
        on_file = ROUTES_STATE.read_or_none()  # a restarted worker takes the routes in force
        generation, routes = on_file if on_file is not None else (0, STARTED.routes)
        try:
            snapshot = build(routes, generation, None)
        except routing.SwapError as exc:
            raise SystemExit(f"recbole-bento: {exc}") from None
        host = variants.Host(
            routing.Registry(snapshot),
            build,
            ROUTES_STATE,
            # the API workers: each holds its own routes (the Ranker's load on their warm-up call)
            siblings=lambda: [pid for pid, name in lifecycle.siblings() if name == Recommender.name],
            warm=warm,
        )
        HOSTED.serve(host)
        self.path = RequestPath(
            host.registry,
            retry_after_s=SETTINGS.retry_after_s,
            max_batch_requests=SETTINGS.max_batch_requests,
            shadow=variants.Shadow(),
            sessions=self.sessions,
        )
        if bentoml.server_context.worker_index in (None, 1):
            logger.info("try %s in a browser: GET %s on this server", MODEL_TAG, playground.PATH)
        # Tracing on: BentoML's dispatch, whose answers carry the request's span id.
        FAST_ROUTES.serve(self.path if SETTINGS.fast_path and TRACING else None)
        lifecycle.install(
            "recbole_recommender", SETTINGS.shutdown_grace_s, outlive_callers=False, drain_s=SETTINGS.drain_s
        )
        bentoml_compat.freeze_startup_objects()

    def longest_window(self) -> int:
        """The most history items any model of the routes in force reads: what a session keeps."""
        return max(loaded.planner.window for loaded in self.path.registry.current.models.values())

    @bentoml.on_startup
    async def follow_routes(self) -> None:
        """From now on (on this worker's event loop) apply each change of the routes (variants.py)."""
        HOSTED.start()

    async def __is_ready__(self) -> bool:
        """503 from the stop signal on, and while the model worker is unreachable."""
        return not lifecycle.draining() and await self.path.ready()

    async def _respond(self, path: str, body: BaseModel) -> Response:
        try:
            return await FAST_ROUTES.endpoints[path].answer(self.path, body)
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None

    # ------------------------------------------------------------------ API

    @bentoml.api(input_spec=BODIES.recommend, output_spec=RecommendResponse)
    async def recommend(self, **fields: object) -> Response:
        """Top-k next items for one history."""
        # BentoML has validated *fields* with RecommendRequest's own rules (its input spec subclasses
        # it): no second validation.
        return await self._respond("/recommend", BODIES.recommend.model_construct(**fields))

    @bentoml.api(input_spec=BODIES.recommend_batch, output_spec=RecommendBatchResponse)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> Response:
        """Several /recommend bodies in one call; results come back in the same order."""
        body = BODIES.recommend_batch.model_construct(requests=requests)
        return await self._respond("/recommend_batch", body)

    @bentoml.api(input_spec=BODIES.similar_items, output_spec=SimilarItemsResponse)
    async def similar_items(self, **fields: object) -> Response:
        """Items most like the given ones: cosine in the model's item table, exact top-k."""
        return await self._respond("/similar_items", BODIES.similar_items.model_construct(**fields))

    @bentoml.api(input_spec=ItemsRequest, output_spec=ItemsResponse)
    async def items(self, **fields: object) -> ItemsResponse:
        """Items by id, or searched by id and attribute words, with their attributes: the playground's
        item picker and result cards. In the catalogue of the variant named (default: the first)."""
        body = ItemsRequest.model_construct(**fields)
        snapshot = self.path.registry.current
        try:
            first = next(iter(snapshot.variants.values()))
            catalogue = (snapshot.pick(None, body.variant) if body.variant else first).planner.catalogue
            if body.ids is not None:
                found, unknown = catalogue.lookup(body.ids)
            else:
                found, unknown = catalogue.search(body.query or "", body.limit), []
        except (RequestError, CatalogueError) as exc:
            raise InvalidArgument(str(exc)) from None
        items = [CatalogueItem(id=item.id, attributes=item.attributes) for item in found]
        return ItemsResponse(items=items, unknown_items=unknown)

    @bentoml.api(input_spec=EventRequest, output_spec=EventResponse)
    async def events(self, **fields: object) -> Response:
        """Append items to a session's stored history (most recent last): answers its length."""
        return await self._respond("/events", EventRequest.model_construct(**fields))

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        """What is being served: tag, model, dataset, sizes, inputs, import-time metrics (of the
        first variant's model), and every variant of the routes."""
        snapshot = self.path.registry.current
        first = next(iter(snapshot.variants.values()))
        planner = first.planner
        served = variants.describe(snapshot)
        metadata = bentoml.models.get(first.tag).info.metadata
        return ModelInfo(
            tag=first.tag,
            recbole_model=planner.spec.name,
            dataset=metadata["dataset"],
            item_count=planner.n_items,
            max_history_length=metadata["max_history_length"],
            required_inputs=planner.spec.required_inputs,
            device=await first.loaded.model.port.device(),
            metrics={
                "valid_metric": metadata.get("valid_metric"),
                "best_valid_score": metadata.get("best_valid_score"),
            },
            limits={
                "max_history": SETTINGS.max_history,
                "max_topk": planner.max_topk,
                "max_batch_requests": SETTINGS.max_batch_requests,
                "max_body_bytes": SETTINGS.max_body_bytes,
                "max_concurrency": SETTINGS.max_concurrency,
                "request_timeout_s": SETTINGS.request_timeout_s,
            },
            similar_items=planner.spec.item_table is not None,
            filterable_fields=planner.attributes.describe() if planner.attributes else {},
            variants=served["variants"],
            shadow=served["shadow"],
            retrieval_index=metadata.get("retrieval_index"),
        )


# /admin/routes: change the routes while serving; only with RECBOLE_BENTO_ADMIN_TOKEN (else 404).
if SETTINGS.admin_token:
    Recommender.mount_asgi_app(variants.AdminApp(HOSTED.get, SETTINGS.admin_token), path="/admin")
# GET /playground: the page to try the model in a browser (edge/playground.py).
Recommender.mount_asgi_app(playground.app(), path="/")
Recommender.mount_asgi_app(SESSIONS_APP, path="/sessions")  # GET, DELETE /sessions/{id}
# Outermost: Connection: close on every response once the stop signal came (lifecycle.py).
Recommender.add_asgi_middleware(lifecycle.DrainMiddleware)
# Calls per endpoint, and the refused ones by outcome, next to the answered ones counted in
# RequestPath.answer (docs/operations.md).
Recommender.add_asgi_middleware(
    observability.RefusalMetricsMiddleware,
    labels=HOSTED.refusal_labels,
    paths=("/recommend", "/recommend_batch", "/similar_items", "/events"),
)
# The front door (docs/errors.md): concurrency limit (429 + Retry-After), body size limit (413),
# one-sentence error bodies, and the accepted/answered count logged at shutdown.
Recommender.add_asgi_middleware(
    guard.RequestGuard,
    api_paths=API_PATHS,
    api_prefixes=("/sessions/",),  # GET and DELETE /sessions/{id}: the same limits
    openapi_paths=SESSIONS_APP.openapi(),
    max_body_bytes=SETTINGS.max_body_bytes,
    max_concurrency=SETTINGS.max_concurrency,
    retry_after_s=SETTINGS.retry_after_s,
    body_timeout_s=SETTINGS.body_timeout_s,
    max_pending_bodies=SETTINGS.max_pending_bodies,
)
# Innermost, once the guard has let a request in: the JSON endpoints without BentoML's per-request
# API dispatch, same answers (edge/fast_path.py).
Recommender.add_asgi_middleware(fast_path.FastPath, routes=FAST_ROUTES, service_name=Recommender.name)
