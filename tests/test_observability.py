"""Issue 6, observability: the domain metrics on /metrics move as requests come in, next to BentoML's
own; the JSON log format; the operations doc names every metric."""

from __future__ import annotations

import json
import logging
import re
import sys

import httpx
import pytest
from conftest import ROOT, scrape, serving

from recbole_bento import bentoml_compat
from recbole_bento.edge import observability
from recbole_bento.settings import Settings

OURS = (
    "recbole_bento_requests_total",
    "recbole_bento_fallbacks_total",
    "recbole_bento_history_items_total",
    "recbole_bento_unknown_items_total",
    "recbole_bento_history_length",
    "recbole_bento_batch_size",
    "recbole_bento_rank_seconds",
    "recbole_bento_endpoint_requests_total",
    "recbole_bento_filter_selectivity",
    "recbole_bento_shadow_overlap",
    "recbole_bento_shadow_dropped_total",
)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.server
@pytest.mark.parametrize("topology", ["inprocess", "split"])
def test_domain_metrics_move_with_requests(topology, sasrec_tag, request):
    url = request.getfixturevalue("sasrec_server" if topology == "inprocess" else "sasrec_split_server")
    tag = {"model_tag": sasrec_tag}
    info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
    assert info["tag"] == sasrec_tag
    before = scrape(url)

    post = httpx.Client(base_url=url, timeout=60).post
    ok = post("/recommend", json={"sequence": ["1", "2", "3", "no-such-item"], "topk": 5}).json()
    assert ok["fallback"] is None and ok["unknown_items"] == ["no-such-item"]
    fallback = post("/recommend", json={"sequence": ["no-such-item"], "topk": 5}).json()
    assert fallback["fallback"] == "popular"
    batch = post(
        "/recommend_batch",
        json={
            "requests": [
                {"sequence": ["4", "5"], "topk": 3},
                {"sequence": ["6", "7", "8", "9", "10", "11", "12"], "topk": 3},
                {"sequence": ["another-unknown-item"], "topk": 3},
            ]
        },
    ).json()["results"]
    assert [r["fallback"] for r in batch] == [None, None, "popular"]
    # Refused: by the request schema, and by the service's own limit on batch entries.
    assert post("/recommend", json={"sequence": ["1"], "topk": 0}).status_code == 400
    too_many = [{"sequence": ["1"]}] * (Settings.from_env().max_batch_requests + 1)
    assert post("/recommend_batch", json={"requests": too_many}).status_code == 400

    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        # the per-request metrics carry the variant that answered; the model calls, the model alone
        per_call = name.startswith(("recbole_bento_batch_size", "recbole_bento_rank_seconds"))
        both = tag if per_call else {**tag, "variant": "default"}
        return value(after, name, **both, **labels) - value(before, name, **both, **labels)

    assert delta("recbole_bento_requests_total", outcome="ok") == 3
    assert delta("recbole_bento_requests_total", outcome="fallback") == 2
    assert delta("recbole_bento_requests_total", outcome="client_error") == 2
    assert delta("recbole_bento_fallbacks_total", reason="no_known_items") == 2
    lengths = [4, 1, 2, 7, 1]
    assert delta("recbole_bento_history_items_total") == sum(lengths)
    assert delta("recbole_bento_unknown_items_total") == 3
    assert delta("recbole_bento_history_length_count") == len(lengths)
    assert delta("recbole_bento_history_length_sum") == sum(lengths)
    assert delta("recbole_bento_history_length_bucket", le="2.0") == 3  # 1, 2, 1
    # Three histories reached the model, in one or more batches (adaptive batching decides).
    assert delta("recbole_bento_batch_size_sum") == 3
    calls = delta("recbole_bento_batch_size_count")
    assert 1 <= calls <= 3 and delta("recbole_bento_rank_seconds_count") == calls
    assert delta("recbole_bento_rank_seconds_sum") > 0
    # BentoML's own metrics are still there, for the ranker's process too where there is one.
    names = {name for name, _ in after}
    assert "bentoml_service_request_total" in names
    ranker_samples = any(
        name == "bentoml_service_request_total" and dict(labels).get("runner_name") == "recbole_ranker"
        for name, labels in after
    )
    assert ranker_samples == (topology == "split")
    # Every sample of ours carries the model tag.
    for name, labels in after:
        if name.startswith("recbole_bento_"):
            assert dict(labels).get("model_tag") == sasrec_tag, (name, labels)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, None), (307, None), (400, "client_error"), (404, "client_error"), (413, "client_error")]
    + [(429, "overloaded"), (500, "server_error"), (503, "server_error"), (504, "server_error")],
)
def test_refusal_outcomes(status, outcome):
    assert observability.refusal_outcome(status) == outcome


def test_json_log_lines():
    formatter = observability.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "recbole_bento", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    record.component = "[entry_service:recbole_recommender:1]"  # as BentoML's log filter sets it
    record.trace_msg = " (trace=...)"
    record.model_tag = "sasrec:abc"  # logger.error(..., extra={"model_tag": ...})
    line = formatter.format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "recbole_bento" and out["message"] == "failed x"
    assert out["component"] == "entry_service:recbole_recommender:1"
    assert out["model_tag"] == "sasrec:abc"
    assert "ValueError: boom" in out["exc_info"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", out["time"])
    assert "trace_msg" not in out and "levelname_bracketed" not in out


def test_operations_doc_names_every_metric_and_alert():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name in OURS:
        assert name in doc, name
    source = (ROOT / "recbole_bento" / "edge" / "observability.py").read_text()
    defined = {f"recbole_bento_{m}" for m in re.findall(r'f"\{PREFIX\}_(\w+)"', source)}
    assert {n.removesuffix("_total") for n in OURS} == defined


def test_api_paths_skip_unsampled_tracing_spans():
    from opentelemetry.util.http import ExcludeList

    excluded = ExcludeList(bentoml_compat.untraced(["/recommend", "/rank"])["excluded_urls"])
    for url in ["http://h:3000/recommend", "http://h/recommend?x=1", "http://h/rank"]:
        assert excluded.url_disabled(url), url
    for url in ["http://h/recommend_batch", "http://h/readyz", "http://h/recommendx", "http://h/x?q=/rank"]:
        assert not excluded.url_disabled(url), url


@pytest.mark.server
def test_bentoml_configuration_still_governs_tracing_and_access_log(sasrec_server, sasrec_tag):
    """With a sample rate set, every path is traced again; the access log is BentoML's: on with
    RECBOLE_BENTO_ACCESS_LOG=1, and still switched off per service in BentoML's configuration."""
    body = {"sequence": ["1", "2"], "topk": 3}
    untraced = httpx.post(f"{sasrec_server}/recommend", json=body, timeout=30)
    assert untraced.status_code == 200 and "x-bentoml-request-id" not in untraced.headers
    quiet = {"logging": {"access": {"enabled": False}}}
    overrides = {"tracing": {"sample_rate": 1.0}, "services": {"recbole_recommender": quiet}}
    with serving(
        sasrec_tag,
        BENTOML_CONFIG_OVERRIDES=json.dumps(overrides),
        RECBOLE_BENTO_ACCESS_LOG="1",
        RECBOLE_BENTO_TOPOLOGY="split",
    ) as url:
        traced = httpx.post(f"{url}/recommend", json=body, timeout=30)
    assert traced.status_code == 200 and traced.headers["x-bentoml-request-id"]
    assert traced.json() == untraced.json()
    log = serving.last_log
    assert "[entry_service:recbole_recommender:1]" in log, log[-2000:]
    assert "path=/recommend" not in log  # the public service's access log is off
    assert "path=/rank" in log  # the ranker's is not: its own settings were left as they are
