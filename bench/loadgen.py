"""A closed-loop HTTP load generator: *concurrency* clients each send the next body as soon as their
previous answer is in, until a time or request budget runs out.

Each client is one keep-alive HTTP/1.1 connection driven by a bare ``asyncio.Protocol`` with the
request bytes built once, on uvloop: the generator shares the 2 cores with the servers it measures, and an
aiohttp client cost 0.25 ms of CPU a request (a quarter of a core at the service's rate on
ml-100k), taken from whichever server was faster. ``LoadResult.client_cpu_ms`` reports what this one
costs.

    python bench/loadgen.py http://127.0.0.1:3000/recommend --concurrency 32 --duration 5 --bodies b.json

A request counts as an error unless it answers 200 with an ``item_list`` (or, to ``/events``, a
``length``); timeouts and connection errors count too. A body may be ``(path, body)``: sent to that
path of the URL's server instead of the URL's own path (bench/sessions.py mixes endpoints).
Latency is measured per request, from send to the last byte of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import uvloop  # the servers' event loop too (uvicorn[standard]); ~30% less client CPU than asyncio's


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    client_cpu_ms: float = 0.0  # this generator's own CPU per request

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.duration_s if self.duration_s else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict:
        out = asdict(self)
        del out["latencies_ms"]
        return {
            **out,
            "rps": round(self.rps, 1),
            "p50_ms": self.percentile(50),
            "p99_ms": self.percentile(99),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: ``request(data)`` sends a request and returns
    (status, body) once the whole answer (Content-Length or chunked) is in."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answer = _parse_response(self.buffer)
        if answer is not None and self.waiter is not None and not self.waiter.done():
            status, body, used = answer
            del self.buffer[:used]
            self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def _parse_response(buffer: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the first complete HTTP/1.1 response in *buffer*, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    start = end + 4
    if "content-length" in headers:
        stop = start + int(headers["content-length"])
        return (status, bytes(buffer[start:stop]), stop) if len(buffer) >= stop else None
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, pos = bytearray(), start
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            if size == 0:
                return status, bytes(body), line_end + 4
            body += buffer[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2
    return status, b"", start  # no body


_CONNECT_SPACING_S = 0.003


async def _load(
    url: str,
    bodies: Sequence[bytes | tuple[str, bytes]],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
) -> LoadResult:
    result = LoadResult(concurrency, 0, 0, 0.0)
    target = urlsplit(url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    routed = [b if isinstance(b, tuple) else (target.path or "/", b) for b in bodies]
    requests = [
        f"POST {path} HTTP/1.1\r\nHost: {target.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for path, body in routed
    ]
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        return (await loop.create_connection(_Connection, host, port))[1]

    # One connection at a time, a moment apart: a server whose worker processes share one listening
    # socket (uvicorn --workers 2) lets one process take a burst of queued connections at once, and
    # then that process alone serves all of them for the whole phase (measured: 194 instead of 680
    # requests/s for the baseline). Spaced out, each connection goes to whichever process is free.
    conns: list[_Connection | None] = []
    for _ in range(concurrency):
        conns.append(await connect())
        await asyncio.sleep(_CONNECT_SPACING_S)
    issued = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(offset: int) -> None:
        nonlocal issued
        i = offset
        conn = conns[offset]
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            data = requests[i % len(requests)]
            i += concurrency
            sent = time.perf_counter()
            try:
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    conn = await connect()
                status, payload = await asyncio.wait_for(conn.request(data), timeout_s)
                ok = status == 200 and (b'"item_list"' in payload or b'"length"' in payload)
                problem = "" if ok else f"HTTP {status}: {payload[:200]!r}"
            except (OSError, asyncio.TimeoutError, ValueError, IndexError) as exc:
                ok, problem = False, f"{type(exc).__name__}: {exc}"
                if conn is not None and conn.transport is not None:
                    conn.transport.close()  # a timed-out or broken connection is not reused
                conn = None
            result.requests += 1
            if ok:
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(problem)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    result.duration_s = time.perf_counter() - start
    result.client_cpu_ms = 1000 * (time.process_time() - cpu_start) / max(1, result.requests)
    return result


def run_load(
    url: str,
    bodies: Sequence[bytes | tuple[str, bytes]],
    concurrency: int,
    duration_s: float = 5.0,
    max_requests: int = 50_000,
    timeout_s: float = 60.0,
) -> LoadResult:
    """Closed-loop load for at most *duration_s* seconds (plus the slowest answer in flight) and at
    most *max_requests* requests."""
    return uvloop.run(_load(url, bodies, concurrency, duration_s, max_requests, timeout_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--bodies", required=True, help="a JSON file holding a list of request bodies")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=50_000)
    args = parser.parse_args()
    with open(args.bodies) as f:
        bodies = [json.dumps(b).encode() for b in json.load(f)]
    print(
        json.dumps(run_load(args.url, bodies, args.concurrency, args.duration, args.max_requests).summary())
    )


if __name__ == "__main__":
    main()
