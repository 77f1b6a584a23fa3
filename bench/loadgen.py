"""A closed-loop HTTP load generator (asyncio + aiohttp): *concurrency* clients each send the next
body as soon as their previous answer is in, until a time or request budget runs out.

    python bench/loadgen.py http://127.0.0.1:3000/recommend --concurrency 32 --duration 5 --bodies b.json

A request counts as an error unless it answers 200 with an ``item_list``; timeouts and connection
errors count too. Latency is measured per request, from send to the last byte of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)
    error_samples: list[str] = field(default_factory=list)

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


async def _load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
) -> LoadResult:
    result = LoadResult(concurrency, 0, 0, 0.0)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"content-type": "application/json"}
    issued = 0
    start = time.perf_counter()
    deadline = start + duration_s

    async def client(session: aiohttp.ClientSession, offset: int) -> None:
        nonlocal issued
        i = offset
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            body = bodies[i % len(bodies)]
            i += concurrency
            sent = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    payload = await resp.read()
                ok = resp.status == 200 and b'"item_list"' in payload
                problem = "" if ok else f"HTTP {resp.status}: {payload[:200]!r}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok, problem = False, f"{type(exc).__name__}: {exc}"
            result.requests += 1
            if ok:
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
            else:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(problem)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session, n) for n in range(concurrency)))
    result.duration_s = time.perf_counter() - start
    return result


def run_load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float = 5.0,
    max_requests: int = 50_000,
    timeout_s: float = 60.0,
) -> LoadResult:
    """Closed-loop load for at most *duration_s* seconds (plus the slowest answer in flight) and at
    most *max_requests* requests."""
    return asyncio.run(_load(url, bodies, concurrency, duration_s, max_requests, timeout_s))


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
