"""Model lifecycle in process: the routes file (and hostile ones), the sticky assignment, variants
with their own catalogues down the request path, swaps (atomic, failed ones changing nothing, the
state file every worker follows), the admin endpoint's authentication, the shadow model and the
memory of a swapped-out model. The real server (two variants, a swap under load, SIGHUP) is in
test_routes_server.py."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from recbole_bento.core import routes as routing
from recbole_bento.core.models import spec_for
from recbole_bento.core.planner import Planner, RequestError
from recbole_bento.core.ranking import RankQuery, RankResult
from recbole_bento.edge import guard, variants
from recbole_bento.edge.request_path import SIMILAR_ITEMS, RequestPath, ranked
from recbole_bento.schemas import RecommendRequest, SimilarItemsRequest

ROUTES_YAML = """
variants:
  control:   {model: "sasrec-ml-100k:v1", weight: 90}
  treatment: {model: "sasrec-ml-100k:v2", weight: 10}
shadow: "gru4rec-ml-100k:v3"
salt: exp-42
"""


# ------------------------------------------------------------------ the routes file


def test_routes_parse_from_yaml_and_json_alike(tmp_path: Path):
    routes = routing.parse(ROUTES_YAML)
    assert routes.names() == ["control", "treatment"]
    assert [(v.model, v.weight) for v in routes.variants] == [
        ("sasrec-ml-100k:v1", 90),
        ("sasrec-ml-100k:v2", 10),
    ]
    assert routes.shadow == "gru4rec-ml-100k:v3" and routes.salt == "exp-42"
    as_json = tmp_path / "routes.json"
    as_json.write_text(json.dumps(routes.as_dict()))
    assert routing.read(as_json) == routes
    # a model name alone (its latest version) and the short form `name: tag`, weight 1
    short = routing.parse("variants: {a: sasrec, b: {model: 'gru:v1', weight: 0}}")
    assert [(v.model, v.weight) for v in short.variants] == [("sasrec", 1.0), ("gru:v1", 0.0)]
    assert routing.single("m:1").names() == [routing.DEFAULT_VARIANT]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "expected a mapping with 'variants', got NoneType"),
        ("[1, 2]", "expected a mapping"),
        ("variants: {}", "'variants' must map variant names"),
        ("variants: [a, b]", "'variants' must map variant names"),
        ("variants: {a: m:1}\nextra: 1", r"unknown field\(s\) \['extra'\]"),
        ("variants: {a: {model: m, weight: 1, gpu: 2}}", r"unknown field\(s\) \['gpu'\]"),
        ("variants: {a: {weight: 1}}", "no model"),
        ("variants: {'a b': m}", "variant name 'a b' must be"),
        ("variants: {'../x': m}", "variant name '../x' must be"),
        ("variants: {1: m}", "variant name 1 must be"),
        ("variants: {a: '../../etc/passwd'}", "is not a BentoML tag"),
        ("variants: {a: 'm:v1:extra'}", "is not a BentoML tag"),
        ("variants: {a: {model: [m]}}", "must be a BentoML tag"),
        ("variants: {a: {model: m, weight: -1}}", "weight must be >= 0"),
        ("variants: {a: {model: m, weight: .nan}}", "weight must be a number"),
        ("variants: {a: {model: m, weight: .inf}}", "weight must be a number"),
        ("variants: {a: {model: m, weight: true}}", "weight must be a number"),
        ("variants: {a: {model: m, weight: '5'}}", "weight must be a number"),
        ("variants: {a: {model: m, weight: 0}, b: {model: n, weight: 0}}", "add up to more than 0"),
        ("variants: {a: m}\nshadow: 5", "shadow must be a BentoML tag"),
        ("variants: {a: m}\nsalt: [1]", "salt must be a string"),
        ("variants: !!python/object/apply:os.system ['true']", "neither YAML nor JSON"),
        ("variants: {a: m", "neither YAML nor JSON"),
        ("[" * 5000, "neither YAML nor JSON"),
        ("variants: {" + ", ".join(f"v{i}: m" for i in range(17)) + "}", "at most 16 variants"),
    ],
)
def test_hostile_routes_are_refused_naming_the_field(text, error):
    with pytest.raises(routing.RoutesError, match=error):
        routing.parse(text, "routes.yaml")


def test_hostile_routes_files(tmp_path: Path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("variants: {a: m}\n" + "#" * routing.MAX_ROUTES_BYTES)
    with pytest.raises(routing.RoutesError, match=f"{huge}: larger than 65536 bytes"):
        routing.read(huge)
    with pytest.raises(routing.RoutesError, match="not a file"):
        routing.read(tmp_path)
    with pytest.raises(routing.RoutesError, match="not a file"):
        routing.read(tmp_path / "missing.yaml")
    with pytest.raises(routing.RoutesError, match="not a file"):
        routing.read("/dev/zero")  # would never end
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00variants")
    with pytest.raises(routing.RoutesError, match="not UTF-8"):
        routing.read(binary)
    aliases = tmp_path / "aliases.yaml"  # a billion laughs: references, never expanded here
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)
    ]
    aliases.write_text("\n".join(lines) + "\nvariants: {a: m}\n")
    with pytest.raises(routing.RoutesError, match=r"unknown field\(s\)"):
        routing.read(aliases)


# ------------------------------------------------------------------ assignment


def test_assignment_is_sticky_and_splits_by_the_weights():
    routes = routing.parse(ROUTES_YAML)
    keys = [f"user-{i}" for i in range(10_000)]
    first = [routes.assign(k) for k in keys]
    assert first == [routes.assign(k) for k in keys]  # the same key, the same variant
    share = first.count("treatment") / len(keys)
    assert abs(share - 0.10) < 0.01, share
    # another salt reshuffles the keys, with the same proportions
    other = routing.Routes(routes.variants, salt="exp-43")
    moved = sum(a != other.assign(k) for a, k in zip(first, keys, strict=True))
    assert moved > 1000 and abs([other.assign(k) for k in keys].count("treatment") / 1e4 - 0.10) < 0.01
    # weight 0 gets nothing; no key: a random draw with the weights' proportions
    assert {routing.parse("variants: {a: {model: m, weight: 0}, b: n}").assign(k) for k in keys[:500]} == {
        "b"
    }
    drawn = [routes.assign(None) for _ in range(10_000)]
    assert abs(drawn.count("treatment") / 1e4 - 0.10) < 0.02


def test_assignment_is_the_same_in_another_process():
    """A stable hash (sha256), never Python's per-process salted hash()."""
    keys = [f"k{i}" for i in range(200)] + ["", "ünïcode", "42"]
    script = (
        "import json, sys\n"
        "from recbole_bento.core import routes\n"
        f"r = routes.parse({ROUTES_YAML!r})\n"
        "print(json.dumps([r.assign(k) for k in json.loads(sys.stdin.read())]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(keys),
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    routes = routing.parse(ROUTES_YAML)
    assert json.loads(out.stdout) == [routes.assign(k) for k in keys]


# ------------------------------------------------------------------ variants down the request path


def planner(items: list[str], model: str = "SASRec") -> Planner:
    artifact = SimpleNamespace(
        spec=spec_for(model),
        item_tokens=["[PAD]", *items],
        user_tokens=["[PAD]", "u1"],
        popularity=np.arange(len(items) + 1, dtype=np.float32),
        path=Path(__file__).parent,  # no item attributes there
        window=50,
    )
    return Planner(artifact, max_topk=1000)  # type: ignore[arg-type]


class Stub:
    """A model that ranks by internal id, descending (or ascending), skipping the history; records
    its calls. With *gate*, every call waits for it."""

    def __init__(self, n_items: int, descending: bool = True, gate: asyncio.Event | None = None) -> None:
        self.n_items = n_items
        self.descending = descending
        self.gate = gate
        self.calls: list[list[RankQuery]] = []

    async def rank(self, queries):
        self.calls.append(list(queries))
        if self.gate is not None:
            await self.gate.wait()
        ids = list(range(self.n_items, 0, -1)) if self.descending else list(range(1, self.n_items + 1))
        out = []
        for q in queries:
            items = [i for i in ids if i not in q.history and i not in q.exclude][: q.topk]
            out.append(RankResult(items, [float(i) for i in items]))
        return out

    async def device(self):
        return "cpu"

    async def ready(self):
        return True


def loaded(tag: str, plan: Planner, stub: Stub) -> routing.Loaded[variants.Ranked]:
    return routing.Loaded(tag, plan, ranked(stub, 64, 10.0, 1, holds=stub), 1000, 0.0, 0.1)


def two_variants(gate: asyncio.Event | None = None):
    """control: items a..e; treatment: another catalogue (c..h), another order."""
    a = loaded("m:a", planner(list("abcde")), Stub(5, gate=gate))
    b = loaded("m:b", planner(list("cdefgh")), Stub(6, descending=False))
    routes = routing.parse(
        "variants: {control: {model: 'm:a', weight: 1}, treatment: {model: 'm:b', weight: 1}}"
    )
    served = {"control": routing.Served("control", 1.0, a), "treatment": routing.Served("treatment", 1.0, b)}
    return routing.Snapshot(1, routes, served, None, {"m:a": a, "m:b": b})


def recommend(**fields) -> RecommendRequest:
    return RecommendRequest(**{"sequence": ["c"], "topk": 2, **fields})


def test_each_variant_maps_ids_with_its_own_catalogue_and_says_which_answered():
    snapshot = two_variants()
    path = RequestPath(routing.Registry(snapshot), retry_after_s=1)
    key_a = next(f"k{i}" for i in range(100) if snapshot.routes.assign(f"k{i}") == "control")
    key_b = next(f"k{i}" for i in range(100) if snapshot.routes.assign(f"k{i}") == "treatment")

    async def scenario():
        answers = await path.answer(
            [
                recommend(assignment_key=key_a, sequence=["c", "h"]),  # h: not in control's catalogue
                recommend(assignment_key=key_b, sequence=["c", "h"]),
                recommend(variant="treatment", sequence=["a"]),  # a: not in treatment's catalogue
                recommend(user_id=key_a),  # user_id is the key when no assignment_key is sent
            ]
        )
        body = SimilarItemsRequest(items=["g"], topk=1, variant="treatment")
        return answers, await path.answer([body], kind=SIMILAR_ITEMS)

    (a, b, pinned, by_user), similar = asyncio.run(scenario())
    assert (a.model, a.variant, a.item_list, a.unknown_items) == ("m:a", "control", ["e", "d"], ["h"])
    assert (b.model, b.variant, b.item_list, b.unknown_items) == ("m:b", "treatment", ["d", "e"], [])
    assert (pinned.variant, pinned.fallback, pinned.unknown_items) == ("treatment", "popular", ["a"])
    assert by_user.variant == "control"
    assert (similar[0].model, similar[0].item_list) == ("m:b", ["c"])


def test_an_unknown_variant_is_refused_naming_the_known_ones_before_any_ranking():
    snapshot = two_variants()
    path = RequestPath(routing.Registry(snapshot), retry_after_s=1)
    with pytest.raises(
        RequestError, match="variant 'nope' is not served; the variants are: control, treatment"
    ):
        asyncio.run(path.answer([recommend(), recommend(variant="nope")]))
    assert all(not m.model.port.calls for m in snapshot.models.values())


def test_a_swap_lets_admitted_requests_finish_on_their_model():
    gate = asyncio.Event()
    before = two_variants(gate)
    registry = routing.Registry(before)
    path = RequestPath(registry, retry_after_s=1)
    c = loaded("m:c", planner(list("abcde")), Stub(5, descending=False))
    after = routing.Snapshot(
        2, routing.single("m:c"), {"default": routing.Served("default", 1.0, c)}, None, {"m:c": c}
    )

    async def scenario():
        admitted = asyncio.ensure_future(path.respond([recommend(variant="control")], batch=False))
        while not before.models["m:a"].model.port.calls:  # the request is at the model
            await asyncio.sleep(0.001)
        registry.publish(after)
        fresh = await path.respond([recommend()], batch=False)
        gate.set()
        return json.loads((await admitted).body), json.loads(fresh.body)

    old, new = asyncio.run(scenario())
    assert (old["model"], old["variant"], old["item_list"]) == (
        "m:a",
        "control",
        ["e", "d"],
    )  # what m:a answers
    assert (new["model"], new["variant"], new["item_list"]) == ("m:c", "default", ["a", "b"])


# ------------------------------------------------------------------ swaps: build, budget, host, state


def fake_loads(fail: set[str] = frozenset()):
    made: list[str] = []

    def load(tag: str) -> routing.Loaded[variants.Ranked]:
        if tag in fail:
            raise routing.SwapError(tag, "the sha256 of model.pt differs from the one recorded at import")
        made.append(tag)
        return loaded(tag, planner(list("abc")), Stub(3))

    return load, made


def build_with(load, budget: int = 0):
    def build(routes, generation, previous):
        return routing.build(
            routes, generation, load, resolve=lambda t: t if ":" in t else f"{t}:latest",
            estimate=lambda t: 1000, previous=previous, budget_bytes=budget,
        )  # fmt: skip

    return build


def test_build_reuses_loaded_models_and_refuses_what_exceeds_the_budget():
    load, made = fake_loads()
    first = build_with(load)(routing.parse("variants: {a: 'm:1', b: 'm:2'}\nshadow: m"), 1, None)
    assert made == ["m:1", "m:2", "m:latest"] and first.shadow is not None and first.shadow.tag == "m:latest"
    second = build_with(load)(routing.parse("variants: {x: 'm:2', y: 'm:3'}"), 2, first)
    assert made == ["m:1", "m:2", "m:latest", "m:3"]  # m:2 kept, not loaded again
    assert second.variants["x"].loaded is first.variants["b"].loaded
    with pytest.raises(routing.SwapError, match="over the budget") as refused:
        build_with(load, budget=3500)(routing.parse("variants: {a: 'm:4'}"), 3, first)  # 3 held + 1 new
    assert refused.value.budget and refused.value.model == "m:4" and made[-1] == "m:3"


def host_for(tmp_path: Path, load, snapshot=None) -> variants.Host:
    snapshot = snapshot or build_with(load)(routing.parse("variants: {a: 'm:1'}"), 0, None)
    return variants.Host(routing.Registry(snapshot), build_with(load), variants.StateFile(tmp_path))


def test_a_failed_swap_changes_nothing_and_publishes_nothing(tmp_path: Path, caplog):
    load, _ = fake_loads(fail={"m:bad"})
    host = host_for(tmp_path, load)
    before = host.registry.current
    with pytest.raises(routing.SwapError, match="m:bad: the sha256"):
        asyncio.run(host.propose(routing.parse("variants: {a: 'm:1', b: 'm:bad'}")))
    assert host.registry.current is before
    assert not host.state.path.exists()
    assert "routes swap: from a=m:1@1 to a=m:1@1,b=m:bad@1" in caplog.text and "failed: m:bad" in caplog.text


def test_a_swap_is_published_with_the_next_generation_and_followed_by_other_workers(tmp_path: Path):
    load, _ = fake_loads()
    here, there = host_for(tmp_path, load), host_for(tmp_path, load)
    there_before = there.registry.current

    async def scenario():
        watching = asyncio.ensure_future(there.watch())
        await here.propose(routing.parse("variants: {a: 'm:1', b: {model: 'm:2', weight: 3}}"))
        for _ in range(200):
            if there.registry.current.generation == 1:
                break
            await asyncio.sleep(0.02)
        watching.cancel()

    asyncio.run(scenario())
    assert here.registry.current.generation == there.registry.current.generation == 1
    assert there.registry.current.routes == here.registry.current.routes
    assert there.registry.current.variants["a"].loaded is there_before.variants["a"].loaded  # kept
    assert there.state.acknowledged(__import__("os").getpid()) == (1, "ok")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"generation": "1", "routes": {}}',
        b'{"generation": 2, "routes": {"variants": 5}}',
        b'{"generation": 2, "routes": {"variants": {"a": "../x"}}}',
        b"{" * 100_000,
    ],
)
def test_a_damaged_state_file_is_ignored(tmp_path: Path, content: bytes):
    load, made = fake_loads()
    host = host_for(tmp_path, load)
    host.state.path.write_bytes(content)
    with pytest.raises(routing.RoutesError):
        host.state.read()
    assert host.state.read_or_none() is None and made == ["m:1"]


def test_a_swapped_out_model_is_released_once_its_last_request_is_answered(tmp_path: Path, caplog):
    load, _ = fake_loads()
    host = host_for(tmp_path, load)
    old = host.registry.current
    gone = weakref.ref(old.models["m:1"].model.holds)

    async def scenario():
        await host.apply(routing.parse("variants: {a: 'm:2'}"), 1)
        host._release()
        return gone() is not None  # an admitted request still holds the old snapshot

    assert asyncio.run(scenario())
    del old
    gc.collect()
    with caplog.at_level("INFO", logger="recbole_bento"):
        host._release()
    assert gone() is None and "previous models' memory is released" in caplog.text


# ------------------------------------------------------------------ admin


def call(app, method: str, path: str, body: bytes = b"", token: str | None = None):
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), dict(sent[0]["headers"])


def test_admin_needs_the_bearer_token_compared_in_constant_time(tmp_path: Path, monkeypatch):
    load, _ = fake_loads(fail={"m:bad"})
    host = host_for(tmp_path, load)
    app = variants.AdminApp(lambda: host, "s3cret")
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    body = json.dumps({"variants": {"a": "m:1", "b": {"model": "m:2", "weight": 2}}}).encode()
    for token in (None, "wrong", "s3cret-longer", ""):
        status, answer, headers = call(app, "POST", "/admin/routes", body, token)
        assert status == 401 and "Authorization: Bearer" in answer["error"], token
        assert headers[b"www-authenticate"] == b"Bearer"
    assert (b"wrong", b"s3cret") in compared
    assert host.registry.current.generation == 0
    status, answer, _ = call(app, "POST", "/admin/routes", body, "s3cret")
    assert status == 200 and answer["generation"] == 1
    assert [(v["name"], v["model"], v["weight"]) for v in answer["variants"]] == [
        ("a", "m:1", 1.0),
        ("b", "m:2", 2.0),
    ]
    assert call(app, "GET", "/admin/routes", token="s3cret")[1]["generation"] == 1
    status, answer, _ = call(app, "POST", "/admin/routes", b'{"variants": {"a": "m:bad"}}', "s3cret")
    assert (
        status == 422
        and answer["model"] == "m:bad"
        and "routes not changed: m:bad: the sha256" in answer["error"]
    )
    assert call(app, "POST", "/admin/routes", b'{"variants": 1}', "s3cret")[0] == 400
    assert call(app, "POST", "/admin/routes", b"{nope", "s3cret")[1] == {"error": "the body is not JSON"}
    assert call(app, "POST", "/admin/routes", b" " * (routing.MAX_ROUTES_BYTES + 1), "s3cret")[0] == 413
    status, answer, headers = call(app, "PUT", "/admin/routes", body, "s3cret")
    assert status == 405 and headers[b"allow"] == b"GET, POST"
    assert host.registry.current.generation == 1  # none of the refused calls changed anything


def test_without_the_admin_app_its_path_is_a_json_404():
    async def empty(scope, receive, send):  # the service without the mount: Starlette's 404
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"Not Found"})

    front = guard.RequestGuard(empty, api_paths=["/recommend"], max_body_bytes=100, max_concurrency=1,
                               retry_after_s=1, body_timeout_s=1, max_pending_bodies=1)  # fmt: skip
    status, answer, _ = call(front, "POST", "/admin/routes", b"{}", "anything")
    assert status == 404 and "POST /admin/routes: no such endpoint" in answer["error"]


# ------------------------------------------------------------------ shadow


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_shadow_scores_after_the_answer_and_drops_when_full():
    gate = asyncio.Event()
    base = two_variants()
    # its own catalogue order: internal ids 1, 2 are e, d
    shadow = loaded("m:shadow", planner(list("edcba")), Stub(5, descending=False, gate=gate))
    snapshot = routing.Snapshot(1, base.routes, base.variants, shadow, {**base.models, "m:shadow": shadow})
    path = RequestPath(routing.Registry(snapshot), retry_after_s=1, shadow=variants.Shadow(in_flight=1))
    dropped = sample("recbole_bento_shadow_dropped_total", model_tag="m:shadow")
    observed = sample("recbole_bento_shadow_overlap_count", model_tag="m:shadow", variant="control")
    summed = sample("recbole_bento_shadow_overlap_sum", model_tag="m:shadow", variant="control")

    async def scenario():
        first = await path.respond([recommend(variant="control")], batch=False)
        second = await path.respond([recommend(variant="control")], batch=False)
        assert first.background is not None
        await first.background()  # what Starlette runs once the response is sent
        for _ in range(1000):  # the shadow's call reaches its model, and waits there
            if shadow.model.port.calls:
                break
            await asyncio.sleep(0.001)
        await second.background()  # the shadow is still busy with the first: dropped
        assert json.loads(first.body)["model"] == "m:a"
        gate.set()
        await asyncio.gather(*list(path.shadow._tasks))

    asyncio.run(scenario())
    assert sample("recbole_bento_shadow_dropped_total", model_tag="m:shadow") == dropped + 1
    assert (
        sample("recbole_bento_shadow_overlap_count", model_tag="m:shadow", variant="control") == observed + 1
    )
    # served e, d (control); the shadow's top 2, mapped back through its own ids: e, d
    assert sample("recbole_bento_shadow_overlap_sum", model_tag="m:shadow", variant="control") == summed + 1.0
    assert len(shadow.model.port.calls) == 1


def test_without_a_shadow_no_background_work():
    path = RequestPath(routing.Registry(two_variants()), retry_after_s=1, shadow=variants.Shadow())
    response = asyncio.run(path.respond([recommend()], batch=False))
    assert response.background is None


def test_a_worker_that_cannot_follow_makes_the_admin_call_fail_naming_it(tmp_path: Path):
    load, _ = fake_loads()
    host = host_for(tmp_path, load)
    host._siblings = lambda: [424242]  # another worker of this server, which failed the load
    (tmp_path / "ack-424242.json").write_text(
        json.dumps({"generation": 1, "result": "failed: m:2: no memory"})
    )
    app = variants.AdminApp(lambda: host, "t")
    status, answer, _ = call(app, "POST", "/admin/routes", b'{"variants": {"a": "m:2"}}', "t")
    assert status == 500 and answer["generation"] == 1
    assert "not by every other one (worker 424242: failed: m:2: no memory)" in answer["error"]
