"""The benchmark, in one command: the BentoML service against the per-request FastAPI recipe
(bench/baseline_fastapi.py) on the same checkpoint, alternately (A B A B) in one run.

    python bench/run.py --catalogue ml-100k,100k,1m

For each catalogue (ml-100k: SASRec trained on RecBole's ml-100k, window 20; 100k / 1m: synthetic,
untrained SASRec, window 50, from bench/make_large_fixture.py): make or reuse the fixture, import it
into a private model store (bench/.work/bentoml), start `bentoml serve` and the baseline (2 uvicorn
workers) on the same cores (taskset), and at each concurrency run, per round, the service then the
baseline, each after a short warm-up. Prints requests/s, p50, p99, errors, the mean adaptive batch
size (from the service's /metrics) and the service/baseline ratios; writes docs/benchmarks.md (the
part between its result markers), docs/bench_throughput.png, docs/bench_p99.png and the raw numbers
(bench/results/latest.json). Also measured: the in-process ceiling (bench/ceiling.py) and cold start
(import time, stored size, time to ready of both sides).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
os.environ.setdefault("BENTOML_HOME", str(WORK / "bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # devtools/

import httpx  # noqa: E402
from loadgen import LoadResult, percentile, run_load  # noqa: E402

from devtools.metrics import batch_counts  # noqa: E402

FIXTURES = WORK / "fixtures"
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# The service as tuned for 2 cores (docs/benchmarks.md explains each value). --service-env overrides.
SERVICE_ENV = {
    "RECBOLE_BENTO_TORCH_THREADS": "1",
    "RECBOLE_BENTO_MAX_BATCH_SIZE": "64",
    "RECBOLE_BENTO_MAX_LATENCY_MS": "10000",
    # No access log line per request, as in the baseline (uvicorn access_log=False).
    "BENTOML_CONFIG_OVERRIDES": json.dumps(
        {
            "services": {
                name: {"logging": {"access": {"enabled": False}}}
                for name in ("recbole_recommender", "recbole_ranker")
            }
        }
    ),
}


@dataclass
class Fixture:
    catalogue: str
    items: int
    window: int
    checkpoint: str
    dataset_pickle: str
    tag: str = ""
    import_s: float = 0.0
    stored_mb: float = 0.0

    @property
    def pickle_mb(self) -> float:
        return Path(self.dataset_pickle).stat().st_size / 2**20

    @property
    def checkpoint_mb(self) -> float:
        return Path(self.checkpoint).stat().st_size / 2**20


# ---------------------------------------------------------------- fixtures


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _make(catalogue: str) -> Fixture:
    if catalogue == "ml-100k":
        out = FIXTURES / "ml-100k"
        out.mkdir(parents=True, exist_ok=True)
        lines = _run(
            [sys.executable, "-m", "devtools.training", "--model", "SASRec", "--out", str(out)]
            + ["--epochs", "1", "--hidden-size", "64"],
            cwd=out,  # RecBole's Trainer writes ./log_tensorboard
        ).split()
        return Fixture(catalogue, 1682, 20, lines[-2], lines[-1])
    items = {"100k": 100_000, "1m": 1_000_000}.get(catalogue) or int(catalogue)
    line = _run([sys.executable, str(ROOT / "bench" / "make_large_fixture.py"), "--items", str(items)])
    made = json.loads(line.strip().splitlines()[-1])
    return Fixture(catalogue, items, 50, made["checkpoint"], made["dataset_pickle"])


def _stored_mb(tag: str) -> float:
    from recbole_bento.core import store

    path = Path(store.resolve(tag).path)
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


def fixture(catalogue: str, reimport: bool = False) -> Fixture:
    """Make (once) the checkpoint + dataset pickle and import them (once) into the private store."""
    import bentoml
    from bentoml.exceptions import NotFound

    record = FIXTURES / f"{catalogue}.json"
    fx = Fixture(**json.loads(record.read_text())) if record.exists() else None
    if fx is None or not Path(fx.checkpoint).exists():
        print(f"[{catalogue}] making the fixture ...", flush=True)
        fx = _make(catalogue)
    exists = False
    if fx.tag:
        with contextlib.suppress(NotFound):
            bentoml.models.get(fx.tag)
            exists = True
    if reimport or not exists:
        print(f"[{catalogue}] importing into the model store ...", flush=True)
        start = time.perf_counter()
        out = _run(
            [sys.executable, str(ROOT / "import_model.py"), fx.checkpoint]
            + ["--dataset-pickle", fx.dataset_pickle, "--name", f"sasrec-{catalogue}"]
        )
        fx.import_s = round(time.perf_counter() - start, 1)
        fx.tag = out.strip().splitlines()[-1]
        fx.stored_mb = round(_stored_mb(fx.tag), 1)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(fx), indent=1))
    return fx


def request_bodies(fx: Fixture, n: int = 256, seed: int = 0) -> list[bytes]:
    """*n* /recommend bodies: random histories of known items, 3..window long, topk 10."""
    from recbole_bento.core import store

    tokens = json.loads((Path(store.resolve(fx.tag).path) / "item_tokens.json").read_text())[1:]
    rng = random.Random(seed)
    return [
        json.dumps({"sequence": rng.choices(tokens, k=rng.randint(3, fx.window)), "topk": 10}).encode()
        for _ in range(n)
    ]


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned(cmd: list[str], cores: str | None) -> list[str]:
    return ["taskset", "-c", cores, *cmd] if cores else cmd


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    ready_s: float
    log: Path
    load_s: float | None = None


def tree_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by *root* and its descendants, by role: the
    BentoML ranking worker ("ranker"), everything else ("front"). Linux /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    out = {"front": 0.0, "ranker": 0.0}
    todo = [root]
    while todo:
        pid = todo.pop()
        role = "front"
        with contextlib.suppress(OSError):
            if b"recbole_ranker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                role = "ranker"
        out[role] += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return out


def _wait(proc: subprocess.Popen, log: Path, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if probe():
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"server not ready in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


@contextlib.contextmanager
def service(fx: Fixture, env: dict[str, str], cores: str | None) -> Iterator[Server]:
    port = _free_port()
    log = WORK / "logs" / f"service-{fx.catalogue}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _pinned(cmd, cores),
            cwd=ROOT,
            env={**os.environ, "RECBOLE_BENTO_MODEL": fx.tag, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    server = Server("service", url, proc, 0.0, log)
    try:
        _wait(proc, log, lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 600)
        server.ready_s = time.perf_counter() - start
        yield server
    finally:
        _stop(server)


@contextlib.contextmanager
def baseline(fx: Fixture, cores: str | None, workers: int, threads: int) -> Iterator[Server]:
    port = _free_port()
    log = WORK / "logs" / f"baseline-{fx.catalogue}.log"
    cmd = [sys.executable, str(ROOT / "bench" / "baseline_fastapi.py"), "--port", str(port)]
    cmd += ["--checkpoint", fx.checkpoint, "--dataset-pickle", fx.dataset_pickle]
    cmd += ["--workers", str(workers), "--torch-threads", str(threads)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _pinned(cmd, cores), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    server = Server("baseline", url, proc, 0.0, log)
    seen: dict[int, float] = {}

    def all_workers_up() -> bool:  # a fresh connection each time: the kernel spreads them over workers
        health = httpx.get(f"{url}/health", timeout=5, headers={"connection": "close"}).json()
        seen[health["pid"]] = health["load_s"]
        return len(seen) >= workers

    try:
        _wait(proc, log, all_workers_up, 600)
        server.ready_s = time.perf_counter() - start
        server.load_s = max(seen.values())
        yield server
    finally:
        _stop(server)


# ---------------------------------------------------------------- measuring


def _batch_counts(url: str) -> tuple[float, float]:
    with contextlib.suppress(httpx.HTTPError):
        return batch_counts(httpx.get(f"{url}/metrics", timeout=10).text)
    return (0.0, 0.0)


@dataclass
class Phase:
    catalogue: str
    side: str
    concurrency: int
    round: int
    result: LoadResult
    batch_sum: float = 0.0
    batch_count: float = 0.0
    cpu_s: float = 0.0  # CPU seconds the server's processes used during the phase
    ranker_cpu_s: float = 0.0  # of which the ranking worker(s)

    @property
    def cpu_ms_per_request(self) -> float:
        ok = self.result.requests - self.result.errors
        return 1000 * self.cpu_s / ok if ok else float("nan")


def measure(server: Server, fx: Fixture, bodies: list[bytes], c: int, rnd: int, args) -> Phase:
    run_load(server.url + "/recommend", bodies, c, args.warmup, timeout_s=args.timeout)
    before = _batch_counts(server.url) if server.name == "service" else (0.0, 0.0)
    cpu_before = tree_cpu_s(server.proc.pid)
    result = run_load(server.url + "/recommend", bodies, c, args.duration, args.max_requests, args.timeout)
    cpu_after = tree_cpu_s(server.proc.pid)
    after = _batch_counts(server.url) if server.name == "service" else (0.0, 0.0)
    calls, histories = after[0] - before[0], after[1] - before[1]  # batch_counts
    phase = Phase(fx.catalogue, server.name, c, rnd, result, batch_sum=histories, batch_count=calls)
    phase.cpu_s = sum(cpu_after.values()) - sum(cpu_before.values())
    phase.ranker_cpu_s = cpu_after["ranker"] - cpu_before["ranker"]
    mean_batch = phase.batch_sum / phase.batch_count if phase.batch_count else float("nan")
    print(
        f"  [{fx.catalogue} c={c:<3} r{rnd}] {server.name:8s} {result.rps:8.1f} req/s  "
        f"p50 {result.percentile(50):7.1f} ms  p99 {result.percentile(99):7.1f} ms  "
        f"errors {result.errors}  cpu {phase.cpu_ms_per_request:5.2f} ms/req"
        f" (load generator {result.client_cpu_ms:.2f})"
        + (
            f" (ranker {1000 * phase.ranker_cpu_s / max(1, result.requests - result.errors):.2f})"
            f"  batch {mean_batch:.1f}"
            if server.name == "service"
            else ""
        ),
        flush=True,
    )
    for sample in result.error_samples[:2]:
        print(f"      error: {sample}", flush=True)
    return phase


def summarise(phases: list[Phase]) -> dict:
    """Per side: requests/s over all rounds, p50/p99 of the pooled latencies, errors, mean batch."""
    out = {}
    for side in ("service", "baseline"):
        mine = [p for p in phases if p.side == side]
        ok = sum(p.result.requests - p.result.errors for p in mine)
        latencies = [x for p in mine for x in p.result.latencies_ms]
        count = sum(p.batch_count for p in mine)
        out[side] = {
            "rps": ok / sum(p.result.duration_s for p in mine),
            "rps_rounds": [round(p.result.rps, 1) for p in mine],
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "requests": sum(p.result.requests for p in mine),
            "errors": sum(p.result.errors for p in mine),
            "mean_batch": sum(p.batch_sum for p in mine) / count if count else None,
            "cpu_ms_per_request": 1000 * sum(p.cpu_s for p in mine) / ok if ok else None,
            "ranker_cpu_ms_per_request": 1000 * sum(p.ranker_cpu_s for p in mine) / ok if ok else None,
        }
    s, b = out["service"], out["baseline"]
    out["rps_ratio"] = s["rps"] / b["rps"] if b["rps"] else float("inf")
    out["p99_ratio"] = s["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan")
    return out


def ceiling(fx: Fixture, cores: str | None, threads: int, budget: float) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "bench" / "ceiling.py"), fx.tag, "--threads", str(threads)]
    cmd += ["--budget", str(budget)]
    lines = _run(_pinned(cmd, cores)).strip().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


# ---------------------------------------------------------------- reporting


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        f"Run: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before/after: {report['load_before']} / "
        f"{report['load_after']}  ",
        f"Service env: `{' '.join(f'{k}={v}' for k, v in report['service_env'].items())}`; "
        f"baseline: {report['baseline']}; both on cores `{report['cores'] or 'all'}`; "
        f"{report['rounds']} rounds x {report['duration_s']} s per side and concurrency "
        f"(+{report['warmup_s']} s warm-up), alternating service / baseline.",
        "",
        "| catalogue | conc. | service req/s | baseline req/s | **rps ratio** | service p50 ms "
        "| baseline p50 ms | service p99 ms | baseline p99 ms | **p99 ratio** | errors (s/b) | mean batch "
        "| service CPU ms/req (ranker) | baseline CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cat, rows in report["results"].items():
        for c, r in rows.items():
            s, b = r["service"], r["baseline"]
            lines.append(
                f"| {cat} | {c} | {_fmt(s['rps'])} | {_fmt(b['rps'])} | **{_fmt(r['rps_ratio'], 2)}x** "
                f"| {_fmt(s['p50_ms'])} | {_fmt(b['p50_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(b['p99_ms'])} "
                f"| **{_fmt(r['p99_ratio'], 2)}x** | {s['errors']} / {b['errors']} "
                f"| {_fmt(s['mean_batch'])} | {_fmt(s['cpu_ms_per_request'], 2)} "
                f"({_fmt(s['ranker_cpu_ms_per_request'], 2)}) | {_fmt(b['cpu_ms_per_request'], 2)} |"
            )
    targets = {"ml-100k": (1.5, 1.2), "1m": (4.0, 0.5)}  # issue 4, at concurrency 32
    for cat, (rps_target, p99_target) in targets.items():
        r = report["results"].get(cat, {}).get("32")
        if r:
            ok = r["rps_ratio"] >= rps_target and r["p99_ratio"] <= p99_target
            lines.append(
                f"\nTarget {cat} at concurrency 32: rps ratio >= {rps_target}x and p99 ratio "
                f"<= {p99_target}x: **{'met' if ok else 'not met'}** "
                f"({r['rps_ratio']:.2f}x, {r['p99_ratio']:.2f}x)."
            )
    if report["ceiling"]:
        lines += [
            "",
            "In-process ceiling (no HTTP; sequences/s; `naive` = batched full_sort_predict + masks + "
            "torch.topk, `engine` = Engine.rank as served):",
            "",
            "| catalogue | torch threads | batch | naive seq/s | engine seq/s | block top-k |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for cat, rows in report["ceiling"].items():
            for r in rows:
                lines.append(
                    f"| {cat} | {r['threads']} | {r['batch']} | {_fmt(r['naive_seq_s'])} "
                    f"| {_fmt(r['engine_seq_s'])} | {'yes' if r['block_topk'] else 'no'} |"
                )
    lines += [
        "",
        "Cold start:",
        "",
        "| catalogue | import s | stored MB | service: serve -> ready s | checkpoint MB | dataset pickle MB "
        "| baseline: start -> all workers ready s | baseline load s (per worker) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cat, cs in report["cold_start"].items():
        lines.append(
            f"| {cat} | {_fmt(cs['import_s'])} | {_fmt(cs['stored_mb'])} | {_fmt(cs['service_ready_s'])} "
            f"| {_fmt(cs['checkpoint_mb'])} | {_fmt(cs['dataset_pickle_mb'])} "
            f"| {_fmt(cs['baseline_ready_s'])} | {_fmt(cs['baseline_load_s'])} |"
        )
    return "\n".join(lines)


def plots(report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cats = list(report["results"])
    for key, label, name in (
        ("rps", "requests/s", "bench_throughput.png"),
        ("p99_ms", "p99 ms", "bench_p99.png"),
    ):
        fig, axes = plt.subplots(1, len(cats), figsize=(4.2 * len(cats), 3.4), squeeze=False)
        for ax, cat in zip(axes[0], cats, strict=True):
            rows = report["results"][cat]
            xs = [int(c) for c in rows]
            for side, style in (("service", "o-"), ("baseline", "s--")):
                ax.plot(xs, [rows[c][side][key] for c in rows], style, label=side)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            if key == "p99_ms":
                ax.set_yscale("log")
            ax.set_title(f"{cat}")
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"{label} vs concurrency (BentoML service vs per-request FastAPI)")
        fig.tight_layout()
        path = DOCS / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_docs(report: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    path = DOCS / "benchmarks.md"
    block = (
        f"{START}\n{markdown(report)}\n\n![throughput](bench_throughput.png)\n![p99](bench_p99.png)\n{END}"
    )
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    plots(report)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="ml-100k,100k,1m", help="ml-100k, 100k, 1m (comma-separated)")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per concurrency")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per phase")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--cores", default="0,1" if (os.cpu_count() or 1) >= 2 else None, help="taskset list")
    parser.add_argument("--baseline-workers", type=int, default=2)
    parser.add_argument("--baseline-threads", type=int, default=0, help="torch threads; 0 = torch default")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ceiling-threads", type=int, default=1)
    parser.add_argument("--ceiling-budget", type=float, default=1.0, help="0 = skip the ceiling")
    parser.add_argument("--reimport", action="store_true", help="re-import to re-measure the import time")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    env = dict(SERVICE_ENV)
    env.update(kv.split("=", 1) for kv in args.service_env)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    report: dict = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "service_env": env,
        "baseline": f"{args.baseline_workers} uvicorn workers, torch threads "
        f"{args.baseline_threads or 'default'}",
        "cores": args.cores,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "results": {},
        "ceiling": {},
        "cold_start": {},
        "phases": [],
    }
    for cat in args.catalogue.split(","):
        fx = fixture(cat, args.reimport)
        bodies = request_bodies(fx)
        if args.ceiling_budget > 0:
            print(f"[{cat}] in-process ceiling ...", flush=True)
            report["ceiling"][cat] = ceiling(fx, args.cores, args.ceiling_threads, args.ceiling_budget)
            for row in report["ceiling"][cat]:
                print(
                    f"  batch {row['batch']:>3}: naive {row['naive_seq_s']:8.1f} seq/s  "
                    f"engine {row['engine_seq_s']:8.1f} seq/s",
                    flush=True,
                )
        print(f"[{cat}] starting the service, then the baseline ...", flush=True)
        with (
            service(fx, env, args.cores) as svc,
            baseline(fx, args.cores, args.baseline_workers, args.baseline_threads) as base,
        ):
            report["cold_start"][cat] = {
                "import_s": fx.import_s,
                "stored_mb": fx.stored_mb,
                "service_ready_s": svc.ready_s,
                "checkpoint_mb": fx.checkpoint_mb,
                "dataset_pickle_mb": fx.pickle_mb,
                "baseline_ready_s": base.ready_s,
                "baseline_load_s": base.load_s,
            }
            print(f"  ready: service {svc.ready_s:.1f} s, baseline {base.ready_s:.1f} s", flush=True)
            report["results"][cat] = {}
            for c in concurrencies:
                phases = [
                    measure(server, fx, bodies, c, rnd, args)
                    for rnd in range(args.rounds)
                    for server in (svc, base)
                ]
                summary = summarise(phases)
                report["results"][cat][str(c)] = summary
                report["phases"] += [
                    {
                        "catalogue": cat,
                        "side": p.side,
                        "concurrency": c,
                        "round": p.round,
                        **p.result.summary(),
                    }
                    for p in phases
                ]
                print(
                    f"  => {cat} c={c}: rps ratio {summary['rps_ratio']:.2f}x, "
                    f"p99 ratio {summary['p99_ratio']:.2f}x",
                    flush=True,
                )
    report["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(markdown(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.no_docs:
        write_docs(report)
        print(f"\nwrote {DOCS / 'benchmarks.md'}, {DOCS / 'bench_throughput.png'}, {DOCS / 'bench_p99.png'}")


if __name__ == "__main__":
    main()
