"""Issue 5: sustained load on loopback without errors or memory growth (the short version of
bench/load_test.py), and a graceful, bounded stop on SIGTERM while under load."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ROOT, free_port


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokens(sasrec) -> list[str]:
    return [str(t) for t in sasrec.dataset.field2id_token[sasrec.dataset.iid_field][1:]]


def test_soak_128_connections(sasrec, sasrec_server, tmp_path):
    """128 concurrent connections for 10 s (bench/load_test.py runs the same for 60 s): every request
    answered 200 with items, and the serving processes' RSS within 10% of after the warm-up."""
    load_test = _load_test_module()
    report = load_test.soak(
        sasrec_server, load_test.make_bodies(_tokens(sasrec)), connections=128, seconds=10, warmup_s=3
    )
    (tmp_path / "soak.json").write_text(json.dumps(report))
    print(json.dumps(report))
    assert report["errors"] == 0 and report["warmup_errors"] == 0, report["error_samples"]
    assert report["requests"] >= 128, report
    assert report["rss_growth"] <= 0.10, report
    assert report["processes"] >= 3 and report["processes_alive"] == report["processes"], report
    assert load_test.passed(report)


def test_load_test_refuses_non_loopback_urls():
    load_test = _load_test_module()
    with pytest.raises(SystemExit, match="not a loopback URL"):
        load_test.check_loopback("http://10.0.0.1:3000")
    load_test.check_loopback("http://127.0.0.1:3000")


# ------------------------------------------------------------------ SIGTERM


class Server:
    """`bentoml serve` whose main process and log the test holds (to signal it, not its group)."""

    def __init__(self, tag: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bentoml",
                    "serve",
                    ".",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env={**os.environ, "RECBOLE_BENTO_MODEL": tag, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        self.tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def alive(self) -> list[int]:
        out = []
        for proc in self.tree:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc.pid)
        return out

    def wait_exit(self, limit: float) -> float:
        """Seconds until the main process and every worker are gone (at most *limit*)."""
        start = time.monotonic()
        while self.alive() and time.monotonic() - start < limit:
            time.sleep(0.05)
        return time.monotonic() - start

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


async def _hammer(url: str, bodies: list[dict], clients: int, stop: asyncio.Event, outcomes: dict) -> None:
    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            i = n
            while not stop.is_set():
                try:
                    response = await http.post("/recommend_batch", json=bodies[i % len(bodies)])
                    key = response.status_code
                    if key == 200:
                        assert len(response.json()["results"]) == len(bodies[i % len(bodies)]["requests"])
                except (
                    httpx.ConnectError,
                    httpx.RemoteProtocolError,
                    httpx.ReadError,
                    httpx.WriteError,
                ) as exc:
                    key = type(exc).__name__
                    await asyncio.sleep(0.05)
                outcomes[key] = outcomes.get(key, 0) + 1
                i += clients

    await asyncio.gather(*(client(n) for n in range(clients)))


def test_sigterm_under_load_answers_every_accepted_request(sasrec, sasrec_tag, tmp_path):
    """SIGTERM to `bentoml serve` while 32 clients keep it busy: every request the service accepted is
    answered 200 (none cut, none 500 because the ranking worker stopped first), new connections are
    refused, and all processes are gone well within the grace period."""
    grace = 20
    server = Server(sasrec_tag, tmp_path / "serve.log", RECBOLE_BENTO_SHUTDOWN_GRACE_S=str(grace))
    tokens = _tokens(sasrec)
    try:
        bad = httpx.post(f"{server.url}/recommend", json={"sequence": ["1"], "topk": 0}, timeout=30)
        assert bad.status_code == 400
        bodies = [
            {"requests": [{"sequence": tokens[i : i + 20], "topk": 100} for i in range(k, k + 48)]}
            for k in range(0, 400, 7)
        ]
        outcomes: dict = {400: 1}

        async def scenario() -> float:
            stop = asyncio.Event()
            load = asyncio.create_task(_hammer(server.url, bodies, 32, stop, outcomes))
            await asyncio.sleep(3)
            assert outcomes.get(200, 0) > 0 and set(outcomes) == {200, 400}, outcomes
            server.proc.send_signal(signal.SIGTERM)
            took = await asyncio.to_thread(server.wait_exit, grace + 10)
            await asyncio.sleep(0.5)  # clients now meet a closed port
            stop.set()
            await load
            return took

        took = asyncio.run(scenario())
    finally:
        server.kill()
    log = server.log.read_text()
    print(json.dumps({"stop_s": round(took, 2), "outcomes": {str(k): v for k, v in outcomes.items()}}))
    assert took < grace, f"took {took:.1f} s"
    assert server.proc.returncode is not None
    http_statuses = {k for k in outcomes if isinstance(k, int)}
    assert http_statuses == {200, 400}, outcomes  # no 5xx, no 503/504
    answered = re.search(
        r"shutdown: answered (\d+) of (\d+) accepted requests \(\d+ refused at the door, (\d+)", log
    )
    assert answered, log[-3000:]
    done, accepted, in_progress = map(int, answered.groups())
    responses = outcomes[200] + outcomes[400]
    assert done == accepted == responses and in_progress == 0, (answered.group(0), outcomes)
    # the ones that failed never got in: refused connections, or keep-alive connections closed idle
    assert set(outcomes) - http_statuses <= {
        "ConnectError",
        "RemoteProtocolError",
        "ReadError",
        "WriteError",
    }, outcomes
    assert "no calling service left, stopping" in log
    assert "Traceback" not in log
    assert re.search(
        r"WARNING.*refused POST /recommend: topk: Input should be greater than or equal to 1", log
    )


def test_grace_period_bounds_the_stop(sasrec_tag, tmp_path):
    """A request that never completes (its body never arrives) cannot hold the stop: the service
    exits RECBOLE_BENTO_SHUTDOWN_GRACE_S after SIGTERM and says why."""
    grace = 3
    server = Server(sasrec_tag, tmp_path / "serve.log", RECBOLE_BENTO_SHUTDOWN_GRACE_S=str(grace))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as stuck:
            stuck.sendall(
                b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b'content-length: 100\r\n\r\n{"sequence": '
            )
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            took = server.wait_exit(grace + 20)
    finally:
        server.kill()
    log = server.log.read_text()
    assert grace - 0.5 < took < grace + 5, f"took {took:.1f} s"
    assert "still busy 3 s after the stop signal (RECBOLE_BENTO_SHUTDOWN_GRACE_S): exiting now" in log
