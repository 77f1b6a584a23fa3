"""What the service tells its operators: domain metrics on ``/metrics`` and an optional JSON log format.

Metrics (every one labelled with ``model_tag``, the stored model; the per-request ones also with
``variant``, the routes' variant that answered: ``default`` without a routes file; a refused call
has no variant, and is labelled with the one variant's model and name where only one is served,
else with empty labels):

    recbole_bento_requests_total{outcome}   one per recommendation request; outcome is
        ok            answered by the model
        fallback      answered from item popularity (no known history item, or an unknown user)
        client_error  refused with a 4xx other than 429 (schema, limits, topk too large ...)
        overloaded    refused with 429 (BentoML's max_concurrency)
        server_error  failed with a 5xx
      An answered /recommend_batch call counts once per entry; a refused call counts once.
      /similar_items requests count here too.
    recbole_bento_endpoint_requests_total{endpoint}  HTTP calls per endpoint (/recommend,
        /recommend_batch, /similar_items), answered or refused: one per call
    recbole_bento_filter_selectivity        histogram: share of the catalogue that passes a request's
        filters (requests with filters only)
    recbole_bento_fallbacks_total{reason}   reason: no_known_items | unknown_user
    recbole_bento_history_items_total       history items received in answered requests
    recbole_bento_unknown_items_total       ... of which the model does not know (skipped)
    recbole_bento_history_length            histogram: items per request history, as sent
    recbole_bento_batch_size                histogram: histories per model call (adaptive batching)
    recbole_bento_rank_seconds              histogram: wall time of one batched model call
    recbole_bento_shadow_overlap{variant}   histogram (model_tag: the shadow model): share of the
        served answer's items that the shadow model ranks in its own top-k for the same request
    recbole_bento_shadow_dropped_total      requests not shadowed: the shadow model was behind

The metric objects are created on first use, inside BentoML's worker processes: BentoML points
``PROMETHEUS_MULTIPROC_DIR`` at a shared folder for them, so ``/metrics`` on the public port adds up
every worker's samples, the ranker's included. (``bentoml.metrics`` is a deprecated alias of
``prometheus_client`` in BentoML 1.4; this uses the client directly, as its deprecation note says.)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

PREFIX = "recbole_bento"
HISTORY_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SELECTIVITY_BUCKETS = (0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RANK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@functools.cache
def _metrics() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram

    tag = ["model_tag"]
    served = ["model_tag", "variant"]
    return SimpleNamespace(
        requests=Counter(f"{PREFIX}_requests", "Recommendation requests by outcome", [*served, "outcome"]),
        fallbacks=Counter(f"{PREFIX}_fallbacks", "Requests answered from popularity", [*served, "reason"]),
        history_items=Counter(f"{PREFIX}_history_items", "History items in answered requests", served),
        unknown_items=Counter(f"{PREFIX}_unknown_items", "History items the model does not know", served),
        history_length=Histogram(
            f"{PREFIX}_history_length", "Items per request history, as sent", served, buckets=HISTORY_BUCKETS
        ),
        batch_size=Histogram(f"{PREFIX}_batch_size", "Histories per model call", tag, buckets=BATCH_BUCKETS),
        endpoint_requests=Counter(
            f"{PREFIX}_endpoint_requests",
            "HTTP calls per endpoint, answered or refused",
            [*served, "endpoint"],
        ),
        filter_selectivity=Histogram(
            f"{PREFIX}_filter_selectivity",
            "Share of the catalogue passing a request's filters",
            served,
            buckets=SELECTIVITY_BUCKETS,
        ),
        rank_seconds=Histogram(
            f"{PREFIX}_rank_seconds", "Wall time of one batched model call", tag, buckets=RANK_BUCKETS
        ),
        shadow_overlap=Histogram(
            f"{PREFIX}_shadow_overlap",
            "Share of the served top-k in the shadow model's top-k",
            served,
            buckets=OVERLAP_BUCKETS,
        ),
        shadow_dropped=Counter(
            f"{PREFIX}_shadow_dropped", "Requests not shadowed: the shadow was behind", tag
        ),
    )


def answered(model_tag: str, variant: str, history_length: int, unknown: int, fallback: str | None) -> None:
    """One answered recommendation. *fallback*: None, or why popularity answered it."""
    m = _metrics()
    m.requests.labels(model_tag, variant, "fallback" if fallback else "ok").inc()
    if fallback:
        m.fallbacks.labels(model_tag, variant, fallback).inc()
    m.history_items.labels(model_tag, variant).inc(history_length)
    if unknown:
        m.unknown_items.labels(model_tag, variant).inc(unknown)
    m.history_length.labels(model_tag, variant).observe(history_length)


def filtered(model_tag: str, variant: str, selectivity: float) -> None:
    """One answered request with filters; *selectivity*: the share of the catalogue passing them."""
    _metrics().filter_selectivity.labels(model_tag, variant).observe(selectivity)


def shadow_overlap(shadow_tag: str, variant: str, overlap: float) -> None:
    """One shadowed request: the share of *variant*'s answer that the shadow model also returned."""
    _metrics().shadow_overlap.labels(shadow_tag, variant).observe(overlap)


def shadow_dropped(shadow_tag: str, requests: int) -> None:
    _metrics().shadow_dropped.labels(shadow_tag).inc(requests)


@contextlib.contextmanager
def model_call(model_tag: str, batch_size: int) -> Iterator[None]:
    """Around one batched model call in the ranker."""
    m = _metrics()
    m.batch_size.labels(model_tag).observe(batch_size)
    start = time.perf_counter()
    try:
        yield
    finally:
        m.rank_seconds.labels(model_tag).observe(time.perf_counter() - start)


def refusal_outcome(status: int) -> str | None:
    """The outcome of a call that ended with HTTP *status*; None for answered ones (counted per entry)."""
    if status < 400:
        return None
    if status == 429:
        return "overloaded"
    return "client_error" if status < 500 else "server_error"


class RefusalMetricsMiddleware:
    """ASGI middleware on the public service: counts the calls on each of *paths*, and the refused
    ones by outcome, whatever refused them (request schema, the service's own limits, an exception)."""

    def __init__(
        self,
        app: Any,
        labels: Callable[[], tuple[str, str]],
        paths: tuple[str, ...] = ("/recommend", "/recommend_batch"),
    ):
        self.app = app
        self.labels = labels  # (model_tag, variant) of a refused call: asked when it is counted
        self.paths = frozenset(paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            labels = self.labels()
            _metrics().endpoint_requests.labels(*labels, scope["path"]).inc()
            outcome = refusal_outcome(status)
            if outcome:
                _metrics().requests.labels(*labels, outcome).inc()


# ---------------------------------------------------------------------------------------------- logs

_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    # set by BentoML's TraceRecordFilter for its text format; replaced by the fields below
    "levelname_bracketed",
    "component",
    "trace_msg",
    "request_id",
    "service_name",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, component, message, trace/span ids when a
    request is being traced, exception text, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        component = getattr(record, "component", "")
        if component:
            out["component"] = component.strip("[]")
        out.update(_trace_ids())
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


def _trace_ids() -> dict[str, str]:
    """The current span's ids, from OpenTelemetry (the ids BentoML's own log lines show)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.trace_id:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def use_json_logs(bentoml_configs: bool) -> None:
    """Switch this process's log handlers to JSON, and, with *bentoml_configs*, BentoML's server
    logging config with them (a worker configures logging before it imports the service, the
    ``bentoml serve`` process after: ``bentoml_compat.use_log_formatter``)."""
    formatter = JsonFormatter()
    for name in (None, "bentoml", "bentoml.access", "uvicorn.error", "circus", "recbole_bento"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
    if bentoml_configs:
        from ..bentoml_compat import use_log_formatter

        use_log_formatter(JsonFormatter)
