"""Soak test on loopback: many concurrent connections for a fixed time, then check that nothing
failed and that the service's memory did not grow.

    python bench/load_test.py --model sasrec-ml-100k --seconds 60      # starts `bentoml serve` itself
    python bench/load_test.py --url http://127.0.0.1:3000 --seconds 60  # a server already running here

Pass: every request answered 200 with an item list (no transport error, no other status), and the
resident memory of the serving processes (the `bentoml serve` process and its workers) after the run
within ``--max-rss-growth`` (10%) of what it was after the warm-up. Bounded in time (``--seconds``,
plus the slowest answer in flight) and in count (``--max-requests``). Loopback URLs only. Prints one
JSON object; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import run_load  # noqa: E402  (bench/loadgen.py: the closed-loop generator)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devtools.local_server import local_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"load_test: {url} is not a loopback URL; this test only targets this machine")


def serving_processes(url: str) -> list[psutil.Process]:
    """The process listening on *url*'s port, its `bentoml serve` ancestors and all their workers."""
    port = urlsplit(url).port
    listeners = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.pid}
    if not listeners:
        raise RuntimeError(f"no process of this user listens on port {port}")
    root = psutil.Process(min(listeners))
    while (parent := root.parent()) is not None and "bentoml" in " ".join(parent.cmdline()):
        root = parent
    return [root, *root.children(recursive=True)]


def rss_bytes(processes: Sequence[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def make_bodies(tokens: Sequence[str], n: int = 2000, seed: int = 0) -> list[bytes]:
    """/recommend bodies: histories of 1-50 known items, some with filters, topk 10."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        body: dict = {"sequence": rng.sample(list(tokens), rng.randint(1, min(50, len(tokens)))), "topk": 10}
        if i % 5 == 0:
            body["exclude_seen"] = True
        if i % 7 == 0:
            body["candidates"] = rng.sample(list(tokens), min(100, len(tokens)))
        bodies.append(json.dumps(body).encode())
    return bodies


def item_tokens(url: str) -> list[str]:
    """The served model's item ids, read from the local model store it was loaded from."""
    import bentoml

    tag = httpx.post(f"{url}/model_info", json={}, timeout=30).json()["tag"]
    return json.loads((Path(bentoml.models.get(tag).path) / "item_tokens.json").read_text())[1:]


def soak(
    url: str,
    bodies: Sequence[bytes],
    *,
    connections: int = 128,
    seconds: float = 60,
    warmup_s: float = 10,
    max_requests: int = 2_000_000,
    processes: Sequence[psutil.Process] | None = None,
) -> dict:
    check_loopback(url)
    processes = list(processes) if processes is not None else serving_processes(url)
    endpoint = f"{url}/recommend"
    warm = run_load(endpoint, bodies, connections, warmup_s, max_requests)
    time.sleep(1.0)
    rss_warm = rss_bytes(processes)
    run = run_load(endpoint, bodies, connections, seconds, max_requests)
    time.sleep(1.0)
    rss_after = rss_bytes(processes)
    alive = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return {
        "connections": connections,
        "seconds": round(run.duration_s, 2),
        "requests": run.requests,
        "errors": run.errors,
        "error_samples": run.error_samples,
        "warmup_errors": warm.errors,
        "rps": round(run.rps, 1),
        "p50_ms": round(run.percentile(50), 1),
        "p99_ms": round(run.percentile(99), 1),
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_after_run_mib": round(rss_after / 2**20, 1),
        "rss_growth": round(rss_after / rss_warm - 1, 4),
        "processes": len(processes),
        "processes_alive": len(alive),
    }


def passed(report: dict, max_rss_growth: float = 0.10) -> bool:
    return (
        report["errors"] == 0
        and report["warmup_errors"] == 0
        and report["requests"] > 0
        and report["rss_growth"] <= max_rss_growth
        and report["processes_alive"] == report["processes"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a server already running on this machine")
    target.add_argument("--model", help="model store tag: start `bentoml serve` for it")
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=20, help="seconds of the same load before measuring")
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    args = parser.parse_args()
    if args.url:
        check_loopback(args.url)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server(args.model))
        bodies = make_bodies(item_tokens(url))
        report = soak(
            url,
            bodies,
            connections=args.connections,
            seconds=args.seconds,
            warmup_s=args.warmup,
            max_requests=args.max_requests,
        )
    report["passed"] = passed(report, args.max_rss_growth)
    print(json.dumps(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
