"""BentoML services: a public API (validation, id mapping, filters, popularity fallback) in front
of a batchable ranking service that runs the RecBole model.

    RECBOLE_BENTO_MODEL=<name[:version]> bentoml serve .     # unset: the newest imported model
"""

from __future__ import annotations

import logging

import bentoml
import torch
from bentoml._internal.marshal.dispatcher import CorkDispatcher, NonBlockSema  # batchable APIs' batcher
from bentoml.exceptions import InvalidArgument, ServiceUnavailable
from bentoml.models import BentoModel
from starlette.responses import Response

from recbole_bento.core import store
from recbole_bento.core.engine import Engine
from recbole_bento.core.planner import Plan, Planner, RequestError
from recbole_bento.core.ranking import RankQuery, RankResult
from recbole_bento.edge import bentoml_compat, guard, lifecycle, observability, startup
from recbole_bento.edge.schemas import ModelInfo, RecommendBatchRequest, RecommendRequest, RecommendResponse
from recbole_bento.settings import SETTINGS

logger = logging.getLogger("recbole_bento")
API_PATHS = ["/recommend", "/recommend_batch", "/model_info"]
STARTED = startup.start(SETTINGS, traced_paths=[*API_PATHS, "/rank"])
MODEL_TAG = STARTED.tag
DEVICE = STARTED.device
TRACING = STARTED.tracing


@bentoml.service(
    name="recbole_ranker",
    workers=SETTINGS.ranker_workers or 1,
    # BentoML closes a pooled runner connection after max_requests/max_age while other requests
    # may still be in flight on it (upstream issue 5540): never recycle.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
    traffic={"timeout": SETTINGS.request_timeout_s},
    tracing=TRACING,
)
class Ranker:
    """Scores whole batches of histories with the model's own full_sort_predict."""

    stored_model = BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        if SETTINGS.torch_threads:
            torch.set_num_threads(SETTINGS.torch_threads)
        self.engine = Engine(
            store.load(self.stored_model, verified=True),
            device=DEVICE,
            block_items=SETTINGS.block_items,
        )
        logger.info("loaded %s on %s", MODEL_TAG, self.engine.device)
        # On SIGTERM keep ranking until the public service has answered what it accepted.
        lifecycle.install("recbole_ranker", SETTINGS.shutdown_grace_s, outlive_callers=True)
        bentoml_compat.freeze_startup_objects()  # no 200 ms full-GC pauses under load

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def rank(self, queries: list[RankQuery]) -> list[RankResult]:
        with observability.model_call(MODEL_TAG, len(queries)):
            return self.engine.rank(queries)

    @bentoml.api
    def device(self) -> str:
        return str(self.engine.device)


@bentoml.service(
    name="recbole_recommender",
    workers=SETTINGS.api_workers or 1,
    traffic={"timeout": SETTINGS.request_timeout_s},
    tracing=TRACING,
)
class Recommender:
    """Public API. Everything a request can get wrong is refused here, before batching.

    Single /recommend calls reach the ranker through BentoML's adaptive batcher (``CorkDispatcher``)
    in this process too: the requests that arrive while one ranker call is in flight go in the next
    call, as one list. One HTTP hop to the ranker per batch instead of per request: the ranker's
    per-call cost (HTTP, (de)serialising, dispatch) was half of all CPU per request on ml-100k
    (docs/benchmarks.md). The ranker batches again across public workers and /recommend_batch calls.
    """

    stored_model = BentoModel(MODEL_TAG)
    ranker = bentoml.depends(Ranker)

    def __init__(self) -> None:
        stored = self.stored_model
        artifact = store.load(stored, load_weights=False, verified=True)
        self.metadata = dict(stored.info.metadata)
        self.planner = Planner(artifact, SETTINGS.max_topk)
        self._rank_one = CorkDispatcher(
            max_latency_in_ms=SETTINGS.max_latency_ms,
            max_batch_size=SETTINGS.max_batch_size,
            fallback=_overloaded,
            get_batch_size=lambda _query: 1,
            shared_sema=NonBlockSema(SETTINGS.ranker_workers or 1),
        )(self._rank_many)
        lifecycle.install("recbole_recommender", SETTINGS.shutdown_grace_s, outlive_callers=False)
        bentoml_compat.freeze_startup_objects()

    async def _rank_many(self, queries: tuple[RankQuery, ...]) -> list[RankResult]:
        return await self.ranker.to_async.rank(list(queries))

    # ------------------------------------------------------------------ helpers

    def _plan(self, req: RecommendRequest) -> Plan:
        try:
            return self.planner.plan(req)
        except RequestError as exc:
            raise InvalidArgument(str(exc)) from None

    def _response(self, plan: Plan, result: RankResult) -> RecommendResponse:
        # built from our own values: nothing to validate
        return RecommendResponse.model_construct(**self.planner.answer(plan, result))

    async def _answer(self, requests: list[RecommendRequest]) -> list[RecommendResponse]:
        plans = [self._plan(r) for r in requests]  # raises before anything is batched
        to_rank = [p.query for p in plans if p.rankable]
        if len(to_rank) == 1:
            ranked = iter([await self._rank_one(to_rank[0])])
        else:
            ranked = iter(await self.ranker.to_async.rank(to_rank) if to_rank else [])
        out = []
        for req, plan in zip(requests, plans, strict=True):
            result = next(ranked) if plan.rankable else self.planner.popular(plan)
            out.append(self._response(plan, result))
            observability.answered(MODEL_TAG, len(req.sequence), len(plan.unknown), plan.fallback)
        return out

    # ------------------------------------------------------------------ API

    @bentoml.api(input_spec=RecommendRequest, output_spec=RecommendResponse)
    async def recommend(self, **fields: object) -> Response:
        """Top-k next items for one history."""
        # BentoML has validated *fields* with RecommendRequest's own rules (its input spec subclasses
        # it): no second validation. The answer leaves as one body with a Content-Length; BentoML
        # would send the model chunked, one more ASGI message through every middleware. Same JSON.
        answer = (await self._answer([RecommendRequest.model_construct(**fields)]))[0]
        return Response(answer.model_dump_json(), media_type="application/json")

    @bentoml.api(input_spec=RecommendBatchRequest)
    async def recommend_batch(self, requests: list[RecommendRequest]) -> dict[str, list[RecommendResponse]]:
        """Several /recommend bodies in one call; results come back in the same order."""
        if len(requests) > SETTINGS.max_batch_requests:
            raise InvalidArgument(
                f"at most {SETTINGS.max_batch_requests} requests per batch, got {len(requests)}"
            )
        return {"results": await self._answer(requests)}

    @bentoml.api
    async def model_info(self) -> ModelInfo:
        """What is being served: tag, model, dataset, sizes, inputs, import-time metrics."""
        return ModelInfo(
            tag=MODEL_TAG,
            recbole_model=self.planner.spec.name,
            dataset=self.metadata["dataset"],
            item_count=self.planner.n_items,
            max_history_length=self.metadata["max_history_length"],
            required_inputs=self.planner.spec.required_inputs,
            device=await self.ranker.to_async.device(),
            metrics={
                "valid_metric": self.metadata.get("valid_metric"),
                "best_valid_score": self.metadata.get("best_valid_score"),
            },
            limits={
                "max_history": SETTINGS.max_history,
                "max_topk": self.planner.max_topk,
                "max_batch_requests": SETTINGS.max_batch_requests,
                "max_body_bytes": SETTINGS.max_body_bytes,
                "max_concurrency": SETTINGS.max_concurrency,
                "request_timeout_s": SETTINGS.request_timeout_s,
            },
        )


def _overloaded() -> RankResult:
    """What a request gets when the batcher drops it: waiting longer than max_latency_ms (503)."""
    raise ServiceUnavailable("the ranker is overloaded: retry later")


# Refused /recommend* calls by outcome, next to the answered ones counted in _answer (docs/operations.md).
Recommender.add_asgi_middleware(observability.RefusalMetricsMiddleware, model_tag=MODEL_TAG)
# The front door (docs/errors.md): concurrency limit (429 + Retry-After), body size limit (413),
# one-sentence error bodies, and the accepted/answered count logged at shutdown.
Recommender.add_asgi_middleware(
    guard.RequestGuard,
    api_paths=API_PATHS,
    max_body_bytes=SETTINGS.max_body_bytes,
    max_concurrency=SETTINGS.max_concurrency,
    retry_after_s=SETTINGS.retry_after_s,
    body_timeout_s=SETTINGS.body_timeout_s,
    max_pending_bodies=SETTINGS.max_pending_bodies,
)
