"""The fast path (edge/fast_path.py) answers exactly what BentoML's @bentoml.api dispatch answers.

In process: the public service's own ASGI app (``Recommender.to_asgi()``, BentoML's public API, with
every middleware of ``bentoml serve``), each request sent twice, once through the fast path and once
with it switched off (``FAST_ROUTES.serve(None)``, what ``RECBOLE_BENTO_FAST_PATH=0`` does)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from conftest import ROOT
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

import recbole_bento.settings
from recbole_bento.settings import Settings

OUTCOMES = ("ok", "fallback", "client_error", "overloaded", "server_error")


@pytest.fixture(scope="module")
def served(sasrec_tag: str) -> Iterator[tuple[ModuleType, TestClient]]:
    env = {"RECBOLE_BENTO_MODEL": sasrec_tag, "RECBOLE_BENTO_TOPOLOGY": "inprocess"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recbole_bento.settings, "SETTINGS", Settings.from_env(env))
        spec = importlib.util.spec_from_file_location("service_fast_path_test", ROOT / "service.py")
        assert spec is not None and spec.loader is not None
        service = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, service)  # pydantic resolves the API's annotations there
        spec.loader.exec_module(service)
        with TestClient(service.Recommender.to_asgi()) as client:
            yield service, client


def counts(tag: str) -> dict[str, float]:
    return {
        o: REGISTRY.get_sample_value(
            "recbole_bento_requests_total", {"model_tag": tag, "variant": "default", "outcome": o}
        )
        or 0.0
        for o in OUTCOMES
    }


def both_ways(served, sasrec_tag: str, path: str, body: bytes, headers: dict[str, str]):
    """(status, headers but Date, body, metric moves) through the fast path, then through BentoML."""
    service, client = served
    request_path = service.FAST_ROUTES.path
    assert request_path is not None, "the service instance registered its request path"
    answers = []
    try:
        for route in (request_path, None):
            service.FAST_ROUTES.serve(route)
            before = counts(sasrec_tag)
            response = client.post(path, content=body, headers=headers)
            after = counts(sasrec_tag)
            moved = {o: after[o] - before[o] for o in OUTCOMES if after[o] != before[o]}
            kept = [(k, v) for k, v in response.headers.multi_items() if k != "date"]
            answers.append((response.status_code, kept, response.content, moved))
    finally:
        service.FAST_ROUTES.serve(request_path)
    return answers


JSON = {"content-type": "application/json"}
BATCH = {"requests": [{"sequence": ["1", "2"], "topk": 2}, {"sequence": []}, {"sequence": ["nope"]}]}
CASES = [
    ("/recommend", {"sequence": ["1", "2"], "topk": 3}, JSON),
    ("/recommend", {"sequence": [1, "50", "nope"], "topk": 5, "exclude_seen": True, "exclude": ["98"]}, JSON),
    ("/recommend", {"sequence": ["1"], "candidates": ["50", 100, "nope"]}, JSON),
    ("/recommend", {"sequence": []}, {}),  # no Content-Type: read as JSON
    ("/recommend_batch", BATCH, JSON),
    ("/recommend", {"sequence": ["1", 2.5], "topk": 0}, JSON),
    ("/recommend", {"sequence": ["1"], "topk": 3, "unknown": 1}, JSON),
    ("/recommend", {"topk": "3"}, JSON),
    ("/recommend", [], JSON),
    ("/recommend", b"", JSON),
    ("/recommend", b'{"sequence": [', JSON),
    ("/recommend", b"\xff\xfe", JSON),
    ("/recommend_batch", {"requests": [{"sequence": ["1"]}], "extra": True}, JSON),
    ("/recommend_batch", {"requests": [{"sequence": "1"}]}, JSON),
    ("/recommend_batch", {"requests": [{"sequence": ["1"]}] * 257}, JSON),  # over max_batch_requests
]


@pytest.mark.parametrize(("path", "body", "headers"), CASES)
def test_fast_path_answers_as_bentoml_does(served, sasrec_tag, path, body, headers):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    fast, bentoml_answer = both_ways(served, sasrec_tag, path, raw, headers)
    assert fast == bentoml_answer
    status, _, content, moved = fast
    assert status in (200, 400)
    if status == 400:
        assert json.loads(content)["error"] and moved == {"client_error": 1.0}
    else:
        assert sum(moved.values()) == (len(body["requests"]) if path == "/recommend_batch" else 1)


def test_fast_path_logs_one_line_per_refusal(served, caplog):
    _, client = served
    with caplog.at_level(logging.WARNING, logger="recbole_bento"):
        response = client.post("/recommend", json={"sequence": ["1"], "topk": "many"})
    assert response.status_code == 400
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "recbole_bento"] == [
        ("WARNING", "refused POST /recommend: topk: Input should be a valid integer")
    ]


def test_other_paths_and_methods_reach_bentoml(served):
    service, client = served
    assert service.FAST_ROUTES.path is not None
    assert client.post("/model_info", json={}).json()["item_count"] > 0
    assert client.get("/recommend").status_code == 405
    assert "/recommend" in client.get("/docs.json").json()["paths"]


def test_fast_path_bypasses_bentoml_dispatch(served, monkeypatch):
    """With the fast path on, the @bentoml.api methods are not called at all."""
    service, client = served

    async def unreachable(*args: object) -> None:
        raise AssertionError("reached the @bentoml.api method")

    monkeypatch.setattr(service.Recommender.inner, "_respond", unreachable)
    assert client.post("/recommend", json={"sequence": ["1"]}).status_code == 200
    path = service.FAST_ROUTES.path
    service.FAST_ROUTES.serve(None)
    try:
        assert client.post("/recommend", json={"sequence": ["1"]}).status_code == 500
    finally:
        service.FAST_ROUTES.serve(path)


def test_unexpected_error_is_bentomls_500(served, sasrec_tag, monkeypatch):
    service, _ = served

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    planner = service.FAST_ROUTES.path.registry.current.variants["default"].planner
    monkeypatch.setattr(planner, "plan", broken)
    fast, bentoml_answer = both_ways(served, sasrec_tag, "/recommend", b'{"sequence": ["1"]}', JSON)
    assert fast == bentoml_answer
    assert fast[0] == 500 and fast[3] == {"server_error": 1.0}
