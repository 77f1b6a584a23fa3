"""Issue 20, server-side sessions: both stores' semantics on real stores (a SQLite file, a real
``redis-server``), expiry, eviction, restart, hostile stored data, a down or silent Redis, concurrent
appends from several processes; the request-side rules in process; one real server per store, with
two API workers, for the HTTP contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, free_port, serving
from pydantic import ValidationError

from recbole_bento.core.sessions import (
    Limits,
    RedisStore,
    Session,
    SessionStore,
    SQLiteStore,
    StoreError,
    StoreUnavailable,
    check_session_id,
    open_store,
    store_address,
)
from recbole_bento.edge.sessions import SessionHistory, SessionsApp
from recbole_bento.schemas import RecommendRequest

LIMITS = Limits(max_items=2000, max_id_length=256)


# ------------------------------------------------------------------ a real redis-server


class RedisProcess:
    """``redis-server`` on 127.0.0.1:*port*, no persistence, in a temporary folder."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.folder = tempfile.mkdtemp(prefix="redis-")

    def start(self) -> str:
        """Its URL, once it answers PING."""
        binary = shutil.which("redis-server")
        assert binary, (
            "redis-server is missing: `make install-dev` installs it (apt-get install redis-server)"
        )
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", self.folder], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return self.url
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    redis = RedisProcess(port)
    try:
        yield redis.start()
    finally:
        redis.stop()
        shutil.rmtree(redis.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path: Path) -> StoreFactory:
    """make_store(ttl_s=..., max_sessions=...) -> a fresh, empty store of the parametrized kind
    (Redis: a key prefix of its own); call it inside the event loop that uses it."""

    def make(ttl_s: float = 3600, max_sessions: int = 0) -> SessionStore:
        if request.param == "sqlite":
            return SQLiteStore(tmp_path / "s.sqlite3", ttl_s=ttl_s, max_sessions=max_sessions, limits=LIMITS)
        url = request.getfixturevalue("redis_url")
        prefix = f"t{random.getrandbits(48):x}:"
        return RedisStore(
            url, ttl_s=ttl_s, max_sessions=max_sessions, timeout_s=1.0, limits=LIMITS, prefix=prefix
        )

    return make


# ------------------------------------------------------------------ both stores


def test_append_trims_to_the_window_keeps_the_user_and_deletes(make_store):
    async def body() -> None:
        store = make_store()
        assert await store.get("a") is None
        assert await store.append("a", ["1", "2"], "u1", 3) == Session(["1", "2"], "u1")
        assert await store.append("a", ["3", "4"], None, 3) == Session(["2", "3", "4"], "u1")  # user kept
        assert await store.append("a", ["5"], "u2", 3) == Session(["3", "4", "5"], "u2")
        assert await store.get("a") == Session(["3", "4", "5"], "u2")
        assert await store.append("a/b:c", ["x"] * 5, None, 10) == Session(["x"] * 5, None)
        assert await store.get("a") == Session(["3", "4", "5"], "u2")  # sessions are independent
        assert await store.delete("a") is True
        assert await store.get("a") is None and await store.delete("a") is False
        assert await store.append("a", ["9"], None, 3) == Session(["9"], None)  # a fresh start
        await store.close()

    run(body())


def test_the_least_recently_active_session_is_evicted_first(make_store):
    async def body() -> None:
        store = make_store(max_sessions=3)
        for name in ("a", "b", "c"):
            await store.append(name, [name], None, 5)
        await store.append("a", ["a2"], None, 5)  # a is now the most recent
        await store.append("d", ["d"], None, 5)
        assert [await store.get(s) is not None for s in "abcd"] == [True, False, True, True]
        for i in range(20):
            await store.append(f"n{i}", ["x"], None, 5)
        kept = [s for s in ["a", "c", "d"] + [f"n{i}" for i in range(20)] if await store.get(s)]
        assert kept == ["n17", "n18", "n19"]
        await store.close()

    run(body())


@pytest.mark.parametrize("value", ["", "a b", "a\n", "\na", "é", "a\x00", "x" * 257, "tab\t"])
def test_what_is_not_a_session_id(value):
    with pytest.raises(ValueError, match="a session id is"):
        check_session_id(value, 256)
    with pytest.raises(ValidationError, match="session_id"):
        RecommendRequest.model_validate({"session_id": value})


@pytest.mark.parametrize("value", ["a", "x" * 256, "3f2a-9c/17:~!", "{uuid}"])
def test_what_is_a_session_id(value):
    assert (
        check_session_id(value, 256)
        == value
        == RecommendRequest.model_validate({"session_id": value}).session_id
    )


def test_sqlite_expiry_follows_its_clock_and_purges(tmp_path):
    now = [1000.0]
    store = SQLiteStore(
        tmp_path / "s.sqlite3", ttl_s=100, max_sessions=0, limits=LIMITS, clock=lambda: now[0]
    )

    async def body() -> None:
        await store.append("old", ["1"], "u", 5)
        now[0] += 100
        assert await store.get("old") == Session(["1"], "u")  # 100 s: not yet
        await store.append("other", ["2"], None, 5)
        now[0] += 0.5
        assert await store.get("old") is None  # past the TTL since its last event
        assert await store.append("old", ["3"], None, 5) == Session(["3"], None)  # expired: a fresh start
        now[0] += 101
        await store.append("new", ["4"], None, 5)  # purges the two expired ones
        await store.close()

    run(body())
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        assert [r[0] for r in db.execute("SELECT id FROM sessions")] == ["new"]
        assert db.execute("SELECT n FROM session_count").fetchone() == (1,)


def test_an_sqlite_append_waits_for_another_writer_then_gives_up(tmp_path):
    import threading

    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path, ttl_s=60, max_sessions=0, limits=LIMITS, busy_timeout_s=0.5)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # another process's writer

    async def body() -> None:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.2, other.execute, ["COMMIT"]).start()
        start = time.monotonic()
        assert await store.append("a", ["1"], None, 5) == Session(["1"])  # once the lock is free
        assert 0.15 < time.monotonic() - start < 0.5
        assert await store.get("a") == Session(["1"])  # reads wait for no writer
        other.execute("BEGIN IMMEDIATE")
        assert await store.get("a") == Session(["1"])
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="the session store sqlite:.* failed: database is locked"):
            await store.append("a", ["2"], None, 5)
        assert time.monotonic() - start < 1.5
        other.execute("COMMIT")
        assert await store.append("a", ["3"], None, 5) == Session(["1", "3"])
        await store.close()

    run(body())


def test_a_redis_answer_that_came_while_the_event_loop_was_busy_is_not_late(redis_url):
    """In-process, the model ranks on the event loop: a 500 ms ranking is not a 200 ms-slow Redis."""

    async def body() -> None:
        store = RedisStore(redis_url, ttl_s=60, max_sessions=0, timeout_s=0.2, limits=LIMITS, prefix="busy:")
        await store.append("s", ["1"], None, 5)

        async def ranking() -> None:
            await asyncio.sleep(0)  # once the read below is sent
            time.sleep(0.5)  # the model, holding the loop

        busy = asyncio.ensure_future(ranking())
        assert await store.get("s") == Session(["1"])
        await busy
        await store.close()

    run(body())


def test_redis_sessions_expire_after_their_ttl(redis_url):
    async def body() -> None:
        store = RedisStore(redis_url, ttl_s=0.3, max_sessions=0, timeout_s=1.0, limits=LIMITS, prefix="ttl:")
        assert await store.append("a", ["1"], "u", 5) == Session(["1"], "u")
        assert await store.get("a") == Session(["1"], "u")
        deadline = time.monotonic() + 10
        while await store.get("a") is not None:
            assert time.monotonic() < deadline, "the session outlived its TTL"
            await asyncio.sleep(0.05)
        assert await store.append("a", ["2"], None, 5) == Session(["2"], None)  # user expired too
        await store.close()

    run(body())


def test_sqlite_survives_a_restart_and_is_shared_by_paths(tmp_path):
    path = tmp_path / "home" / "sessions" / "sessions.sqlite3"

    async def write() -> None:
        store = open_store(None, path, ttl_s=60, max_sessions=10, timeout_s=0.2, limits=LIMITS)
        await store.append("s", ["1", "2"], "u", 50)
        await store.close()

    async def read() -> Session | None:
        store = open_store(
            f"sqlite://{path}", tmp_path / "unused", ttl_s=60, max_sessions=10, timeout_s=0.2, limits=LIMITS
        )
        try:
            return await store.get("s")
        finally:
            await store.close()

    run(write())
    assert run(read()) == Session(["1", "2"], "u")


@pytest.mark.parametrize(
    "spec",
    [
        "postgres://x/y",
        "sqlite://relative.db",
        "sqlite:///",
        "redis://host:notaport/0",
        "redis:///0",
        "memory",
    ],
)
def test_unusable_store_settings_are_refused(spec, tmp_path):
    with pytest.raises(StoreError, match="RECBOLE_BENTO_SESSION_STORE"):
        store_address(spec)
    with pytest.raises(StoreError, match="RECBOLE_BENTO_SESSION_STORE"):
        open_store(spec, tmp_path / "s.sqlite3", ttl_s=1, max_sessions=0, timeout_s=0.2, limits=LIMITS)
    assert store_address(None) == store_address("") == ("sqlite", None)
    assert store_address("sqlite:///var/s.db") == ("sqlite", "/var/s.db")
    assert store_address("rediss://:pw@cache:6380/2") == ("redis", "rediss://:pw@cache:6380/2")
    with pytest.raises(StoreError) as refused:
        store_address("redis://:secret@cache:port/0")
    assert "secret" not in str(refused.value) and ":***@" in str(refused.value)


# ------------------------------------------------------------------ hostile stored data


def test_a_file_that_is_not_a_session_store_is_refused_at_open(tmp_path):
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="cannot be used as the session store"):
        SQLiteStore(garbage, ttl_s=1, max_sessions=0)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE sessions (name TEXT, payload BLOB)")
    with pytest.raises(StoreError, match="cannot be used as the session store .no such column"):
        SQLiteStore(other, ttl_s=1, max_sessions=0)
    wider = tmp_path / "wider.sqlite3"
    with sqlite3.connect(wider) as db:
        db.execute("CREATE TABLE sessions (id TEXT, items TEXT, user_id TEXT, touched REAL, secret TEXT)")
    with pytest.raises(StoreError, match="not a session store"):
        SQLiteStore(wider, ttl_s=1, max_sessions=0)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(StoreError):
        SQLiteStore(folder, ttl_s=1, max_sessions=0)


HOSTILE_ROWS: list[tuple[Any, Any, Any]] = [
    ("not json", None, 1e12),
    ("[1, 2]", None, 1e12),  # numbers, not ids
    ('{"a": 1}', None, 1e12),
    ("[" * 100_000 + "]" * 100_000, None, 1e12),  # deep nesting
    (json.dumps(["x"] * 3000), None, 1e12),  # more items than any window
    (json.dumps(["y" * 300]), None, 1e12),  # an id longer than any id
    (json.dumps([""]), None, 1e12),
    (b"\x00\xff binary", None, 1e12),
    (json.dumps(["ok"]), None, "yesterday"),  # not a time
    (12345, None, 1e12),
]


@pytest.mark.parametrize("row", HOSTILE_ROWS, ids=range(len(HOSTILE_ROWS)))
def test_corrupt_sqlite_rows_read_as_no_history_and_are_replaced(tmp_path, row, caplog):
    path = tmp_path / "s.sqlite3"
    SQLiteStore(path, ttl_s=0, max_sessions=0)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO sessions VALUES ('s', ?, ?, ?)", row)

    async def body() -> None:
        store = SQLiteStore(path, ttl_s=0, max_sessions=0, limits=LIMITS)
        assert await store.get("s") is None
        assert await store.append("s", ["1"], None, 5) == Session(["1"], None)
        assert await store.get("s") == Session(["1"], None)
        await store.close()

    run(body())


def test_a_corrupt_user_id_or_count_is_survived(tmp_path):
    path = tmp_path / "s.sqlite3"
    SQLiteStore(path, ttl_s=0, max_sessions=0)
    with sqlite3.connect(path) as db:
        # the oldest session (touched at 1 s), with a user id that is not text
        db.execute("INSERT INTO sessions VALUES ('s', '[\"1\"]', ?, 1.0)", (b"\xff",))
        db.execute("UPDATE session_count SET n = ?", ("many",))

    async def body() -> None:
        store = SQLiteStore(path, ttl_s=0, max_sessions=2, limits=LIMITS)
        assert await store.get("s") == Session(["1"], None)
        for name in "abc":
            await store.append(name, ["x"], None, 5)
        assert [await store.get(n) is not None for n in "sabc"] == [False, False, True, True]
        await store.close()

    run(body())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*), (SELECT n FROM session_count) FROM sessions").fetchone() == (2, 2)


def test_garbage_in_redis_reads_as_no_history_and_is_replaced(redis_url):
    import redis

    raw = redis.Redis.from_url(redis_url)
    prefix = "hostile:"
    raw.set(prefix + "s:str", "a string, not a list")
    raw.hset(prefix + "s:hash", "k", "v")
    raw.rpush(prefix + "s:binary", b"\xff\xfe", b"ok")
    raw.rpush(prefix + "s:empty-id", b"")
    raw.rpush(prefix + "s:long-id", b"z" * 300)
    raw.rpush(prefix + "s:user", b"1")
    raw.rpush(prefix + "u:user", b"a list as the user")
    raw.set(prefix + "active", "not a sorted set")
    names = ["str", "hash", "binary", "empty-id", "long-id"]

    async def body() -> None:
        store = RedisStore(redis_url, ttl_s=60, max_sessions=100, timeout_s=1.0, limits=LIMITS, prefix=prefix)
        for name in names:
            assert await store.get(name) is None, name
            assert await store.append(name, ["1"], None, 5) == Session(["1"], None), name
        assert await store.get("user") == Session(["1"], None)  # the list user id is ignored
        assert await store.append("user", ["2"], "u", 5) == Session(["1", "2"], "u")
        await store.close()

    run(body())
    assert raw.type(prefix + "active") == b"zset" and raw.zcard(prefix + "active") == len(names) + 1


# ------------------------------------------------------------------ a Redis that does not answer


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung Redis)."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_a_down_or_silent_redis_is_unavailable_within_the_timeout():
    async def attempt(store: RedisStore, call: Callable[[], Awaitable[Any]]) -> float:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=store.name.replace("/", ".")):
            await call()
        return time.monotonic() - start

    async def body(port: int) -> list[float]:
        store = RedisStore(f"redis://:secret@127.0.0.1:{port}/2", ttl_s=60, max_sessions=0, timeout_s=0.2)
        assert "secret" not in store.name and store.name == f"redis://127.0.0.1:{port}/2"
        calls = [lambda: store.get("a"), lambda: store.append("a", ["1"], None, 5), lambda: store.delete("a")]
        return [await attempt(store, call) for call in calls]

    down = free_port()
    assert max(run(body(down))) < 0.5
    with silent_server() as port:
        assert max(run(body(port))) < 0.6  # 200 ms each, plus a loaded machine's scheduling


# ------------------------------------------------------------------ concurrent appends, several processes

APPENDER = """
import asyncio, json, sys, time
from pathlib import Path
from recbole_bento.core.sessions import Limits, RedisStore, SQLiteStore
kind, target, prefix, go, first, per_client, keep = json.loads(sys.argv[1])
deadline = time.monotonic() + 60
while not Path(go).exists():  # every process starts appending at once
    assert time.monotonic() < deadline
    time.sleep(0.005)

async def main():
    limits = Limits(max_items=2000)
    if kind == "sqlite":
        store = SQLiteStore(Path(target), ttl_s=3600, max_sessions=0, limits=limits)
    else:
        store = RedisStore(target, ttl_s=3600, max_sessions=0, timeout_s=5.0, limits=limits, prefix=prefix)
    async def client(c):
        for i in range(per_client[c]):
            await store.append("shared", [f"c{c}-{i}"], None, keep)
    await asyncio.gather(*(client(c) for c in range(first, first + 8)))
    await store.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("keep", [1000, 50])
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_appends_from_several_processes_lose_nothing(request, kind, keep, tmp_path):
    """1,000 appends from 32 clients (4 processes x 8) to one session: the stored history is the
    last *keep* events in arrival order, each client's in the order it sent them, none missing."""
    target = str(tmp_path / "s.sqlite3") if kind == "sqlite" else request.getfixturevalue("redis_url")
    prefix = f"c{random.getrandbits(48):x}:"
    per_client = [32 if c < 8 else 31 for c in range(32)]  # 1,000 in all
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                APPENDER,
                json.dumps([kind, target, prefix, str(go), p * 8, per_client, keep]),
            ],
            cwd=ROOT,
        )
        for p in range(4)
    ]
    go.touch()
    assert [proc.wait(120) for proc in procs] == [0] * 4

    async def stored() -> Session | None:
        if kind == "sqlite":
            store: SessionStore = SQLiteStore(Path(target), ttl_s=3600, max_sessions=0, limits=LIMITS)
        else:
            store = RedisStore(
                target, ttl_s=3600, max_sessions=0, timeout_s=1.0, limits=LIMITS, prefix=prefix
            )
        try:
            return await store.get("shared")
        finally:
            await store.close()

    session = run(stored())
    assert session is not None and len(session.items) == min(keep, 1000)
    by_client: dict[int, list[int]] = {}
    for item in session.items:
        client, index = item[1:].split("-")
        by_client.setdefault(int(client), []).append(int(index))
    for client, indexes in by_client.items():
        sent = per_client[client]
        assert indexes == list(range(sent - len(indexes), sent)), (client, indexes)
    if keep >= 1000:
        assert sorted(by_client) == list(range(32))


# ------------------------------------------------------------------ the request side, in process


def test_resolve_appends_the_sent_sequence_then_reads_the_stored_history(tmp_path):
    windows = [3]

    async def body() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3", ttl_s=60, max_sessions=0, limits=LIMITS)
        history = SessionHistory(store, lambda: windows[0])
        assert (await history.record("s", [1, "2"], 7)) == Session(["1", "2"], "7")
        plain = RecommendRequest(sequence=["9"])
        by_session = RecommendRequest.model_validate({"session_id": "s"})
        with_events = RecommendRequest(session_id="s", sequence=[3, 4], topk=5)
        other_user = RecommendRequest(session_id="s", user_id=8)
        out = await history.resolve([plain, by_session, with_events, other_user])
        assert out[0] is plain
        assert (out[1].sequence, out[1].user_id) == (["1", "2"], "7")
        assert (out[2].sequence, out[2].user_id, out[2].topk) == (["2", "3", "4"], "7", 5)  # window 3
        assert (out[3].sequence, out[3].user_id) == (["2", "3", "4"], 8)
        windows[0] = 5  # the served models' window, asked at each append
        assert (await history.record("s", ["5"], None)).items == ["2", "3", "4", "5"]
        # A sequence longer than the window: its last window's worth is what stays.
        (long,) = await history.resolve([RecommendRequest(session_id="t", sequence=list(range(9)))])
        assert long.sequence == ["4", "5", "6", "7", "8"] and await store.get("t") == Session(long.sequence)
        await store.close()

    run(body())


async def call(app: SessionsApp, method: str, path: str) -> tuple[int, dict, dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert headers.pop("content-length") == str(len(sent[1]["body"]))
    assert headers.pop("content-type") == "application/json"
    return sent[0]["status"], json.loads(sent[1]["body"]), headers


def test_sessions_app_gets_deletes_and_refuses_in_json(tmp_path, redis_url):
    async def body() -> None:
        app = SessionsApp(max_id_bytes=8, retry_after_s=2)
        status, answer, headers = await call(app, "GET", "/sessions/s")
        assert (status, headers["retry-after"]) == (503, "2") and "starting" in answer["error"]
        store = SQLiteStore(tmp_path / "s.sqlite3", ttl_s=60, max_sessions=0, limits=LIMITS)
        app.serve(SessionHistory(store, lambda: 10))
        await store.append("s/1", ["a", "b"], "u", 10)
        assert await call(app, "GET", "/sessions/s/1") == (
            200,
            {"session_id": "s/1", "items": ["a", "b"], "user_id": "u", "length": 2},
            {},
        )
        assert (await call(app, "DELETE", "/sessions/s/1"))[:2] == (
            200,
            {"session_id": "s/1", "deleted": True},
        )
        assert (await call(app, "DELETE", "/sessions/s/1"))[:2] == (
            200,
            {"session_id": "s/1", "deleted": False},
        )
        status, answer, _ = await call(app, "GET", "/sessions/s/1")
        assert status == 404 and "never sent, expired, evicted or deleted" in answer["error"]
        for path in ("/sessions/", "/sessions/123456789", "/sessions/a b", "/sessions/é"):
            status, answer, _ = await call(app, "GET", path)
            assert status == 400 and "a session id is" in answer["error"], path
        status, answer, headers = await call(app, "POST", "/sessions/s")
        assert (status, headers["allow"]) == (405, "GET, DELETE") and "use GET or DELETE" in answer["error"]
        await store.close()
        with silent_server() as port:
            down = RedisStore(f"redis://127.0.0.1:{port}/0", ttl_s=60, max_sessions=0, timeout_s=0.2)
            app.serve(SessionHistory(down, lambda: 10))
            status, answer, headers = await call(app, "DELETE", "/sessions/s")
            assert (status, headers["retry-after"]) == (503, "2")
            assert answer["error"].startswith(f"the session store redis://127.0.0.1:{port}/0 is unavailable")

    run(body())


# ------------------------------------------------------------------ the HTTP contract, a real server


def assert_refused(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"] and fragment in response.json()["error"], response.text


def concurrent_events(url: str, clients: int, total: int) -> list[int]:
    """*total* /events to one session from *clients* concurrent clients, each sending its own
    numbered items in order; the per-client counts."""
    counts = [total // clients + (1 if c < total % clients else 0) for c in range(clients)]

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for i in range(counts[c]):
            answer = await http.post("/events", json={"session_id": "busy", "items": [f"c{c}-{i}"]})
            assert answer.status_code == 200, answer.text

    async def main() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            await asyncio.gather(*(client(c, http) for c in range(clients)))

    run(main())
    return counts


@pytest.mark.server
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_sessions_over_http_across_two_api_workers(kind, sasrec_tag):
    import bentoml

    from recbole_bento.core import store

    items = store.load(bentoml.models.get(sasrec_tag), load_weights=False).item_tokens[1:]
    env = {"RECBOLE_BENTO_API_WORKERS": "2", "RECBOLE_BENTO_MAX_EVENT_ITEMS": "20"}
    redis = RedisProcess()
    if kind == "redis":
        env["RECBOLE_BENTO_SESSION_STORE"] = redis.start()
    try:
        with serving(sasrec_tag, **env) as url:
            check_the_contract(url, items)
            if kind == "redis":
                redis.stop()
                check_redis_down(url, items, redis.url)
                redis.start()  # the same address, empty: the service reconnects
                back = httpx.post(f"{url}/events", json={"session_id": "s", "items": [items[0]]}, timeout=30)
                assert back.json() == {"session_id": "s", "length": 1}
    finally:
        redis.stop()
        shutil.rmtree(redis.folder, ignore_errors=True)


def check_the_contract(url: str, items: list[str]) -> None:
    window = httpx.post(f"{url}/model_info", json={}, timeout=30).json()["max_history_length"]
    documented = httpx.get(f"{url}/docs.json", timeout=30).json()["paths"]
    assert set(documented["/sessions/{session_id}"]) == {"get", "delete"} and "post" in documented["/events"]
    body = documented["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "sequence" not in body.get("required", []) and len(body["oneOf"]) == 2  # sequence or session_id

    def post(path: str, body: object) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=body, timeout=30)  # a new connection: either worker

    def top(body: dict) -> list[str]:
        answer = post("/recommend", {"topk": 5, **body})
        assert answer.status_code == 200, answer.text
        return answer.json()["item_list"]

    # Read-your-writes, one event at a time, each call on a new connection.
    for i in range(12):
        answer = post("/events", {"session_id": "rw", "items": [items[i]]})
        assert answer.json() == {"session_id": "rw", "length": i + 1}
        assert httpx.get(f"{url}/sessions/rw", timeout=30).json()["items"] == items[: i + 1]
        if i % 4 == 3:
            assert top({"session_id": "rw"}) == top({"sequence": items[: i + 1]})
    # A sequence sent with the session is recorded first; unknown items are kept and reported;
    # exclude_seen covers the stored history; the user id is remembered.
    answer = post("/recommend", {"session_id": "rw", "sequence": [items[12], "nope"], "exclude_seen": True})
    assert answer.status_code == 200 and answer.json()["unknown_items"] == ["nope"]
    stored = [*items[:13], "nope"]
    assert not set(answer.json()["item_list"]) & set(stored)
    assert post("/events", {"session_id": "rw", "items": [items[13]], "user_id": 7}).json()["length"] == 15
    got = httpx.get(f"{url}/sessions/rw", timeout=30).json()
    assert got == {"session_id": "rw", "items": [*stored, items[13]], "user_id": "7", "length": 15}
    batch = post("/recommend_batch", {"requests": [{"session_id": "rw", "topk": 5}, {"session_id": "none"}]})
    assert batch.json()["results"][0]["item_list"] == top({"sequence": [*stored, items[13]]})
    assert batch.json()["results"][1]["fallback"] == "popular"
    # Trimmed to the model's window.
    for start in range(0, window + 20, 20):
        length = post("/events", {"session_id": "rw", "items": items[start : start + 20]}).json()["length"]
    assert length == window
    # Erasure.
    assert httpx.delete(f"{url}/sessions/rw", timeout=30).json() == {"session_id": "rw", "deleted": True}
    assert_refused(httpx.get(f"{url}/sessions/rw", timeout=30), 404, "no stored history")
    assert httpx.delete(f"{url}/sessions/rw", timeout=30).json()["deleted"] is False

    # Bad input: 400 (405, 404) JSON, nothing recorded.
    for body, fragment in [
        ({"session_id": "", "items": ["1"]}, "session_id"),
        ({"session_id": "x" * 257, "items": ["1"]}, "1 to 256 characters"),
        ({"session_id": "a b", "items": ["1"]}, "printable ASCII"),
        ({"session_id": 5, "items": ["1"]}, "session_id"),
        ({"session_id": "s", "items": []}, "items"),
        ({"session_id": "s", "items": ["1"] * 21}, "items"),
        ({"session_id": "s", "items": [1.5]}, "items[0]"),
        ({"session_id": "s"}, "items: Field required"),
        ({"session_id": "s", "items": ["1"], "extra": 1}, "extra"),
    ]:
        assert_refused(post("/events", body), 400, fragment)
    long = post("/recommend", {"session_id": "long", "sequence": items[: window + 5]})
    assert (
        long.status_code == 200
        and post("/events", {"session_id": "long", "items": ["x"]}).json()["length"] == window
    )
    assert_refused(post("/recommend", {"session_id": None}), 400, "sequence: Field required")
    assert_refused(httpx.get(f"{url}/sessions/{'x' * 257}", timeout=30), 400, "a session id is")
    assert_refused(httpx.post(f"{url}/sessions/s", timeout=30), 405, "use GET or DELETE")
    assert_refused(httpx.get(f"{url}/sessions/", timeout=30), 400, "a session id is 1 to 256 characters")
    assert_refused(httpx.get(f"{url}/sessions/s", timeout=30), 404, "no stored history")

    # 1,000 events from 32 concurrent clients: the window's worth, in order per client.
    counts = concurrent_events(url, 32, 1000)
    got = httpx.get(f"{url}/sessions/busy", timeout=30).json()["items"]
    assert len(got) == window
    for client, sent in enumerate(counts):
        mine = [int(item.split("-")[1]) for item in got if item.startswith(f"c{client}-")]
        assert mine == list(range(sent - len(mine), sent)), (client, mine)


def check_redis_down(url: str, items: list[str], store: str) -> None:
    """Redis is gone: whatever needs it is a quick 503 naming it; explicit sequences are answered."""
    for method, path, body in [
        ("POST", "/events", {"session_id": "s", "items": [items[0]]}),
        ("POST", "/recommend", {"session_id": "s"}),
        ("POST", "/recommend_batch", {"requests": [{"sequence": [items[0]]}, {"session_id": "s"}]}),
        ("GET", "/sessions/s", None),
        ("DELETE", "/sessions/s", None),
    ]:
        start = time.monotonic()
        answer = httpx.request(method, f"{url}{path}", json=body, timeout=30)
        assert time.monotonic() - start < 1.0, path  # 200 ms in the store, a loaded machine around it
        assert_refused(answer, 503, f"the session store {store} is unavailable")
        assert answer.headers["retry-after"] == "1"
    answer = httpx.post(f"{url}/recommend", json={"sequence": items[:5]}, timeout=30)
    assert answer.status_code == 200 and len(answer.json()["item_list"]) == 10
