"""Issue 5: hostile and broken requests get the documented status and one actionable sentence, never
a 500, and the service answers the next good request correctly. The table below is docs/errors.md's:
a test checks that every row is documented there with the same status."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import ROOT, serving

DOCS = ROOT / "docs" / "errors.md"
GOOD = {"sequence": ["242", "302", "377"], "topk": 5}


@dataclass
class Case:
    name: str  # the docs/errors.md row
    body: Any  # JSON-able, or bytes sent as they are
    status: int
    fragment: str  # must appear in the answer's "error" (or in the body for 2xx)
    path: str = "/recommend"
    headers: dict[str, str] | None = None
    check: Callable[[dict], None] | None = None  # extra checks on a 2xx answer


def _fallback(unknown: list[str]) -> Callable[[dict], None]:
    def check(answer: dict) -> None:
        assert answer["fallback"] == "popular" and answer["unknown_items"] == unknown
        assert len(answer["item_list"]) == 10

    return check


def _empty(answer: dict) -> None:
    assert answer["item_list"] == [] and answer["score_list"] == []


def _chunks(total: int, size: int = 65536):
    for _ in range(total // size):
        yield b" " * size


CASES = [
    Case("not JSON", b"hello", 400, "the body is not valid JSON"),
    Case("empty body", b"", 400, "sequence: Field required"),
    Case("JSON that is not an object", b"[1, 2]", 400, "body: Input should be an object"),
    Case("JSON null", b"null", 400, "body: Input should be an object"),
    Case("missing sequence", {"topk": 5}, 400, "sequence: Field required"),
    Case("sequence is null", {"sequence": None}, 400, "sequence: Input should be a valid array"),
    Case("sequence is a string", {"sequence": "242 302"}, 400, "sequence: Input should be a valid array"),
    Case("nested list", {"sequence": [["242"]]}, 400, "sequence[0]: Input should be a valid integer"),
    Case("null id", {"sequence": [None]}, 400, "sequence[0]: Input should be a valid integer"),
    Case("fractional id", {"sequence": [24.2]}, 400, "sequence[0]: Input should be a valid integer"),
    Case("boolean id", {"sequence": [True]}, 400, "sequence[0]: Input should be a valid integer"),
    Case("empty string id", {"sequence": [""]}, 400, "String should have at least 1 character"),
    Case("id longer than max_id_length", {"sequence": ["x" * 257]}, 400, "at most 256 characters"),
    Case("unknown field", {**GOOD, "top_k": 5}, 400, "top_k: Extra inputs are not permitted"),
    Case("topk 0", {**GOOD, "topk": 0}, 400, "topk: Input should be greater than or equal to 1"),
    Case("topk negative", {**GOOD, "topk": -3}, 400, "topk: Input should be greater than or equal to 1"),
    Case("topk huge", {**GOOD, "topk": 10**30}, 400, "topk: Input should be less than or equal to 1000"),
    Case("topk fractional", {**GOOD, "topk": 2.5}, 400, "topk: Input should be a valid integer"),
    Case("topk as a string", {**GOOD, "topk": "5"}, 400, "topk: Input should be a valid integer"),
    Case("exclude_seen not a boolean", {**GOOD, "exclude_seen": "yes"}, 400, "exclude_seen: Input should be"),
    Case("user_id an object", {**GOOD, "user_id": {}}, 400, "user_id: Input should be a valid integer"),
    Case("history over max_history", {"sequence": ["242"] * 10_001}, 400, "at most 10000 items"),
    Case("invalid UTF-8", b'{"sequence": ["\xff\xfe"]}', 400, "the body is not valid JSON"),
    Case("lone surrogate escape", b'{"sequence": ["\\ud800"]}', 400, "the body is not valid JSON"),
    Case("deeply nested JSON", b'{"sequence": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "not valid JSON"),
    Case(
        "form-encoded body",
        b"sequence=242",
        400,
        "sequence: Input should be a valid list",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Case("body over max_body_bytes", b"[" + b" " * (4 * 2**20) + b"]", 413, "the limit is 4194304 bytes"),
    Case("chunked body over max_body_bytes", _chunks, 413, "the limit is 4194304 bytes"),
    Case(
        "unknown ids only",
        {"sequence": ["no-such-item", 99999]},
        200,
        "",
        check=_fallback(["no-such-item", "99999"]),
    ),
    Case(
        "ids that only look odd",
        {"sequence": ["\x00", "é€", "😀", "\u202e", "%00"]},
        200,
        "",
        check=_fallback(["\x00", "é€", "😀", "\u202e", "%00"]),
    ),
    Case("empty sequence", {"sequence": []}, 200, "", check=_fallback([])),
    Case("duplicated ids", {"sequence": ["242", "242", 242]}, 200, '"fallback":null'),
    Case("candidates all unknown", {**GOOD, "candidates": ["no-such-item"]}, 200, "", check=_empty),
    Case("exclude of unknown ids", {**GOOD, "exclude": ["no-such-item"]}, 200, '"fallback":null'),
    Case("batch body is a list", [GOOD], 400, "body: Input should be an object", path="/recommend_batch"),
    Case(
        "batch over max_batch_requests",
        {"requests": [GOOD] * 257},
        400,
        "at most 256 requests per batch, got 257",
        path="/recommend_batch",
    ),
    Case(
        "batch entry invalid",
        {"requests": [GOOD, {"topk": 1}]},
        400,
        "requests[1].sequence: Field required",
        path="/recommend_batch",
    ),
    Case(
        "batch requests null",
        {"requests": None},
        400,
        "requests: Input should be a valid array",
        path="/recommend_batch",
    ),
    Case("empty batch", {"requests": []}, 200, '{"results": []}', path="/recommend_batch"),
]


def send(url: str, case: Case) -> httpx.Response:
    headers = case.headers or {"content-type": "application/json"}
    if callable(case.body):
        content = case.body(4 * 2**20 + 65536)  # no Content-Length: sent chunked
    elif isinstance(case.body, bytes):
        content = case.body
    else:
        content = json.dumps(case.body).encode()
    return httpx.post(f"{url}{case.path}", content=content, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def good_answer(sasrec_server) -> dict:
    response = httpx.post(f"{sasrec_server}/recommend", json=GOOD, timeout=60)
    assert response.status_code == 200
    return response.json()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_table(sasrec_server, good_answer, case):
    response = send(sasrec_server, case)
    assert response.status_code == case.status, response.text[:500]
    if case.status >= 400:
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str), body
        assert case.fragment in body["error"], body
    else:
        assert case.fragment in response.text
        if case.check:
            case.check(response.json())
    # the service is unharmed: the next good request gets the same answer as before
    again = httpx.post(f"{sasrec_server}/recommend", json=GOOD, timeout=60)
    assert again.status_code == 200 and again.json() == good_answer


def test_errors_md_documents_every_case():
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].isdigit():
            rows[cells[0].strip("`")] = int(cells[1])
    missing = {c.name: c.status for c in CASES if rows.get(c.name) != c.status}
    assert missing == {}, f"docs/errors.md lacks these rows (or gives another status): {missing}"


# ------------------------------------------------------------------ limits from the environment

LIMITS = {
    "RECBOLE_BENTO_MAX_CONCURRENCY": "2",
    "RECBOLE_BENTO_RETRY_AFTER_S": "3",
    "RECBOLE_BENTO_REQUEST_TIMEOUT_S": "2",
    "RECBOLE_BENTO_MAX_BODY_BYTES": "20000",
    "RECBOLE_BENTO_MAX_BATCH_REQUESTS": "4",
    "RECBOLE_BENTO_MAX_HISTORY": "50",
    "RECBOLE_BENTO_MAX_TOPK": "20",
}


@pytest.fixture(scope="module")
def limited_server(sasrec_tag):
    with serving(sasrec_tag, **LIMITS) as url:
        yield url


def test_limits_come_from_the_environment(limited_server):
    url = limited_server
    info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
    assert info["limits"] == {
        "max_history": 50,
        "max_topk": 20,
        "max_batch_requests": 4,
        "max_body_bytes": 20000,
        "max_concurrency": 2,
        "request_timeout_s": 2,
    }
    cases = [
        ({"sequence": ["242"] * 51}, 400, "at most 50 items"),
        ({"sequence": ["242"], "topk": 21}, 400, "less than or equal to 20"),
        ({"sequence": ["x" * 20_000]}, 413, "the limit is 20000 bytes (RECBOLE_BENTO_MAX_BODY_BYTES)"),
    ]
    for body, status, fragment in cases:
        response = httpx.post(f"{url}/recommend", json=body, timeout=30)
        assert response.status_code == status and fragment in response.json()["error"], response.text
    batch = httpx.post(f"{url}/recommend_batch", json={"requests": [GOOD] * 5}, timeout=30)
    assert batch.status_code == 400 and batch.json() == {"error": "at most 4 requests per batch, got 5"}


def test_over_max_concurrency_is_429_with_retry_after(limited_server):
    url = limited_server
    body = {"requests": [{"sequence": ["242", "302"] * 25, "topk": 20}] * 4}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(c.post("/recommend_batch", json=body) for _ in range(32)))

    statuses: dict[int, int] = {}
    for _ in range(5):  # a burst of 32 against a limit of 2 overlaps at once; retry a slow start
        for response in asyncio.run(burst()):
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 429:
                assert response.headers["retry-after"] == "3"
                assert "retry after 3 s" in response.json()["error"]
        if statuses.get(429):
            break
    assert set(statuses) == {200, 429} and statuses[200] >= 2, statuses
    assert httpx.post(f"{url}/recommend_batch", json=body, timeout=30).status_code == 200


def test_request_timeout_is_504(limited_server):
    """A request not answered within RECBOLE_BENTO_REQUEST_TIMEOUT_S (here: a body that never
    arrives) gets 504, and its slot is freed."""
    port = int(limited_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 100\r\n\r\n{"sequence": '
        )
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 504"), answer
    assert b"Not able to process the request in 2 seconds" in answer
    assert 1.5 < waited < 10
    for _ in range(3):  # the timed-out request does not hold one of the 2 concurrency slots
        assert httpx.post(f"{limited_server}/recommend", json=GOOD, timeout=30).status_code == 200


# ------------------------------------------------------------------ fuzzing from /docs.json


def test_schemathesis_fuzz(sasrec_server):
    """Positive and negative cases generated from the service's own OpenAPI document: no 5xx, and
    every answer (200 or 400) conforms to the schema the document publishes."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import DataGenerationMethod
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.from_uri(f"{sasrec_server}/docs.json", base_url=sasrec_server)
    checks = (
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    )
    seen: dict[str, dict[int, int]] = {}
    for path in ("/recommend", "/recommend_batch"):
        operation = schema[path]["POST"]
        cases = st.one_of(
            operation.as_strategy(data_generation_method=DataGenerationMethod.positive),
            operation.as_strategy(data_generation_method=DataGenerationMethod.negative),
        )
        statuses = seen.setdefault(path, {})

        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def fuzz(case) -> None:
            response = case.call(timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1  # noqa: B023
            case.validate_response(response, checks=checks)

        fuzz()
    for path, statuses in seen.items():
        assert sum(statuses.values()) >= 100 and statuses.get(200) and statuses.get(400), (path, statuses)
        assert set(statuses) <= {200, 400}, (path, statuses)
