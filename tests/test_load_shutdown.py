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
from collections.abc import Awaitable, Callable
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
        # the workers the arbiter started after a kill are not in self.tree: take every child now
        with contextlib.suppress(psutil.Error):
            self.tree += psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for proc in self.tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.proc.wait()


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one keep-alive connection at a time, so that the test knows
    whether a failed request was sent on a connection that had already carried a response (a reset
    the server caused while the client was right to reuse it) or on a fresh one (never accepted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.reused = False

    async def post(self, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
        if self.conn is None:
            self.conn = await asyncio.open_connection("127.0.0.1", self.port)
            self.reused = False
        reader, writer = self.conn
        data = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n".encode()
            + data
        )
        try:
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
        }
        payload = await reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        else:
            self.reused = True
        return int(lines[0].split()[1]), headers, payload

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


async def _hammer(port: int, bodies: list[dict], clients: int, stop: asyncio.Event, outcomes: dict) -> None:
    """*clients* keep-alive clients posting /recommend_batch until *stop*; outcomes counts statuses,
    responses that said Connection: close, and failures by whether the connection was reused."""

    async def client(n: int) -> None:
        http = KeepAliveClient(port)
        i = n
        while not stop.is_set():
            was_reused = http.reused and http.conn is not None
            try:
                status, headers, payload = await http.post("/recommend_batch", bodies[i % len(bodies)])
                key: object = status
                if status == 200:
                    assert len(json.loads(payload)["results"]) == len(bodies[i % len(bodies)]["requests"])
                if headers.get("connection") == "close":
                    outcomes["connection_close"] = outcomes.get("connection_close", 0) + 1
            except (OSError, asyncio.IncompleteReadError):
                http.close()
                key = "failed_on_reused_connection" if was_reused else "failed_on_new_connection"
                await asyncio.sleep(0.05)
            outcomes[key] = outcomes.get(key, 0) + 1
            i += clients
        http.close()

    await asyncio.gather(*(client(n) for n in range(clients)))


async def _first_status(url: str, wanted: int, limit_s: float) -> float | None:
    """Seconds until GET /readyz answers *wanted* (None: not within *limit_s*)."""
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() - start < limit_s:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/readyz", headers={"connection": "close"})).status_code == wanted:
                    return time.monotonic() - start
            await asyncio.sleep(0.05)
    return None


async def _until(condition: Callable[[], bool], limit_s: float, state: object) -> None:
    """Poll *condition* every 50 ms; fail with *state* when it is not true within *limit_s*."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.05)


def _wait_read_by_server(client: socket.socket, port: int, limit_s: float = 30) -> None:
    """Poll until the server on *port* has read all that *client* sent: the client's send queue and
    the server's receive queue of that connection are both empty (Linux's /proc/net/tcp)."""
    mine = client.getsockname()[1]
    deadline = time.monotonic() + limit_s
    while True:
        queues = {}
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
            tx, rx = (int(n, 16) for n in fields[4].split(":"))
            queues[(local, remote)] = (tx, rx)
        client_tx = queues.get((mine, port), (None, None))[0]
        server_rx = queues.get((port, mine), (None, None))[1]
        if client_tx == 0 and server_rx == 0:
            return
        assert time.monotonic() < deadline, f"the server did not read the request: {client_tx}, {server_rx}"
        time.sleep(0.01)


@pytest.mark.server
def test_sigterm_under_load_answers_every_accepted_request(sasrec, sasrec_tag, tmp_path):
    """SIGTERM to `bentoml serve` while 32 keep-alive clients keep it busy (split topology, so that
    the ranker must outlive the public worker): /readyz says 503 at once, the responses of the drain
    say Connection: close, every request the service accepted is answered (none cut, none 500
    because the ranking worker stopped first), no request sent on a reused connection gets a reset,
    and all processes are gone well within the grace period."""
    grace = 20
    server = Server(
        sasrec_tag,
        tmp_path / "serve.log",
        RECBOLE_BENTO_SHUTDOWN_GRACE_S=str(grace),
        RECBOLE_BENTO_TOPOLOGY="split",
        RECBOLE_BENTO_API_WORKERS="1",
        RECBOLE_BENTO_RANKER_WORKERS="1",
    )
    tokens = _tokens(sasrec)
    try:
        bad = httpx.post(f"{server.url}/recommend", json={"sequence": ["1"], "topk": 0}, timeout=30)
        assert bad.status_code == 400
        bodies = [
            {"requests": [{"sequence": tokens[i : i + 20], "topk": 100} for i in range(k, k + 48)]}
            for k in range(0, 400, 7)
        ]
        outcomes: dict = {400: 1}

        async def scenario() -> tuple[float, float | None]:
            stop = asyncio.Event()
            load = asyncio.create_task(_hammer(server.port, bodies, 32, stop, outcomes))
            await _until(lambda: outcomes.get(200, 0) >= 64, 60, outcomes)  # every client busy, twice over
            assert set(outcomes) == {200, 400}, outcomes
            server.proc.send_signal(signal.SIGTERM)
            unready = await _first_status(server.url, 503, 1.5)
            took = await asyncio.to_thread(server.wait_exit, grace + 10)
            # the clients now meet a closed port (and back off 0.05 s each time)
            await _until(lambda: outcomes.get("failed_on_new_connection", 0) >= 32, 10, outcomes)
            stop.set()
            await load
            return took, unready

        took, unready = asyncio.run(scenario())
    finally:
        server.kill()
    log = server.log.read_text()
    print(
        json.dumps(
            {
                "stop_s": round(took, 2),
                "readyz_503_s": unready,
                "outcomes": {str(k): v for k, v in outcomes.items()},
            }
        )
    )
    assert took < grace, f"took {took:.1f} s"
    assert unready is not None and unready < 1.0, unready
    assert server.proc.returncode is not None
    http_statuses = {k for k in outcomes if isinstance(k, int)}
    assert http_statuses == {200, 400}, outcomes  # no 5xx, no 503/504
    assert outcomes.get("connection_close", 0) > 0, outcomes
    # a request sent on a connection the server kept open is answered, never reset
    assert "failed_on_reused_connection" not in outcomes, outcomes
    answered = re.search(
        r"shutdown: answered (\d+) of (\d+) accepted requests \(\d+ refused at the door, (\d+)", log
    )
    assert answered, log[-3000:]
    done, accepted, in_progress = map(int, answered.groups())
    responses = outcomes[200] + outcomes[400]
    assert done == accepted == responses and in_progress == 0, (answered.group(0), outcomes)
    assert "no calling service left, stopping" in log
    assert "draining for 2 s (readyz 503, Connection: close)" in log
    assert "Traceback" not in log
    assert re.search(
        r"WARNING.*refused POST /recommend: topk: Input should be greater than or equal to 1", log
    )


@pytest.mark.server
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
            _wait_read_by_server(stuck, server.port)  # the request is in the service, waiting for its body
            server.proc.send_signal(signal.SIGTERM)
            took = server.wait_exit(grace + 20)
    finally:
        server.kill()
    log = server.log.read_text()
    assert grace - 0.5 < took < grace + 5, f"took {took:.1f} s"
    assert "still busy 3 s after the stop signal (RECBOLE_BENTO_SHUTDOWN_GRACE_S): exiting now" in log


# ------------------------------------------------------------------ a dying model worker


def _workers(server: Server, service: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if "--service-name" in cmd and cmd[cmd.index("--service-name") + 1] == service:
                out.append(proc)
    return out


def _ready(url: str) -> Callable[[], Awaitable[bool]]:
    """An async check: /readyz answers 200 (on a fresh connection)."""

    async def check() -> bool:
        async with httpx.AsyncClient(timeout=2) as http:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{url}/readyz", headers={"connection": "close"})).status_code == 200
        return False

    return check


async def _kill_under_load(
    server: Server,
    victim: psutil.Process,
    bodies: list[dict],
    seconds: float,
    recovered: Callable[[], Awaitable[bool]],
) -> dict:
    """20 clients post /recommend; *victim* gets SIGKILL after 3 s; the clients stop 2 s after
    *recovered* (polled from the kill on) says the service is whole again, or *seconds* after the
    start. Returns each answer (time after the kill, status, Retry-After, body), failures, when
    /readyz said 503, and when the service had recovered (None: not within *seconds*)."""
    answers: list[tuple[float, int, str | None, str]] = []
    failures: list[tuple[float, str]] = []
    killed_at = time.monotonic() + 3
    stop_at = killed_at + seconds - 3

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            i = n
            while time.monotonic() < stop_at:
                try:
                    r = await http.post("/recommend", json=bodies[i % len(bodies)])
                    answers.append(
                        (time.monotonic() - killed_at, r.status_code, r.headers.get("retry-after"), r.text)
                    )
                except httpx.HTTPError as exc:
                    failures.append((time.monotonic() - killed_at, type(exc).__name__))
                    await asyncio.sleep(0.05)
                i += 20

    async def kill() -> tuple[float | None, float | None]:
        nonlocal stop_at
        await asyncio.sleep(max(0.0, killed_at - time.monotonic()))
        victim.send_signal(signal.SIGKILL)
        unready = await _first_status(server.url, 503, 2)
        while time.monotonic() < stop_at:
            if await recovered():
                back = time.monotonic() - killed_at
                stop_at = min(stop_at, time.monotonic() + 2)  # answers after the recovery, then stop
                return unready, back
            await asyncio.sleep(0.1)
        return unready, None

    *_, (unready, back) = await asyncio.gather(*(client(n) for n in range(20)), kill())
    return {"answers": answers, "failures": failures, "readyz_503_s": unready, "recovered_s": back}


@pytest.mark.server
def test_killed_model_worker_gives_503_with_retry_after_then_serves_again(sasrec, sasrec_tag, tmp_path):
    """Split topology, one model worker: kill -9 it under 20 connections. No 500; every refusal is a
    503 with Retry-After saying the model worker is restarting; /readyz says 503 within 1 s; answers
    are 200 again once the replacement is up; one log line when it went, one when it came back."""
    server = Server(
        sasrec_tag,
        tmp_path / "serve.log",
        RECBOLE_BENTO_TOPOLOGY="split",
        RECBOLE_BENTO_API_WORKERS="1",
        RECBOLE_BENTO_RANKER_WORKERS="1",
    )
    tokens = _tokens(sasrec)
    bodies = [{"sequence": tokens[k : k + 20], "topk": 10} for k in range(0, 400, 3)]
    try:
        (ranker,) = _workers(server, "recbole_ranker")
        report = asyncio.run(_kill_under_load(server, ranker, bodies, 30, _ready(server.url)))
    finally:
        server.kill()
    log = server.log.read_text()
    answers = report["answers"]
    statuses = {status for _, status, _, _ in answers}
    refused = [(t, retry, body) for t, status, retry, body in answers if status == 503]
    print(
        json.dumps(
            {
                "statuses": sorted(statuses),
                "readyz_503_s": report["readyz_503_s"],
                "last_503_s_after_kill": max((t for t, _, _ in refused), default=None),
                "failures": len(report["failures"]),
            }
        )
    )
    assert statuses == {200, 503}, statuses  # never a 500
    assert all(retry == "1" for _, retry, _ in refused)
    assert {json.loads(body)["error"] for _, _, body in refused} == {
        "the model worker is restarting: retry after 1 s"
    }
    assert report["readyz_503_s"] is not None and report["readyz_503_s"] < 1.0, report["readyz_503_s"]
    last_refusal = max(t for t, _, _ in refused)
    # The replacement worker's start (imports, model load) is BentoML's arbiter and the machine:
    # about 5 s on an idle 2-core machine, 17 s with 7 other jobs on it. The service must serve as
    # soon as the replacement is ready, never later than this.
    assert 0 <= last_refusal < 25, last_refusal
    assert any(status == 200 and t > last_refusal for t, status, _, _ in answers)  # serving again
    assert not report["failures"], report["failures"][:5]  # the public side never dropped a connection
    assert (
        log.count("the model worker is unreachable") == 1 and log.count("the model worker is back after") == 1
    )
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


@pytest.mark.server
def test_killed_inprocess_worker_is_replaced_while_the_other_serves(sasrec, sasrec_tag, tmp_path):
    """In-process topology, two API workers each holding the model: kill -9 one under 20 connections.
    No 500 and no 503 (the other worker ranks meanwhile: /readyz stays 200), only the requests in
    flight on the killed worker fail, and the arbiter starts a replacement within 8 s."""
    server = Server(
        sasrec_tag,
        tmp_path / "serve.log",
        RECBOLE_BENTO_TOPOLOGY="inprocess",
        RECBOLE_BENTO_API_WORKERS="2",
    )
    tokens = _tokens(sasrec)
    bodies = [{"sequence": tokens[k : k + 20], "topk": 10} for k in range(0, 400, 3)]
    try:
        before = _workers(server, "recbole_recommender")
        assert len(before) == 2 and not _workers(server, "recbole_ranker")

        ready = _ready(server.url)

        async def replaced_and_ready() -> bool:
            fresh = {p.pid for p in _workers(server, "recbole_recommender")} - {q.pid for q in before}
            return bool(fresh) and await ready()

        report = asyncio.run(_kill_under_load(server, before[0], bodies, 12, replaced_and_ready))
        replaced = [
            p for p in _workers(server, "recbole_recommender") if p.pid not in {q.pid for q in before}
        ]
    finally:
        server.kill()
    log = server.log.read_text()
    answers = report["answers"]
    assert {status for _, status, _, _ in answers} == {200}
    assert report["readyz_503_s"] is None  # ranking never stopped being possible
    assert len(report["failures"]) <= 20, report["failures"]  # at most the requests in flight on it
    assert all(t < 1 for t, _ in report["failures"]), report["failures"]
    gaps = sorted(t for t, status, _, _ in answers if status == 200 and t > 0)
    assert (
        gaps and gaps[0] < 1 and max(b - a for a, b in zip(gaps, gaps[1:], strict=False)) < 1
    )  # served throughout
    assert len(replaced) == 1, log[-3000:]
    assert "Traceback" not in log
