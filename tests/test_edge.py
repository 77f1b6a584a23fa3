"""The public service's request path in process, with stub models: batching, planning, the
popularity fallback, /similar_items and filters down the same path, the answers to a dead or
overloaded model, the topology rule and the drain header. No server: what needs one is in
test_load_shutdown.py."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recbole_bento.core import attributes
from recbole_bento.core.models import spec_for
from recbole_bento.core.planner import Planner, RequestError
from recbole_bento.core.ranking import BatchMask, FilterCompiler, RankQuery, RankResult
from recbole_bento.edge import lifecycle, observability, topology
from recbole_bento.edge.batcher import Batcher, Overloaded
from recbole_bento.edge.request_path import (
    SIMILAR_ITEMS,
    LocalModel,
    ModelUnavailable,
    RemoteModel,
    RequestPath,
    single_model,
)
from recbole_bento.schemas import RecommendRequest, SimilarItemsRequest, SimilarItemsResponse
from recbole_bento.settings import Settings

ITEMS = ["[PAD]", "a", "b", "c", "d", "e"]
POPULARITY = np.array([0, 5, 40, 30, 20, 10], dtype=np.float32)
# item_attributes.json as the importer stores it: colour x for a, c, e; y for b, d
COLOURS = {"colour": {"type": "token", "vocab": ["x", "y"], "values": [-1, 0, 1, 0, 1, 0]}}


def planner(model: str = "SASRec", directory: Path | None = None) -> Planner:
    """A Planner over ITEMS; with the item attributes stored in *directory* if given."""
    artifact = SimpleNamespace(
        spec=spec_for(model),
        item_tokens=ITEMS,
        user_tokens=["[PAD]", "u1"],
        popularity=POPULARITY,
        path=directory or Path(__file__).parent,  # no item_attributes.json there: no attributes
        window=50,  # the most recent items the model reads
    )
    return Planner(artifact, max_topk=1000)  # type: ignore[arg-type]


class StubModel:
    """Ranks by internal id, descending, under the queries' masks (the engine's BatchMask, filters
    compiled by *compile_filter*); records each call's batch."""

    def __init__(self, compile_filter: FilterCompiler | None = None) -> None:
        self.calls: list[list[RankQuery]] = []
        self.compile_filter = compile_filter

    def rank_many(self, queries: list[RankQuery]) -> list[RankResult]:
        self.calls.append(list(queries))
        mask = BatchMask(queries, len(ITEMS), compile_filter=self.compile_filter)
        ids = torch.arange(len(ITEMS) - 1, 0, -1).expand(len(queries), -1)
        out = []
        for q, blocked in zip(queries, mask.blocked(ids), strict=True):
            items = ids[0][~blocked].tolist()[: q.topk]
            out.append(RankResult(items, [float(i) for i in items]))
        return out


def request(**fields: object) -> RecommendRequest:
    return RecommendRequest(**{"sequence": ["a"], "topk": 3, **fields})


def similar(**fields: object) -> SimilarItemsRequest:
    return SimilarItemsRequest(**{"items": ["a"], "topk": 3, **fields})


def path_with(model, planned: Planner | None = None, tag: str = "stub:1", **kw) -> RequestPath:
    options = {"max_batch": 64, "max_wait_s": 10.0, "concurrency": 1} | kw
    return RequestPath(single_model(planned or planner(), model, model_tag=tag, **options), retry_after_s=2)


# ------------------------------------------------------------------ batcher


def test_batcher_ranks_a_lone_call_at_once_and_batches_concurrent_ones():
    stub = StubModel()

    everyone_called = asyncio.Event()

    async def rank_many(queries):
        if stub.calls:  # after the lone call, a model call stays in flight until all 20 are made
            await everyone_called.wait()
        return stub.rank_many(queries)

    batched = Batcher(rank_many, max_batch=8, max_wait_s=10)

    async def call(k: int) -> RankResult:
        if k == 20:
            everyone_called.set()  # the held call resumes only after this one is queued
        return await batched(RankQuery([1], k))

    async def scenario():
        alone = await batched(RankQuery([1], 1))
        many = await asyncio.gather(*(call(k) for k in range(1, 21)))
        return alone, many

    alone, many = asyncio.run(scenario())
    assert alone.items == [5]
    assert [len(r.items) for r in many] == [min(k, 5) for k in range(1, 21)]  # each its own answer
    sizes = [len(c) for c in stub.calls]
    assert sizes[0] == 1 and sum(sizes) == 21 and max(sizes) == 8 and len(sizes) <= 5, sizes


def test_batcher_fails_every_call_of_a_failed_batch_and_times_out_waiters():
    async def broken(queries):
        raise ModelUnavailable("gone")

    async def slow(queries):
        await asyncio.sleep(0.2)
        return [RankResult([], []) for _ in queries]

    async def scenario():
        batched = Batcher(broken, max_batch=8, max_wait_s=10)
        failed = await asyncio.gather(*(batched(RankQuery([1], 1)) for _ in range(3)), return_exceptions=True)
        late = Batcher(slow, max_batch=1, max_wait_s=0.05)
        waited = await asyncio.gather(*(late(RankQuery([1], 1)) for _ in range(3)), return_exceptions=True)
        return failed, waited

    failed, waited = asyncio.run(scenario())
    assert all(isinstance(e, ModelUnavailable) for e in failed), failed
    assert isinstance(waited[0], RankResult)  # taken at once; the others waited 0.2 s > 0.05 s
    assert [type(e) for e in waited[1:]] == [Overloaded, Overloaded]


# ------------------------------------------------------------------ planning and fallback


def test_request_path_answers_in_external_ids_with_masks_and_fallback():
    stub = StubModel()
    path = path_with(LocalModel(stub.rank_many, "cpu"))
    reqs = [
        request(sequence=["a", "zz"], topk=2, exclude=["e"]),
        request(sequence=["unknown"], topk=3, exclude=["b"]),
        request(sequence=["c"], topk=1),
    ]
    answers = asyncio.run(path.answer(reqs))
    assert answers[0].item_list == ["d", "c"] and answers[0].unknown_items == ["zz"]
    assert answers[0].fallback is None
    # no known history item: popularity, masked like the model's answers
    assert answers[1].item_list == ["c", "d", "e"] and answers[1].fallback == "popular"
    assert answers[1].score_list == [30.0, 20.0, 10.0]
    assert answers[2].item_list == ["e"]
    assert [len(c) for c in stub.calls] == [2]  # a batch body is one model call, fallbacks left out


def test_request_path_refuses_what_the_model_cannot_do_before_batching():
    stub = StubModel()
    path = path_with(LocalModel(stub.rank_many, "cpu"), planner("Caser"), tag="t", max_batch=8, max_wait_s=1)
    with pytest.raises(RequestError, match="needs a user_id"):
        asyncio.run(path.answer([request(user_id="u1"), request()]))
    with pytest.raises(RequestError, match="topk must be between 1 and 5"):
        asyncio.run(path_with(LocalModel(stub.rank_many, "cpu")).answer([request(topk=6)]))
    assert stub.calls == []


def test_respond_bodies_single_and_batch():
    path = path_with(LocalModel(StubModel().rank_many, "cpu"))

    async def scenario():
        one = await path.respond([request(topk=1)], batch=False)
        many = await path.respond([request(topk=1), request(sequence=[], topk=1)], batch=True)
        alike = await path.respond([similar(topk=1)], batch=False, kind=SIMILAR_ITEMS)
        return one, many, alike

    one, many, alike = asyncio.run(scenario())  # one event loop, as in a worker
    assert one.status_code == 200 and json.loads(one.body) == {
        "item_list": ["e"],
        "score_list": [5.0],
        "unknown_items": [],
        "fallback": None,
        "because": None,
        "model": "stub:1",
        "variant": "default",
        "retrieval": "exact",
    }
    results = json.loads(many.body)["results"]
    assert [r["item_list"] for r in results] == [["e"], ["b"]] and results[1]["fallback"] == "popular"
    assert alike.status_code == 200 and json.loads(alike.body) == {
        "item_list": ["e"],
        "score_list": [5.0],
        "unknown_items": [],
        "fallback": None,
        "model": "stub:1",
        "variant": "default",
        "retrieval": "exact",
    }


# ------------------------------------------------------------------ /similar_items and filters


def test_similar_items_share_the_batches_of_recommendations():
    stub = StubModel()
    path = path_with(LocalModel(stub.rank_many, "cpu"))

    async def scenario():
        return await asyncio.gather(
            path.answer([request(sequence=["a"], topk=2)]),
            path.answer([similar(items=["e", "zz"], topk=2, exclude=["c"])], kind=SIMILAR_ITEMS),
            path.answer([similar(items=["zz"], topk=2, exclude=["b"])], kind=SIMILAR_ITEMS),
        )

    (recommended,), (alike,), (unknown,) = asyncio.run(scenario())
    assert [[q.kind for q in c] for c in stub.calls] == [["next", "similar"]]  # one model call
    assert type(alike) is SimilarItemsResponse and "because" not in alike.model_dump()
    # the query items never come back, nor exclude; unknown ones are listed
    assert alike.item_list == ["d", "b"] and alike.unknown_items == ["zz"] and alike.fallback is None
    assert recommended.item_list == ["e", "d"] and recommended.because is None
    # no known query item: popularity, masked as the model's answers are, no model call
    assert unknown.item_list == ["c", "d"] and unknown.fallback == "popular"
    assert unknown.score_list == [30.0, 20.0]


def test_similar_items_and_explain_refused_before_batching_without_an_item_table():
    stub = StubModel()
    path = path_with(LocalModel(stub.rank_many, "cpu"), planned=planner("RepeatNet"))
    with pytest.raises(RequestError, match="/similar_items is not available for RepeatNet"):
        asyncio.run(path.answer([similar()], kind=SIMILAR_ITEMS))
    with pytest.raises(RequestError, match="explain is not available for RepeatNet"):
        asyncio.run(path.answer([request(), request(explain=True)]))
    assert stub.calls == []


@pytest.fixture
def colours(tmp_path: Path) -> Planner:
    (tmp_path / attributes.FILE).write_text(json.dumps(COLOURS))
    return planner(directory=tmp_path)


def test_filters_reach_the_model_normalised_and_mask_the_fallback_alike(colours, monkeypatch):
    stub = StubModel(colours.compile_filter)
    path = path_with(LocalModel(stub.rank_many, "cpu"), planned=colours)
    observed = []
    monkeypatch.setattr(observability, "filtered", lambda tag, variant, share: observed.append((tag, share)))

    async def scenario():
        recommended = await path.answer(
            [
                request(topk=5, filters={"colour": ["x", "x"]}),
                request(sequence=["zz"], filters={"colour": ["y"]}),
            ]
        )
        alike = await path.answer([similar(items=["c"], filters={"colour": ["x"]})], kind=SIMILAR_ITEMS)
        return recommended, alike

    (model, fallback), (alike,) = asyncio.run(scenario())
    assert [q.filters for c in stub.calls for q in c] == [{"colour": ["x"]}] * 2
    assert model.item_list == ["e", "c", "a"]  # fewer than topk pass: all of them, nothing else
    assert fallback.item_list == ["b", "d"] and fallback.fallback == "popular"
    assert alike.item_list == ["e", "a"]
    assert observed == [("stub:1", 3 / 5), ("stub:1", 2 / 5), ("stub:1", 3 / 5)]


def test_bad_filters_refused_before_batching_naming_the_fields(colours):
    stub = StubModel(colours.compile_filter)
    path = path_with(LocalModel(stub.rank_many, "cpu"), planned=colours)
    with pytest.raises(RequestError, match=r"unknown field 'size'.*filterable fields: colour \(token\)"):
        asyncio.run(path.answer([request(), request(filters={"size": ["L"]})]))
    with pytest.raises(RequestError, match="this model has no filterable item attributes"):
        asyncio.run(path_with(LocalModel(stub.rank_many, "cpu")).answer([request(filters={"colour": ["x"]})]))
    assert stub.calls == []
    # an empty filter sets no condition: no filter, with attributes or without
    for planned in (colours, planner()):
        (answer,) = asyncio.run(
            path_with(LocalModel(stub.rank_many, "cpu"), planned).answer([request(filters={})])
        )
        assert answer.item_list == ["e", "d", "c"]
    assert [q.filters for c in stub.calls for q in c] == [None, None]


# ------------------------------------------------------------------ a dead model worker


class DeadRanker:
    """A Ranker proxy whose worker was killed: calls fail as aiohttp's do, readyz does not answer."""

    def __init__(self) -> None:
        self.alive = False
        self.calls = 0

    async def rank(self, queries):
        self.calls += 1
        if not self.alive:
            raise ConnectionResetError("Server disconnected")
        return StubModel().rank_many(queries)

    async def device(self):
        return "cpu"

    async def is_ready(self, timeout):
        if not self.alive:
            await asyncio.sleep(timeout + 1)  # the arbiter's socket: connects, never answers
        return True


def test_dead_model_worker_gives_503_with_retry_after_one_log_line_each_way(caplog):
    ranker = DeadRanker()
    remote = RemoteModel(ranker.rank, ranker.device, ranker.is_ready, retry_after_s=2,
                         transport_errors=(OSError,))  # fmt: skip
    remote.PROBE_INTERVAL_S = 0.01
    path = path_with(remote)

    async def scenario():
        refused = [await path.respond([request()], batch=False) for _ in range(20)]
        refused.append(await path.respond([similar()], batch=False, kind=SIMILAR_ITEMS))
        ready_while_down = await remote.ready()
        calls_while_down = ranker.calls
        ranker.alive = True
        for _ in range(300):
            if remote.down_since is None:
                break
            await asyncio.sleep(0.01)
        back = await path.respond([request(topk=1)], batch=False)
        return refused, ready_while_down, calls_while_down, back

    with caplog.at_level(logging.INFO, logger="recbole_bento"):
        refused, ready_while_down, calls_while_down, back = asyncio.run(scenario())
    assert {r.status_code for r in refused} == {503}
    assert {r.headers["retry-after"] for r in refused} == {"2"}
    assert json.loads(refused[0].body) == {"error": "the model worker is restarting: retry after 2 s"}
    assert calls_while_down == 1  # the first failure marks it down: no call hangs on it after
    assert ready_while_down is False
    assert back.status_code == 200 and json.loads(back.body)["item_list"] == ["e"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "unreachable" in lines[0] and "is back after" in lines[1]


def test_unresponsive_model_worker_fails_readiness_within_a_second():
    ranker = DeadRanker()
    remote = RemoteModel(ranker.rank, ranker.device, ranker.is_ready, retry_after_s=1,
                         transport_errors=(OSError,))  # fmt: skip

    async def scenario():
        ranker.alive = True
        assert await remote.ready() is True
        ranker.alive = False  # killed: its /readyz no longer answers
        loop = asyncio.get_running_loop()
        start = loop.time()
        ready = await remote.ready()
        took = loop.time() - start
        remote._probe.cancel()
        return ready, took

    ready, took = asyncio.run(scenario())
    assert ready is False and took < 1.0
    assert remote.down_since is not None


def test_a_model_worker_still_starting_is_not_ready_and_not_down(caplog):
    """Before any worker has answered (the public worker up first), a silent /readyz means
    "starting": readiness fails, but nothing is declared down or logged; once it answers, ready."""
    ranker = DeadRanker()
    remote = RemoteModel(ranker.rank, ranker.device, ranker.is_ready, retry_after_s=1,
                         transport_errors=(OSError,))  # fmt: skip

    async def scenario():
        starting = await remote.ready()
        ranker.alive = True
        return starting, await remote.ready()

    with caplog.at_level(logging.INFO, logger="recbole_bento"):
        starting, up = asyncio.run(scenario())
    assert starting is False and up is True
    assert remote.down_since is None and remote._probe is None
    assert not caplog.records


def test_calls_hanging_on_a_dead_worker_get_503_once_it_is_known_down():
    """A call sent after the kill hangs on the arbiter's socket; the readiness probe that finds the
    worker gone turns it into the same 503 as the calls that follow, instead of a hang."""
    ranker = DeadRanker()

    sent = asyncio.Event()

    async def hang(queries):
        sent.set()
        await asyncio.sleep(3600)  # the arbiter's socket: connects, never answers

    remote = RemoteModel(hang, ranker.device, ranker.is_ready, retry_after_s=2,
                         transport_errors=(OSError,))  # fmt: skip
    path = path_with(remote)

    async def scenario():
        pending = asyncio.ensure_future(path.respond([request()], batch=False))
        await asyncio.wait_for(sent.wait(), 5)  # the call is on its way to the dead worker
        assert not pending.done()
        ready = await remote.ready()  # /readyz: no answer within 0.5 s -> down
        answer = await asyncio.wait_for(pending, 1.0)
        remote._probe.cancel()
        return ready, answer

    ready, answer = asyncio.run(scenario())
    assert ready is False
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
    assert json.loads(answer.body) == {"error": "the model worker is restarting: retry after 2 s"}


# ------------------------------------------------------------------ topology


GIB = 2**30


@pytest.mark.parametrize(
    ("env", "device", "cores", "copy_gib", "memory_gib", "expected"),
    [
        ({}, "cpu", 2, 0.4, 24, ("inprocess", 2, 0, 1)),  # ml-100k
        ({}, "cpu", 2, 1.4, 24, ("inprocess", 2, 0, 1)),  # 1M items
        ({}, "cpu", 8, 0.4, 24, ("inprocess", 8, 0, 1)),
        ({}, "cpu", 16, 1.4, 24, ("split", 2, 2, 8)),  # 16 copies would not fit in 12 GiB
        ({}, "cpu", 16, 8, 24, ("split", 2, 1, 16)),  # nor would two
        ({}, "cpu", 2, 1.4, 4, ("split", 2, 1, 2)),  # a 4 GiB container
        ({}, "cuda", 8, 0.4, 24, ("split", 2, 1, 8)),
        ({"API_WORKERS": "4"}, "cpu", 16, 1.4, 24, ("inprocess", 4, 0, 4)),  # 4 copies fit
        ({"TOPOLOGY": "split", "API_WORKERS": "1"}, "cpu", 2, 0.1, 24, ("split", 1, 2, 1)),
        ({"TOPOLOGY": "inprocess", "TORCH_THREADS": "2"}, "cuda", 2, 1.4, 24, ("inprocess", 2, 0, 2)),
    ],
)
def test_topology_default_follows_device_and_model_memory(env, device, cores, copy_gib, memory_gib, expected):
    settings = Settings.from_env({f"RECBOLE_BENTO_{k}": v for k, v in env.items()})
    layout = topology.choose(settings, device, cores, int(copy_gib * GIB), int(memory_gib * GIB))
    assert (layout.topology, layout.api_workers, layout.ranker_workers, layout.torch_threads) == expected
    holders = layout.ranker_workers if layout.split else layout.api_workers
    if not env:  # the defaults never put more torch threads than cores, nor more copies than fit
        assert holders * layout.torch_threads <= cores
        if device == "cpu":
            assert holders * copy_gib <= max(copy_gib, memory_gib / 2)


def test_topology_says_why_in_its_log_line():
    layout = topology.choose(Settings(), "cpu", 2, int(1.4 * GIB), 4 * GIB)
    assert layout.describe() == (
        "topology split (CPU, 2 model copies of ~1.4 GiB exceed half of 4.0 GiB: shared model copies): "
        "2 API worker(s), 1 model worker(s), 2 torch thread(s) each"
    )


def test_model_memory_estimate_and_limits_read_from_this_machine():
    assert topology.model_copy_bytes(263 * 2**20) == topology.RUNTIME_BYTES + 4 * 263 * 2**20
    # the same value each call (every BentoML process computes the layout on its own)
    assert topology.available_memory() == topology.available_memory() > 0
    assert topology.available_cores() >= 1


def test_topology_refuses_an_unknown_value():
    with pytest.raises(ValueError, match="RECBOLE_BENTO_TOPOLOGY='both': use auto, split or inprocess"):
        topology.choose(Settings(topology="both"), "cpu", 2, GIB, 8 * GIB)


# ------------------------------------------------------------------ drain


def test_drain_middleware_closes_connections_only_once_draining(monkeypatch):
    async def app(scope, receive, send):
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"connection", b"keep-alive")]}
        )
        await send({"type": "http.response.body", "body": b"{}"})

    def heads():
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(lifecycle.DrainMiddleware(app)({"type": "http"}, None, send))
        return sent[0]["headers"]

    assert heads() == [(b"connection", b"keep-alive")]
    monkeypatch.setattr(lifecycle, "_draining", type("Set", (), {"is_set": staticmethod(lambda: True)})())
    assert heads() == [(b"connection", b"close")]
    assert lifecycle.draining()


def test_lifecycle_install_says_when_it_cannot_wrap(caplog):
    with caplog.at_level(logging.WARNING, logger="recbole_bento"):
        assert lifecycle.install("svc", 5, outlive_callers=False) is False
    assert "svc: graceful stop not installed" in caplog.text and "not uvicorn's" in caplog.text
