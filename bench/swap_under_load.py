"""Hot swaps under load, and the A/B split, measured on a real `bentoml serve` (docs/benchmarks.md,
"Model lifecycle").

    python bench/swap_under_load.py                # trains and imports three ml-100k models once

1. Three models on ml-100k (devtools.training, demo size): two SASRec (seeds 1 and 2: the same
   catalogue, different weights) and a GRU4Rec (another class), imported into a private store.
2. A server with one variant ``main`` and an admin token. c=``--concurrency`` closed-loop clients
   send /recommend for ``--steady`` seconds (steady p99), then for ``--duration`` seconds while
   ``--swaps`` swaps alternate ``main`` between the two SASRec (POST /admin/routes), then the same
   with swaps between SASRec and GRU4Rec. Counted: non-2xx, connection errors, and, for a sample
   of the answers, whether the answer equals what the model it names answers for that request (an
   engine of each model in this process); p99 of the requests sent while a swap was in progress
   vs the steady p99.
3. The shadow's cost: steady load without and with a GRU4Rec shadow, alternated A B A B, and the
   shadow's metrics (overlap, dropped requests).
4. Memory: the server's RSS once the swaps settled, against a fresh server with the same routes.
5. The A/B split: routes control 90 / treatment 10; 10,000 keys sent as ``assignment_key``: the
   share of each variant; then every key again, and again after a server restart: the same variant
   each time (2 API workers answer, the kernel spreads the connections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(__file__).resolve().parent / ".work" / "swap"
TOKEN = "bench-admin-token"


def models() -> dict[str, str]:
    """The three tags, each trained and imported once (recorded in WORK/models.json as it lands)."""
    import bentoml

    record = WORK / "models.json"
    tags = json.loads(record.read_text()) if record.exists() else {}
    for name, model, seed in (("a", "SASRec", 1), ("b", "SASRec", 2), ("other", "GRU4Rec", 1)):
        try:
            bentoml.models.get(tags[name])
            continue
        except Exception:  # not trained yet, or the store was removed: (re)made below
            pass
        checkpoint = WORK / "ckpt" / name / f"{model}.pth"
        if checkpoint.exists():
            pickle = next((WORK / "ckpt" / name).glob("*-dataset.pkl"))
        else:
            from devtools.training import train

            print(f"training {model} (seed {seed}) ...", flush=True)
            trained = train(model, WORK / "ckpt" / name, overrides={"seed": seed})
            checkpoint, pickle = Path(trained.checkpoint), Path(trained.dataset_pickle)
        out = subprocess.run(
            [sys.executable, str(ROOT / "import_model.py"), str(checkpoint)]
            + ["--dataset-pickle", str(pickle), "--name", f"{model.lower()}-swap-{name}"],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        tags[name] = out.stdout.strip().splitlines()[-1]
        record.write_text(json.dumps(tags))
    return tags


def bodies(tokens: list[str], n: int = 512, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"sequence": rng.sample(tokens, rng.randint(3, 20)), "topk": 10} for _ in range(n)]


class Reference:
    """What each model answers, computed in this process: the engine and planner the server uses."""

    def __init__(self, tags: list[str]) -> None:
        from recbole_bento.core import store
        from recbole_bento.core.engine import Engine
        from recbole_bento.core.planner import Planner

        self.models = {}
        for tag in tags:
            engine = Engine(store.load(store.resolve(tag)), device="cpu")
            self.models[tag] = (engine, Planner(engine.artifact, 1000))

    def answer(self, tag: str, body: dict) -> list[str]:
        from recbole_bento.schemas import RecommendRequest

        engine, planner = self.models[tag]
        plan = planner.plan(RecommendRequest(**body))
        result = engine.rank([plan.query])[0] if plan.rankable else planner.popular(plan)
        return planner.answer(plan, result)["item_list"]


async def load(
    url: str, payloads: list[dict], concurrency: int, seconds: float, swaps: list, log: list
) -> None:
    """*concurrency* clients until *seconds* pass; each answer as (sent, latency_s, status, body, answer)."""
    import aiohttp

    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(i: int) -> None:
            n = i
            while time.monotonic() < deadline:
                body = payloads[n % len(payloads)]
                n += concurrency
                sent = time.monotonic()
                try:
                    async with session.post(f"{url}/recommend", json=body) as response:
                        answer = await response.json(content_type=None)
                        log.append((sent, time.monotonic() - sent, response.status, body, answer))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.append((sent, time.monotonic() - sent, 0, body, {"error": repr(exc)}))

        await asyncio.gather(*(client(i) for i in range(concurrency)), *swaps)


async def swapper(url: str, routes: list[dict], n: int, seconds: float, windows: list) -> None:
    """*n* swaps spread over *seconds*, cycling through *routes*; each swap's (start, end, status)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        for i in range(n):
            await asyncio.sleep(seconds / (n + 1))
            start = time.monotonic()
            async with session.post(
                f"{url}/admin/routes",
                json=routes[i % len(routes)],
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                await response.read()
                windows.append((start, time.monotonic(), response.status))


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else float("nan")


def phase(url, payloads, args, routes, reference, label) -> dict:
    log: list = []
    windows: list = []
    swaps = [swapper(url, routes, args.swaps, args.duration, windows)] if routes else []
    asyncio.run(load(url, payloads, args.concurrency, args.duration if routes else args.steady, swaps, log))
    statuses = [entry[2] for entry in log]
    during = [lat for sent, lat, *_ in log if any(s <= sent <= e for s, e, _ in windows)]
    ok = [entry for entry in log if entry[2] == 200]
    sample = random.Random(0).sample(ok, min(args.check, len(ok)))
    differ = sum(reference.answer(a["model"], body) != a["item_list"] for *_, body, a in sample)
    out = {
        "phase": label,
        "requests": len(log),
        "non_2xx": sum(1 for s in statuses if s and not 200 <= s < 300),
        "connection_errors": statuses.count(0),
        "checked": len(sample),
        "differ": differ,
        "p99_ms": round(p99([entry[1] for entry in log]), 1),
        "rps": round(len(log) / (args.duration if routes else args.steady), 1),
        "models_seen": sorted({a.get("model", "?") for *_, a in ok}),
    }
    if routes:
        out["swaps"] = [status for *_, status in windows]
        out["swap_seconds"] = [round(e - s, 2) for s, e, _ in windows]
        out["p99_during_swaps_ms"] = round(p99(during), 1)
        out["requests_during_swaps"] = len(during)
    print(json.dumps(out), flush=True)
    return out


def settled_rss_mb(url: str, payloads: list[dict], args: argparse.Namespace) -> float:
    """The server's resident memory (every process) after 5 s of light load and a quiet 5 s: time
    for a swapped-out model's last requests to finish and its memory to be returned."""
    from load_test import rss_bytes, serving_processes

    asyncio.run(load(url, payloads, 4, 5.0, [], []))
    time.sleep(5)
    return round(rss_bytes(serving_processes(url)) / 2**20, 1)


def set_routes(url: str, routes: dict) -> None:
    import httpx

    answer = httpx.post(
        f"{url}/admin/routes", json=routes, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=180
    )
    answer.raise_for_status()


def shadow_metrics(url: str) -> dict:
    """The shadow's counters on /metrics: overlap observations, their mean, dropped requests."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"overlap_count": 0.0, "overlap_sum": 0.0, "dropped": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "recbole_bento_shadow_overlap_count":
                totals["overlap_count"] += sample.value
            elif sample.name == "recbole_bento_shadow_overlap_sum":
                totals["overlap_sum"] += sample.value
            elif sample.name == "recbole_bento_shadow_dropped_total":
                totals["dropped"] += sample.value
    count = totals["overlap_count"]
    return {**totals, "mean_overlap": round(totals["overlap_sum"] / count, 3) if count else None}


def split(url: str, keys: list[str], concurrency: int = 16) -> list[str]:
    """The variant that answers each key (as ``assignment_key``), *concurrency* requests at a time."""
    import aiohttp

    variants: list[str] = [""] * len(keys)

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def client(start: int) -> None:
                for i in range(start, len(keys), concurrency):
                    body = {"sequence": ["1"], "topk": 1, "assignment_key": keys[i]}
                    async with session.post(f"{url}/recommend", json=body) as response:
                        variants[i] = (await response.json(content_type=None))["variant"]

            await asyncio.gather(*(client(i) for i in range(concurrency)))

    asyncio.run(run())
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load during the swaps")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of load without swaps")
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--check", type=int, default=500, help="answers compared with the named model's")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=WORK / "result.json")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BENTOML_HOME", str(WORK / "bentoml"))
    from devtools.local_server import local_server

    tags = models()
    from recbole_bento.core import store

    tokens = json.loads((Path(store.resolve(tags["a"]).path) / "item_tokens.json").read_text())[1:]
    payloads = bodies(tokens)
    reference = Reference(list(tags.values()))
    routes_file = WORK / "routes.yaml"
    routes_file.write_text(f"variants: {{main: '{tags['a']}'}}\n")
    env = {"RECBOLE_BENTO_ROUTES": str(routes_file), "RECBOLE_BENTO_ADMIN_TOKEN": TOKEN}
    result: dict = {"models": tags, "concurrency": args.concurrency, "phases": []}
    same = [{"variants": {"main": tags["b"]}}, {"variants": {"main": tags["a"]}}]
    other = [{"variants": {"main": tags["other"]}}, {"variants": {"main": tags["a"]}}]
    plain = {"variants": {"main": tags["a"]}}
    shadowed = {**plain, "shadow": tags["other"]}
    with local_server(tags["a"], env=env, log_path=WORK / "serve.log") as url:
        for label, routes in (("steady", None), ("swaps, same class", same), ("steady", None),
                              ("swaps, another class", other)):  # fmt: skip
            result["phases"].append(phase(url, payloads, args, routes, reference, label))
        # the shadow's cost: steady load without and with a shadow model, alternated A B A B
        for label, routes in (("no shadow", plain), ("shadow", shadowed)) * 2:
            set_routes(url, routes)
            result["phases"].append(phase(url, payloads, args, None, reference, f"steady, {label}"))
        result["shadow_metrics"] = shadow_metrics(url)
        print(json.dumps(result["shadow_metrics"]), flush=True)
        set_routes(url, plain)  # the memory after the swaps settle, against a fresh server's
        result["rss_after_swaps_mb"] = settled_rss_mb(url, payloads, args)
    with local_server(tags["a"], env=env, log_path=WORK / "serve-fresh.log") as url:
        result["rss_fresh_mb"] = settled_rss_mb(url, payloads, args)
    result["rss_ratio"] = round(result["rss_after_swaps_mb"] / result["rss_fresh_mb"], 3)
    print(json.dumps({k: result[k] for k in ("rss_after_swaps_mb", "rss_fresh_mb", "rss_ratio")}), flush=True)
    keys = [f"user-{i}" for i in range(args.keys)]
    ab = {
        "variants": {
            "control": {"model": tags["a"], "weight": 90},
            "treatment": {"model": tags["b"], "weight": 10},
        }
    }
    routes_file.write_text(json.dumps({**ab, "salt": "bench"}))
    runs = []
    for _ in range(2):  # a restart between the two
        with local_server(tags["a"], env=env, log_path=WORK / "serve-split.log") as url:
            runs.append(split(url, keys))
            runs.append(split(url, keys))
    treatment = runs[0].count("treatment") / len(keys)
    result["split"] = {
        "keys": len(keys),
        "treatment_share": round(treatment, 4),
        "weight": 0.10,
        "same_variant_every_time": all(r == runs[0] for r in runs),
        "answers_per_key": len(runs),
    }
    print(json.dumps(result["split"]), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
