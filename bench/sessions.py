"""Server-side sessions, measured: docs/benchmarks.md, "Server-side sessions".

    python bench/sessions.py                                    # ml-100k and 1m, both stores
    python bench/sessions.py --catalogue ml-100k --store sqlite --rounds 1 --duration 3   # smoke
    python bench/sessions.py --catalogue none --sizing 1000000  # the stores alone

Per catalogue and store, one server (``bentoml serve .`` as shipped; for Redis, a ``redis-server``
started here and ``RECBOLE_BENTO_SESSION_STORE``) with sessions seeded from the same histories as
bench/run.py's request bodies, then in each round, alternating A B C at c=32 and again at c=1:

* A: ``/recommend`` with the history in the body (bench/run.py's bodies);
* B: ``/events`` (one click) and ``/recommend {"session_id"}`` in turn, each client alternating
  them for its own sessions: half the requests record, half recommend;
* C: ``/recommend {"session_id", "sequence": [click]}``: one call that records and recommends.

The load generator is bench/loadgen.py on the same cores as the servers. Then the stores alone
(``--sizing N``): N sessions of 50 items written in each store's own format (SQLite: the rows
``SQLiteStore`` writes; Redis: the structures its append script writes), the file's size and
Redis's memory per session, and the latency of one append and one read at that size. Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
import run as bench_run  # noqa: E402  bench/run.py: fixtures, bodies, servers
from loadgen import LoadResult, run_load  # noqa: E402

from recbole_bento.core.sessions import APPEND_SCRIPT, RedisStore, SessionStore, SQLiteStore  # noqa: E402

WORK = bench_run.WORK
SESSIONS = 1024  # seeded sessions per server; a multiple of every concurrency measured
ITEMS_PER_SESSION = 50


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, Path]]:
    """A ``redis-server`` on a free port, no persistence until asked: (URL, its folder)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is missing: apt-get install redis-server (make install-dev does)")
    port = bench_run._free_port()
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(folder)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", folder
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def encoded(path: str, body: dict) -> tuple[str, bytes]:
    return path, json.dumps(body).encode()


def phases(histories: list[list[str]], tokens: list[str], concurrency: int, seed: int) -> dict[str, list]:
    """The bodies of A, B and C for *concurrency* clients. B is laid out so that client n, which
    sends bodies n, n + c, n + 2c, ... (bench/loadgen.py), alternates an event and a recommendation
    for the same session."""
    rng = random.Random(seed)
    clicks = [rng.choice(tokens) for _ in range(SESSIONS)]
    explicit = [encoded("/recommend", {"sequence": h, "topk": 10}) for h in histories]
    mixed = []
    for group in range(0, SESSIONS, concurrency):
        ids = [f"s{i}" for i in range(group, group + concurrency)]
        mixed += [encoded("/events", {"session_id": s, "items": [clicks[int(s[1:])]]}) for s in ids]
        mixed += [encoded("/recommend", {"session_id": s, "topk": 10}) for s in ids]
    one_call = [
        encoded("/recommend", {"session_id": f"s{i}", "sequence": [clicks[i]], "topk": 10})
        for i in range(SESSIONS)
    ]
    return {"A explicit": explicit, "B events+by-session": mixed, "C one call": one_call}


def seed(url: str, histories: list[list[str]]) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(SESSIONS):
            client.delete(f"/sessions/s{i}")
            answer = client.post(
                "/events", json={"session_id": f"s{i}", "items": histories[i % len(histories)]}
            )
            if answer.status_code != 200:
                raise SystemExit(f"seeding failed: {answer.text}")


def summary(result: LoadResult) -> dict:
    return {
        "rps": round(result.rps, 1),
        "p50_ms": round(result.percentile(50), 2),
        "p90_ms": round(result.percentile(90), 2),
        "p99_ms": round(result.percentile(99), 2),
        "errors": result.errors,
        "samples": result.error_samples[:2],
    }


def measure_server(fx: bench_run.Fixture, store: str, args: argparse.Namespace) -> dict:
    bodies_file = bench_run.request_bodies(fx)
    histories = [json.loads(line)["sequence"] for line in bodies_file.read_text().splitlines()]
    tokens = json.loads((bench_run._stored_path(fx.tag) / "item_tokens.json").read_text())[1:]
    env = {k: v for k, v in bench_run._product_env().items() if not k.startswith("RECBOLE_BENTO_")}
    env.pop("BENTOML_CONFIG_OVERRIDES", None)
    env["RECBOLE_BENTO_MODEL"] = fx.tag
    (Path(os.environ["BENTOML_HOME"]) / "sessions" / "sessions.sqlite3").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", "{port}"]
    probe = json.dumps({"sequence": histories[0], "topk": 10}).encode()
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if store == "redis":
            env["RECBOLE_BENTO_SESSION_STORE"], _ = stack.enter_context(redis_server())
        server = stack.enter_context(
            bench_run.serving(f"sessions-{store}", fx, cmd, args.cores, bench_run._answers(probe), env)
        )
        seed(server.url, histories)
        for rnd in range(args.rounds):
            for c in args.concurrencies:
                for name, bodies in phases(histories, tokens, c, seed=rnd * 100 + c).items():
                    if args.warmup:
                        run_load(f"{server.url}/recommend", bodies, c, args.warmup)
                    result = summary(run_load(f"{server.url}/recommend", bodies, c, args.duration))
                    rows.append({"round": rnd, "concurrency": c, "phase": name, **result})
                    print(
                        f"  [{fx.catalogue} {store} c={c} r{rnd}] {name:20s} {json.dumps(result)}", flush=True
                    )
    return {"catalogue": fx.catalogue, "store": store, "phases": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per concurrency: the median of each phase, and of each round's B/A and C/A throughput."""
    out: dict[str, dict] = {}
    for c in sorted({r["concurrency"] for r in rows}):
        at = [r for r in rows if r["concurrency"] == c]
        by_phase = {
            p: {
                k: statistics.median(r[k] for r in at if r["phase"] == p)
                for k in ("rps", "p50_ms", "p90_ms", "p99_ms")
            }
            for p in dict.fromkeys(r["phase"] for r in at)
        }
        ratios: dict[str, float] = {}
        for p in list(by_phase)[1:]:
            per_round = [
                next(r["rps"] for r in at if r["phase"] == p and r["round"] == rnd)
                / next(r["rps"] for r in at if r["phase"].startswith("A") and r["round"] == rnd)
                for rnd in sorted({r["round"] for r in at})
            ]
            ratios[f"{p[0]}/A"] = round(statistics.median(per_round), 3)
        out[f"c={c}"] = {"phases": by_phase, "ratios": ratios, "errors": sum(r["errors"] for r in at)}
    return out


# ---------------------------------------------------------------- the stores alone


def session_items(rng: random.Random) -> list[str]:
    """50 ids of a 1M-item catalogue, as bench/make_large_fixture.py names them (integers)."""
    return [str(rng.randrange(1, 1_000_001)) for _ in range(ITEMS_PER_SESSION)]


def latency_at_size(store: SessionStore, ids: list[str], rng: random.Random, calls: int = 2000) -> dict:
    """Median ms of one append (a click) and one read of random stored sessions."""

    async def measure() -> dict:
        times: dict[str, list[float]] = {"append": [], "get": []}
        for _ in range(calls):
            sid = ids[rng.randrange(len(ids))]
            for kind, call in (("append", store.append(sid, ["42"], None, 50)), ("get", store.get(sid))):
                start = time.perf_counter()
                await call
                times[kind].append((time.perf_counter() - start) * 1000)
        await store.close()
        return {k: round(statistics.median(v), 3) for k, v in times.items()}

    return asyncio.run(measure())


def size_sqlite(n: int, folder: Path) -> dict:
    path = folder / "sessions.sqlite3"
    SQLiteStore(path, ttl_s=0, max_sessions=0)
    rng = random.Random(0)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)]
    now = time.time()
    # Histories as SQLiteStore encodes them, drawn from a pool (the file does not compress them)
    pool = [json.dumps(session_items(rng), separators=(",", ":")) for _ in range(5000)]
    start = time.perf_counter()
    with sqlite3.connect(path) as db:
        for lo in range(0, n, 100_000):
            rows = [(sid, pool[i % len(pool)], None, now) for i, sid in enumerate(ids[lo : lo + 100_000])]
            db.executemany("INSERT INTO sessions (id, items, user_id, touched) VALUES (?, ?, ?, ?)", rows)
            db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    load_s = time.perf_counter() - start
    size = path.stat().st_size

    return {
        "sessions": n,
        "file_bytes": size,
        "bytes_per_session": round(size / n),
        "bulk_load_s": round(load_s, 1),
        "p50_ms_at_size": latency_at_size(SQLiteStore(path, ttl_s=86_400, max_sessions=n), ids, rng),
    }


# What the append script leaves for a new session (a list of 50 ids with a TTL, an entry in the
# activity index), written server-side for *count* sessions per call: loading a million sessions one
# script call each from Python takes longer than the rest of the benchmark.
_BULK = """
local prefix, first, count, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
for i = first, first + count - 1 do
  local id = string.format('%08x-%04x-%04x-%04x-%012x',
    i, i % 65536, 16384 + i % 4096, 32768 + i % 16384, i * 7919)  -- 36 characters, as a UUID
  local items = {}
  for k = 1, 50 do items[k] = tostring(math.random(1, 1000000)) end
  redis.call('RPUSH', prefix .. 's:' .. id, unpack(items))
  redis.call('PEXPIRE', prefix .. 's:' .. id, ttl)
  redis.call('ZADD', prefix .. 'active', now, id)
end
return count
"""


def size_redis(n: int) -> dict:
    """Memory per session through the append script itself (the first 20,000 sessions), then for
    all *n* with the same structures written server-side (``_BULK``)."""
    import redis

    with redis_server() as (url, folder):
        client = redis.Redis.from_url(url, socket_timeout=600)
        sha = client.script_load(APPEND_SCRIPT)
        base = int(client.info("memory")["used_memory"])
        rng = random.Random(0)
        first = min(n, 20_000)
        ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(first)]
        start = time.perf_counter()
        for lo in range(0, first, 1000):
            pipe = client.pipeline(transaction=False)
            for sid in ids[lo : lo + 1000]:
                pipe.evalsha(sha, 0, "recbole_bento:", sid, 86_400_000, 50, 0, "", *session_items(rng))
            pipe.execute()
        script_s = time.perf_counter() - start
        through_script = int(client.info("memory")["used_memory"]) - base
        for lo in range(first, n, 10_000):
            client.eval(_BULK, 0, "recbole_bento:", lo, min(10_000, n - lo), 86_400_000)
        after = int(client.info("memory")["used_memory"])
        client.save()
        rdb = (folder / "dump.rdb").stat().st_size
        store = RedisStore(url, ttl_s=86_400, max_sessions=n, timeout_s=1.0)
        return {
            "sessions": n,
            "used_memory_bytes": after - base,
            "bytes_per_session": round((after - base) / n),
            "bytes_per_session_through_the_script": round(through_script / first),
            "script_appends_per_s": round(first / script_s),
            "rdb_bytes": rdb,
            "p50_ms_at_size": latency_at_size(store, ids, rng),
        }


def main() -> None:
    os.environ.setdefault("BENTOML_HOME", str(WORK / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="ml-100k,1m", help="ml-100k, 1m (comma-separated), or none")
    parser.add_argument("--store", default="sqlite,redis")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrencies", default="32,1")
    parser.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    parser.add_argument("--sizing", type=int, default=0, help="sessions of 50 items for the stores alone")
    parser.add_argument("--json", type=Path, default=WORK / "sessions.json")
    args = parser.parse_args()
    args.concurrencies = [int(c) for c in args.concurrencies.split(",")]
    report: dict = {"command": " ".join(sys.argv), "cores": os.cpu_count(), "servers": [], "sizing": {}}
    for catalogue in [c for c in args.catalogue.split(",") if c != "none"]:
        fx = bench_run.fixture(catalogue)
        for store in args.store.split(","):
            report["servers"].append(measure_server(fx, store, args))
    if args.sizing:
        with tempfile.TemporaryDirectory() as folder:
            report["sizing"]["sqlite"] = size_sqlite(args.sizing, Path(folder))
        report["sizing"]["redis"] = size_redis(args.sizing)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {
                "servers": [{k: s[k] for k in ("catalogue", "store", "summary")} for s in report["servers"]],
                "sizing": report["sizing"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
