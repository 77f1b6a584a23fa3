"""Model lifecycle on a real `bentoml serve`: two variants of two model classes behind one server,
a swap through POST /admin/routes under concurrent load with every request answered 200 by the
model it names, the swap reaching every worker, and SIGHUP re-reading the routes file."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from conftest import import_ok, scrape, serving

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def gru4rec_tag(train_tiny) -> str:
    gru = train_tiny("GRU4Rec")
    return import_ok(gru.checkpoint, "--dataset-pickle", gru.dataset_pickle, "--name", "gru4rec-tiny")


def arbiter_pid(url: str) -> int:
    """The `bentoml serve` process listening on *url*'s port (the one circus signals reach)."""
    port = str(urlparse(url).port)
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port and "bentoml" in cmd:
            return proc.pid
    raise AssertionError(f"no bentoml serve on port {port}")


def hammer(url: str, stop: threading.Event, out: list[tuple[int, dict]], pins: list[str]) -> None:
    """/recommend in a loop until *stop*, pinned to each of *pins* in turn; (status, body) each."""
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while not stop.is_set() and i < 5000:
            body = {"sequence": ["1", "2", "3"], "topk": 5, "variant": pins[i % len(pins)]}
            try:
                response = client.post("/recommend", json=body)
                out.append((response.status_code, response.json()))
            except httpx.HTTPError as exc:  # a connection error: counted as a failure
                out.append((0, {"error": repr(exc)}))
            i += 1


def answers_of(url: str, variant: str, n: int = 8) -> set[str]:
    """The models answering *n* pinned requests (spread over the workers by the kernel)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        bodies = [
            client.post("/recommend", json={"sequence": ["1"], "topk": 3, "variant": variant}).json()
            for _ in range(n)
        ]
    return {b["model"] for b in bodies}


@pytest.mark.server
@pytest.mark.parametrize("topology", ["inprocess", "split"])
def test_two_variants_swap_under_load_and_sighup(topology, sasrec_tag, gru4rec_tag, tmp_path: Path):
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(
        f"variants:\n  control: {{model: '{sasrec_tag}', weight: 50}}\n"
        f"  treatment: {{model: '{gru4rec_tag}', weight: 50}}\nsalt: s1\n"
    )
    env = {
        "RECBOLE_BENTO_ROUTES": str(routes_file),
        "RECBOLE_BENTO_ADMIN_TOKEN": TOKEN,
        "RECBOLE_BENTO_TOPOLOGY": topology,
        "RECBOLE_BENTO_API_WORKERS": "2",
    }
    with serving(sasrec_tag, **env) as url:
        post = httpx.Client(base_url=url, timeout=120).post
        info = post("/model_info", json={}).json()
        assert [(v["name"], v["model"], v["weight"]) for v in info["variants"]] == [
            ("control", sasrec_tag, 50.0),
            ("treatment", gru4rec_tag, 50.0),
        ]
        assert info["tag"] == sasrec_tag and info["shadow"] is None
        # sticky: the same key, the same variant, whichever worker answers
        for key in ("alice", "bob", "carol"):
            seen = {
                post("/recommend", json={"sequence": ["1"], "assignment_key": key}).json()["variant"]
                for _ in range(6)
            }
            assert len(seen) == 1, (key, seen)
        unknown = post("/recommend", json={"sequence": ["1"], "variant": "nope"})
        assert unknown.status_code == 400
        assert unknown.json() == {
            "error": "variant 'nope' is not served; the variants are: control, treatment"
        }
        # admin: off without the token
        new_routes = {"variants": {"control": {"model": gru4rec_tag, "weight": 50}, "treatment": sasrec_tag}}
        assert post("/admin/routes", json=new_routes).status_code == 401
        refused = post("/admin/routes", json={"variants": {"control": "no-such-model:v1"}}, headers=AUTH)
        assert refused.status_code == 422 and refused.json()["model"] == "no-such-model:v1"
        assert answers_of(url, "control") == {sasrec_tag}  # the failed swap changed nothing

        # the swap, under load
        stop, results = threading.Event(), []
        threads = [
            threading.Thread(target=hammer, args=(url, stop, results, ["control", "treatment"]))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 60
            while len(results) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = len(results)
            swapped = post("/admin/routes", json=new_routes, headers=AUTH)
            during = len(results) - before
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["generation"] == 1
        statuses = [status for status, _ in results]
        assert statuses.count(200) == len(statuses) > 40, [r for r in results if r[0] != 200][:3]
        assert during > 0  # requests were answered while the new models loaded
        # every answer names its model, and each pinned variant was answered by one of the two
        for _, body in results:
            assert body["model"] in (sasrec_tag, gru4rec_tag) and body["variant"] in ("control", "treatment")
        # the admin call's 200: every worker serves the new routes
        assert answers_of(url, "control") == {gru4rec_tag}
        assert answers_of(url, "treatment") == {sasrec_tag}

        # SIGHUP: the routes file is read again
        routes_file.write_text(f"variants:\n  only: {{model: '{sasrec_tag}'}}\n")
        os.kill(arbiter_pid(url), signal.SIGHUP)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            current = httpx.get(f"{url}/admin/routes", headers=AUTH, timeout=30).json()
            if [v["name"] for v in current["variants"]] == ["only"] and answers_of(url, "only", 4) == {
                sasrec_tag
            }:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"SIGHUP: routes not re-read: {current}\n{serving.last_log[-3000:]}")
        assert current["generation"] == 2
        assert {post("/recommend", json={"sequence": ["1"]}).json()["variant"] for _ in range(6)} == {"only"}
        answered = (("model_tag", gru4rec_tag), ("outcome", "ok"), ("variant", "control"))
        assert scrape(url)[("recbole_bento_requests_total", answered)] > 0
    log = serving.last_log
    assert "routes swap: from control=" in log and "SIGHUP:" in log, log[-3000:]
