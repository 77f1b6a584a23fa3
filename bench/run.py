"""The benchmark, in one command: the service as shipped against each peer, one peer at a time.

    python bench/run.py                                  # ml-100k and 1m, the full run
    python bench/run.py --catalogue ml-100k --rounds 1 --duration 5 --soak 5 --warmup 1   # smoke

Sides: the service as shipped (``bentoml serve .``, no tuning environment at all), the per-request
recipe tuned (bench/baseline_fastapi.py), LitServe (bench/peer_litserve.py) and Ray Serve
(bench/peer_rayserve.py), both from the peers venv (bench/peers/setup.sh), and with ``--tuned`` the
service with a tuning environment. Per catalogue and peer, A B A B: each round starts the service,
measures every concurrency, stops it, then does the same with the peer. One server is up at a time:
an idle framework is not idle on the CPU (LitServe's and Ray's loops poll), and the other side would
pay for it. Each side's first answers to the same histories are compared (same top-10). The load
generator is wrk (bench/wrk_bodies.lua), pinned apart from the servers where the machine has a core
to spare. Then the in-process ceiling (bench/ceiling.py) at the batch sizes the service formed.
Writes the result block of docs/benchmarks.md and bench/results/latest.json; docs/benchmarks.md
says how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = BENCH / ".work"
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from devtools.metrics import batch_counts  # noqa: E402

FIXTURES = WORK / "fixtures"
PEERS_PYTHON = WORK / "peers-venv" / "bin" / "python"
WRK_SCRIPT = BENCH / "wrk_bodies.lua"
DOCS = ROOT / "docs"
RESULTS = BENCH / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# --tuned: the service with what docs/configuration.md offers for a small CPU machine. --service-env adds.
TUNED_ENV = {
    "RECBOLE_BENTO_TORCH_THREADS": "1",
    "BENTOML_CONFIG_OVERRIDES": json.dumps(
        {
            "services": {
                name: {"logging": {"access": {"enabled": False}}}
                for name in ("recbole_recommender", "recbole_ranker")
            }
        }
    ),
}
PEERS = ("recipe", "litserve", "rayserve")
LABELS = {
    "service": "this service, as shipped",
    "service-tuned": "this service, tuned (`--tuned`)",
    "recipe": "per-request FastAPI recipe, tuned",
    "litserve": "LitServe 0.2.19",
    "rayserve": "Ray Serve 2.60",
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


# ---------------------------------------------------------------- fixtures


def _product_env() -> dict[str, str]:
    """Every subprocess imports this checkout's package, whatever the venv's editable install
    points at."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 1800) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_product_env(), capture_output=True, text=True, timeout=timeout)
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
    line = _run([sys.executable, str(BENCH / "make_large_fixture.py"), "--items", str(items)])
    made = json.loads(line.strip().splitlines()[-1])
    return Fixture(catalogue, items, 50, made["checkpoint"], made["dataset_pickle"])


def _stored_path(tag: str) -> Path:
    from recbole_bento.core import store

    return Path(store.resolve(tag).path)


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
            # the synthetic catalogues' SASRec is untrained (bench/make_large_fixture.py): it records
            # no validation score to check the item vocabulary against
            + (["--skip-vocabulary-check"] if catalogue != "ml-100k" else [])
        )
        fx.import_s = round(time.perf_counter() - start, 1)
        fx.tag = out.strip().splitlines()[-1]
        stored = _stored_path(fx.tag)
        fx.stored_mb = round(sum(p.stat().st_size for p in stored.iterdir() if p.is_file()) / 2**20, 1)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(asdict(fx), indent=1))
    return fx


def request_bodies(fx: Fixture, n: int = 256, seed: int = 0) -> Path:
    """A file of *n* /recommend bodies, one a line: random histories of known items, 3..window long,
    topk 10. Every side gets the same file, sent in the same order."""
    tokens = json.loads((_stored_path(fx.tag) / "item_tokens.json").read_text())[1:]
    rng = random.Random(seed)
    path = WORK / "bodies" / f"{fx.catalogue}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"sequence": rng.choices(tokens, k=rng.randint(3, fx.window)), "topk": 10}) + "\n"
            for _ in range(n)
        )
    )
    return path


# ---------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    side: str  # "service", "service-tuned" or a peer
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    ready_s: float = 0.0


def _session(sid: int) -> list[int]:
    """Live processes of session *sid*: each server starts its own session, and a framework's
    workers can outlive or leave the process that started them (LitServe's do; Ray's have their
    own process groups), so the session is what holds all of them."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.append(int(entry))
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(sid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _session(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop(server: Server, kill: bool = True) -> None:
    """SIGTERM to the server's main process, then to whatever of its session is left; SIGKILL only
    where *kill* (never for Ray: it leaves Ray's agents behind)."""
    sid = server.proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(sid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(60)
    if left := _wait_gone(sid, 10):
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(sid, 30)
    if left and kill:
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(sid, 10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(1)
    if left:
        print(f"  WARNING: {server.name} left processes {left} (see {server.log})", flush=True)


@contextlib.contextmanager
def serving(
    side: str,
    fx: Fixture,
    cmd: list[str],
    cores: str,
    ready: Callable[[str], bool],
    env: dict[str, str] | None = None,
    kill: bool = True,
) -> Iterator[Server]:
    """Start *cmd* pinned to *cores* in its own session, wait until ``ready(url)``, stop it after."""
    name = f"{side}-{fx.catalogue}"
    port = _free_port()
    cmd = [part.replace("{port}", str(port)) for part in cmd]
    log = WORK / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", cores, *cmd],
            cwd=ROOT,
            env=env or _product_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(side, name, f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if ready(server.url):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready in 900 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        server.ready_s = time.perf_counter() - start
        yield server
    finally:
        stop(server, kill)


def _answers(body: bytes) -> Callable[[str], bool]:
    def ready(url: str) -> bool:
        headers = {"content-type": "application/json"}
        return httpx.post(f"{url}/recommend", content=body, headers=headers, timeout=30).status_code == 200

    return ready


def _all_workers(workers: int, probe_body: bytes) -> Callable[[str], bool]:
    """The recipe is ready when every uvicorn worker has answered /health: its workers share one
    socket, so a fresh connection each time reaches them in turn."""
    seen: set[int] = set()

    def ready(url: str) -> bool:
        seen.add(httpx.get(f"{url}/health", timeout=5, headers={"connection": "close"}).json()["pid"])
        return len(seen) >= workers and _answers(probe_body)(url)

    return ready


def start_side(
    side: str, fx: Fixture, args: argparse.Namespace, probe_body: bytes
) -> contextlib.AbstractContextManager[Server]:
    """The context manager that serves *side* on the server cores."""
    cores = args.server_cores
    model = ["--checkpoint", fx.checkpoint, "--dataset-pickle", fx.dataset_pickle, "--port", "{port}"]
    if side in ("service", "service-tuned"):
        env = {k: v for k, v in _product_env().items() if not k.startswith("RECBOLE_BENTO_")}
        env.pop("BENTOML_CONFIG_OVERRIDES", None)
        env["RECBOLE_BENTO_MODEL"] = fx.tag
        if side == "service-tuned":
            env.update(TUNED_ENV)
            env.update(kv.split("=", 1) for kv in args.service_env)
        cmd = [sys.executable, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", "{port}"]

        def ready(url: str) -> bool:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200 and _answers(probe_body)(url)

        return serving(side, fx, cmd, cores, ready, env)
    n_cores = len(cores.split(","))
    if side == "recipe":
        cmd = [sys.executable, str(BENCH / "baseline_fastapi.py"), *model, "--workers", str(n_cores)]
        return serving(side, fx, cmd, cores, _all_workers(n_cores, probe_body))
    if not PEERS_PYTHON.exists():
        raise SystemExit(f"{PEERS_PYTHON} is missing: run bench/peers/setup.sh (make bench-peers-env)")
    if side == "litserve":
        cmd = [str(PEERS_PYTHON), str(BENCH / "peer_litserve.py"), *model, "--workers", str(n_cores)]
        return serving(side, fx, cmd, cores, _answers(probe_body), env=dict(os.environ))
    if side == "rayserve":
        cmd = [str(PEERS_PYTHON), str(BENCH / "peer_rayserve.py"), *model]
        return serving(side, fx, cmd, cores, _answers(probe_body), env=dict(os.environ), kill=False)
    raise SystemExit(f"unknown side {side!r}")


# ---------------------------------------------------------------- measuring


def tree_cpu_s(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by *root* and each of its descendants, with its
    role: the service's model worker ("ranker"), anything else ("front"). Linux /proc."""
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
    out = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        role = "front"
        with contextlib.suppress(OSError):
            if b"recbole_ranker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                role = "ranker"
        out[pid] = (role, cpu.get(pid, 0.0))
        todo += children.get(pid, [])
    return out


def _cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[int, float]:
    return {pid: cpu - before.get(pid, (role, 0.0))[1] for pid, (role, cpu) in after.items()}


def _service_batches(server: Server) -> tuple[float, float]:
    if not server.side.startswith("service"):
        return (0.0, 0.0)
    return batch_counts(httpx.get(f"{server.url}/metrics", timeout=10).text)


@dataclass
class WrkResult:
    requests: int  # answered, whatever the status
    errors: int  # non-2xx answers + socket errors + timeouts
    duration_s: float
    p50_ms: float
    p99_ms: float
    generator_cpu_s: float  # wrk's own user + system CPU

    @property
    def rps(self) -> float:
        """Answered 2xx per second."""
        return max(0, self.requests - self.errors) / self.duration_s if self.duration_s else 0.0


def parse_wrk(stdout: str) -> dict:
    """The JSON line bench/wrk_bodies.lua prints in done()."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"no result line from wrk:\n{stdout[-2000:]}")
    return json.loads(lines[-1])


def run_wrk(url: str, bodies: Path, concurrency: int, seconds: int, cores: str, timeout_s: int) -> WrkResult:
    """One wrk run (one thread, *concurrency* keep-alive connections) pinned to *cores*."""
    cmd = ["taskset", "-c", cores, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s"]
    cmd += [f"--timeout={timeout_s}s", "-s", str(WRK_SCRIPT), f"{url}/recommend", "--", str(bodies)]
    with open(WORK / "logs" / "wrk.out", "w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{text[-2000:]}")
    r = parse_wrk(text)
    errors = r["non2xx"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return WrkResult(
        requests=r["requests"],
        errors=errors,
        duration_s=r["duration_us"] / 1e6,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        generator_cpu_s=usage.ru_utime + usage.ru_stime,
    )


@dataclass
class Phase:
    catalogue: str
    pairing: str  # the peer this phase was measured next to
    side: str
    concurrency: int
    round: int
    result: WrkResult
    cpu_s: float = 0.0  # CPU seconds the server's processes used during the phase
    ranker_cpu_s: float = 0.0  # of which the service's model worker(s)
    batch_calls: float = 0.0
    batch_histories: float = 0.0
    process_cpu_s: list[float] = field(default_factory=list)

    def row(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "result"}
        return {**out, **asdict(self.result), "rps": round(self.result.rps, 1)}


def measure(server: Server, pairing: str, fx: Fixture, bodies: Path, c: int, rnd: int, args) -> Phase:
    seconds = args.soak if c == max(args.concurrencies) else args.duration
    if args.warmup:
        run_wrk(server.url, bodies, c, args.warmup, args.generator_cores, args.timeout)
    batches_before = _service_batches(server)
    cpu_before = tree_cpu_s(server.proc.pid)
    result = run_wrk(server.url, bodies, c, seconds, args.generator_cores, args.timeout)
    cpu_after = tree_cpu_s(server.proc.pid)
    batches_after = _service_batches(server)
    phase = Phase(fx.catalogue, pairing, server.side, c, rnd, result)
    used = _cpu_delta(cpu_before, cpu_after)
    phase.cpu_s = sum(used.values())
    phase.ranker_cpu_s = sum(cpu for pid, cpu in used.items() if cpu_after[pid][0] == "ranker")
    # Per process, busiest first: shows whether a framework's workers shared the load.
    phase.process_cpu_s = sorted((round(cpu, 2) for cpu in used.values() if cpu >= 0.05), reverse=True)
    phase.batch_calls = batches_after[0] - batches_before[0]
    phase.batch_histories = batches_after[1] - batches_before[1]
    ok = max(1, result.requests - result.errors)
    batch = f"  batch {phase.batch_histories / phase.batch_calls:.1f}" if phase.batch_calls else ""
    print(
        f"  [{fx.catalogue} c={c:<3} r{rnd}] {phase.side:13s} {result.rps:8.1f} req/s  "
        f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.1f} ms  errors {result.errors}  "
        f"cpu {1000 * phase.cpu_s / ok:5.2f} ms/req  wrk {1000 * result.generator_cpu_s / ok:.3f} ms/req"
        f"{batch}  per process {phase.process_cpu_s[:4]} s",
        flush=True,
    )
    return phase


def top_lists(server: Server, bodies: Path, n: int) -> list[list[str]]:
    """The item_list *server* answers to each of the first *n* bodies."""
    with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client:
        return [
            client.post(f"{server.url}/recommend", content=body).json()["item_list"]
            for body in bodies.read_text().splitlines()[:n]
        ]


def parity(service: list[list[str]], peer: list[list[str]]) -> dict:
    """How many answers are the same top-k: the same items in the same order, or the same items in
    another order (ties, float rounding of batched products)."""
    pairs = list(zip(service, peer, strict=True))
    return {
        "n": len(pairs),
        "same_order": sum(a == b for a, b in pairs),
        "same_items": sum(set(a) == set(b) for a, b in pairs),
        "differ": [i for i, (a, b) in enumerate(pairs) if set(a) != set(b)][:5],
    }


def idle_cpu_share(server: Server, seconds: float = 3.0) -> float:
    """Cores the server's processes use while no request comes in (a framework's polling loops)."""
    before = tree_cpu_s(server.proc.pid)
    time.sleep(seconds)
    return sum(_cpu_delta(before, tree_cpu_s(server.proc.pid)).values()) / seconds


def best(phases: list[Phase]) -> dict:
    """Best of the rounds (a shared machine only ever slows a window down): highest req/s, lowest
    p50 and p99; errors and CPU summed over all rounds."""
    ok = sum(max(0, p.result.requests - p.result.errors) for p in phases)
    calls = sum(p.batch_calls for p in phases)
    return {
        "rps": max(p.result.rps for p in phases),
        "p50_ms": min(p.result.p50_ms for p in phases),
        "p99_ms": min(p.result.p99_ms for p in phases),
        "rps_rounds": [round(p.result.rps, 1) for p in phases],
        "errors": sum(p.result.errors for p in phases),
        "requests": sum(p.result.requests for p in phases),
        "cpu_ms_per_request": 1000 * sum(p.cpu_s for p in phases) / ok if ok else None,
        "ranker_cpu_ms_per_request": 1000 * sum(p.ranker_cpu_s for p in phases) / ok if ok else None,
        "generator_cpu_ms_per_request": 1000 * sum(p.result.generator_cpu_s for p in phases) / ok
        if ok
        else None,
        "generator_core_share": sum(p.result.generator_cpu_s for p in phases)
        / sum(p.result.duration_s for p in phases),
        "mean_batch": sum(p.batch_histories for p in phases) / calls if calls else None,
    }


LAYOUT_LINE = re.compile(
    r"topology (\w+) .*: (\d+) API worker\(s\), (?:(\d+) model worker\(s\)|the model in each of them)"
    r".*?, (\d+) torch thread\(s\) each"
)


def served_layout(log: str) -> dict:
    """The layout the service logged at start-up: its topology, how many processes hold the model,
    and the torch threads of each."""
    found = LAYOUT_LINE.search(log)
    if not found:
        raise SystemExit(f"no 'topology ...' line in the service's log:\n{log[-2000:]}")
    topology, api, rankers, threads = found.groups()
    holders = int(rankers) if topology == "split" else int(api)
    return {"topology": topology, "processes": holders, "threads": int(threads)}


def ceiling(fx: Fixture, batches: list[int], layout: dict, args: argparse.Namespace) -> list[dict]:
    """The engine in the service's layout: as many processes as hold the model, each with the
    service's torch threads, all ranking at once."""
    cmd = ["taskset", "-c", args.server_cores, sys.executable, str(BENCH / "ceiling.py"), fx.tag]
    cmd += ["--threads", str(layout["threads"]), "--processes", str(layout["processes"])]
    cmd += ["--budget", str(args.ceiling_budget)]
    cmd += ["--batches", ",".join(map(str, batches))]
    return [json.loads(line) for line in _run(cmd).splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- targets and report


def targets(report: dict) -> list[dict]:
    """The service's targets against this run; ratios come from the same pairing (A B A B windows)."""
    out: list[dict] = []

    def pair(cat: str, c: int, peer: str) -> dict | None:
        return report["results"].get(cat, {}).get(str(c), {}).get(peer)

    def add(name: str, wanted: str, value: float | None, met: bool | None) -> None:
        out.append({"target": name, "wanted": wanted, "measured": value, "met": met})

    if r := pair("ml-100k", 1, "recipe"):
        ratio = r["service"]["p50_ms"] / r["peer"]["p50_ms"]
        add("ml-100k c=1 p50, service / tuned recipe", "<= 1.3x", ratio, ratio <= 1.3)
    peers = [p for p in PEERS if pair("ml-100k", 32, p)]
    if peers:
        rps = min(pair("ml-100k", 32, p)["rps_ratio"] for p in peers)
        p99 = max(pair("ml-100k", 32, p)["p99_ratio"] for p in peers)
        add(f"ml-100k c=32 req/s, service / best peer ({', '.join(peers)})", ">= 1.2x", rps, rps >= 1.2)
        add("ml-100k c=32 p99, service / best peer", "<= 1.0x", p99, p99 <= 1.0)
    if r := pair("1m", 32, "recipe"):
        add("1m c=32 req/s, service / tuned recipe", ">= 5x", r["rps_ratio"], r["rps_ratio"] >= 5)
        add("1m c=32 p99, service / tuned recipe", "<= 0.3x", r["p99_ratio"], r["p99_ratio"] <= 0.3)
    for cat, rows in report["served_vs_ceiling"].items():
        for c, row in rows.items():
            if cat == "1m" and int(c) > 1:
                share = row["share"]
                add(
                    f"1m c={c} served / in-process ceiling at batch {row['batch']}",
                    ">= 70%",
                    share,
                    share >= 0.7,
                )
    soak = max(report["concurrencies"])
    for cat, rows in report["results"].items():
        phases = [p for p in report["phases"] if p["catalogue"] == cat and p["concurrency"] == soak]
        errors = sum(p["errors"] for p in phases if p["side"] == "service")
        if rows:
            add(f"{cat} c={soak} for {report['soak_s']} s: service errors", "0", errors, errors == 0)
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:,.{digits}f}"


def markdown(report: dict) -> str:
    cs = report["concurrencies"]
    mid, top = (cs[1], cs[-1]) if len(cs) > 2 else (cs[-1], cs[-1])
    lines = [
        f"Run: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before / after: {report['load_before']} / "
        f"{report['load_after']}  ",
        f"Servers on cores `{report['server_cores']}`, wrk on core `{report['generator_cores']}`; "
        f"{report['rounds']} round(s) A B per peer and concurrency, {report['duration_s']} s windows "
        f"({report['soak_s']} s at c={top}), {report['warmup_s']} s warm-up each; best of the rounds.",
        "",
    ]
    for cat, rows in report["results"].items():
        lines += [
            f"**{cat}**",
            "",
            f"| side | c={cs[0]} p50 ms | c={mid} req/s | c={mid} p99 ms | c={top} req/s | c={top} p99 ms "
            f"| c={top} errors | CPU ms/req at c={mid} | service / side at c={mid}: req/s, p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        sides = ["service"] + [p for p in (*PEERS, "service-tuned") if p in rows.get(str(mid), {})]
        for side in sides:
            cells = [
                report["service"][cat][str(c)] if side == "service" else rows[str(c)][side]["peer"]
                for c in (cs[0], mid, top)
            ]
            ratio = (
                ""
                if side == "service"
                else (f"{rows[str(mid)][side]['rps_ratio']:.2f}x, {rows[str(mid)][side]['p99_ratio']:.2f}x")
            )
            lines.append(
                f"| {LABELS[side]} | {_fmt(cells[0]['p50_ms'], 2)} | {_fmt(cells[1]['rps'], 0)} "
                f"| {_fmt(cells[1]['p99_ms'])} | {_fmt(cells[2]['rps'], 0)} | {_fmt(cells[2]['p99_ms'])} "
                f"| {cells[2]['errors']} | {_fmt(cells[1]['cpu_ms_per_request'], 2)} | {ratio} |"
            )
        lines.append("")
    lines += [
        "Targets, this run:",
        "",
        "| target | wanted | measured | met |",
        "|---|---|---:|---|",
    ]
    for t in report["targets"]:
        value = t["measured"]
        shown = (
            f"{value:.0%}"
            if "%" in t["wanted"]
            else (str(value) if isinstance(value, int) else f"{value:.2f}x")
        )
        lines.append(f"| {t['target']} | {t['wanted']} | {shown} | {'yes' if t['met'] else '**no**'} |")
    if report["ceiling"]:
        lines += [
            "",
            "In-process ceiling at the batch sizes that formed (mean `recbole_bento_batch_size` of the "
            "service's phases at that concurrency), in the service's layout (as many processes as hold "
            "the model, each with its torch threads, all ranking at once: "
            + "; ".join(
                f"{cat}: {lay['processes']} x {lay['threads']} thread(s), {lay['topology']}"
                for cat, lay in report["layout"].items()
            )
            + "), and the service's best req/s against it:",
            "",
            "| catalogue | c | mean batch | engine seq/s | naive seq/s | served req/s | served / ceiling |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for cat, rows in report["served_vs_ceiling"].items():
            for c, r in rows.items():
                lines.append(
                    f"| {cat} | {c} | {_fmt(r['mean_batch'])} | {_fmt(r['engine_seq_s'], 0)} "
                    f"| {_fmt(r['naive_seq_s'], 0)} | {_fmt(r['served_rps'], 0)} | {r['share']:.0%} |"
                )
        if any(r["share"] > 1 for rows in report["served_vs_ceiling"].values() for r in rows.values()):
            lines += ["", "**A ceiling below what was served: the machine was busy while it ran.**"]
    lines += ["", "Same top-10 as the service (first histories of the request file):", ""]
    for cat, peers in report["parity"].items():
        cells = [f"{p} {r['same_order']}/{r['n']} ({r['same_items']} same items)" for p, r in peers.items()]
        lines.append(f"- {cat}: " + "; ".join(cells))
    share = [p["generator_cpu_s"] / p["duration_s"] for p in report["phases"] if p["duration_s"]]
    per_req = [1000 * p["generator_cpu_s"] / max(1, p["requests"] - p["errors"]) for p in report["phases"]]
    if share:
        lines += [
            "",
            f"wrk's own CPU: {min(per_req):.3f}-{max(per_req):.3f} ms a request, at most "
            f"{max(share):.0%} of a core in any window.",
        ]
    lines += [
        "",
        "Start-up (launch to the first answer) and idle CPU (cores used with no request coming in):",
        "",
        "| catalogue | side | start-up s | idle cores |",
        "|---|---|---:|---:|",
    ]
    for cat, ready in report["ready_s"].items():
        for side, seconds in ready.items():
            lines.append(
                f"| {cat} | {LABELS[side]} | {seconds:.1f} | {report['idle_cores'][cat][side]:.2f} |"
            )
    return "\n".join(lines)


def write_docs(report: dict) -> None:
    path = DOCS / "benchmarks.md"
    text = path.read_text()
    block = f"{START}\n{markdown(report)}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------- main


def _default_cores() -> tuple[str, str]:
    """(server cores, generator core): the last core for wrk; the servers keep it too on a machine
    of 2 cores or fewer, where taking it from them would halve what they are sized for."""
    cores = sorted(os.sched_getaffinity(0))
    servers = cores if len(cores) <= 2 else cores[:-1]
    return ",".join(map(str, servers)), str(cores[-1])


def main() -> None:
    # The private model store, set before bentoml is first imported (fixture()).
    os.environ.setdefault("BENTOML_HOME", str(WORK / "bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    servers, generator = _default_cores()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalogue", default="ml-100k,1m", help="ml-100k, 100k, 1m (comma-separated)")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help="recipe, litserve, rayserve (comma-separated)"
    )
    parser.add_argument("--tuned", action="store_true", help="also pair the service with a tuned one")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE", help="for --tuned")
    parser.add_argument("--concurrency", default="1,32,128", help="the highest one runs --soak seconds")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per peer and concurrency")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured window")
    parser.add_argument("--soak", type=int, default=60, help="seconds per window at the highest concurrency")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each window")
    parser.add_argument("--timeout", type=int, default=30, help="per request, seconds")
    parser.add_argument("--server-cores", default=servers, help="taskset list for every server")
    parser.add_argument("--generator-cores", default=generator, help="taskset list for wrk")
    parser.add_argument("--parity", type=int, default=20, help="histories checked against the service")
    parser.add_argument("--ceiling-budget", type=float, default=2.0, help="0 = skip the ceiling")
    parser.add_argument("--reimport", action="store_true", help="re-import to re-measure the import time")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install -y wrk (bench/peers/setup.sh does)")
    peers = [p for p in args.peers.split(",") if p] + (["service-tuned"] if args.tuned else [])
    report: dict = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "server_cores": args.server_cores,
        "generator_cores": args.generator_cores,
        "concurrencies": args.concurrencies,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "soak_s": args.soak,
        "warmup_s": args.warmup,
        "tuned_env": {**TUNED_ENV, **dict(kv.split("=", 1) for kv in args.service_env)}
        if args.tuned
        else None,
        "service": {},
        "results": {},
        "parity": {},
        "ready_s": {},
        "idle_cores": {},
        "fixtures": {},
        "layout": {},
        "ceiling": {},
        "served_vs_ceiling": {},
        "phases": [],
    }
    all_phases: list[Phase] = []
    for cat in args.catalogue.split(","):
        fx = fixture(cat, args.reimport)
        report["fixtures"][cat] = asdict(fx)
        bodies = request_bodies(fx)
        probe = bodies.read_text().splitlines()[0].encode()
        results: dict[str, dict] = report["results"].setdefault(cat, {})
        answers: dict[str, list[list[str]]] = {}
        report["ready_s"][cat], report["idle_cores"][cat] = {}, {}
        for peer in peers:
            phases = []
            for rnd in range(args.rounds):
                for side in ("service", peer):  # one server up at a time
                    print(f"[{cat}] {side}, round {rnd} (next to {peer}) ...", flush=True)
                    with start_side(side, fx, args, probe) as server:
                        if side not in answers:  # first start of this side
                            report["ready_s"][cat][side] = round(server.ready_s, 1)
                            if side == "service":
                                report["layout"][cat] = served_layout(server.log.read_text())
                            report["idle_cores"][cat][side] = idle_cpu_share(server)
                            answers[side] = top_lists(server, bodies, args.parity)
                        for c in args.concurrencies:
                            phases.append(measure(server, peer, fx, bodies, c, rnd, args))
            check = report["parity"].setdefault(cat, {})[peer] = parity(answers["service"], answers[peer])
            print(f"  parity with the service: {check['same_order']}/{check['n']} same top-10", flush=True)
            all_phases += phases
            for c in args.concurrencies:
                s = best([p for p in phases if p.side == "service" and p.concurrency == c])
                o = best([p for p in phases if p.side == peer and p.concurrency == c])
                results.setdefault(str(c), {})[peer] = {
                    "service": s,
                    "peer": o,
                    "rps_ratio": s["rps"] / o["rps"] if o["rps"] else float("inf"),
                    "p99_ratio": s["p99_ms"] / o["p99_ms"] if o["p99_ms"] else float("nan"),
                    "p50_ratio": s["p50_ms"] / o["p50_ms"] if o["p50_ms"] else float("nan"),
                }
        for c in args.concurrencies:  # the service over every pairing: its row of the table
            mine = [
                p for p in all_phases if p.catalogue == cat and p.side == "service" and p.concurrency == c
            ]
            report["service"].setdefault(cat, {})[str(c)] = best(mine)
        formed = {
            c: row["mean_batch"] for c, row in report["service"][cat].items() if row["mean_batch"] is not None
        }
        if args.ceiling_budget > 0 and formed:
            batches = sorted({max(1, round(b)) for b in formed.values()})
            print(f"[{cat}] in-process ceiling at batches {batches} ...", flush=True)
            report["ceiling"][cat] = rows = ceiling(fx, batches, report["layout"][cat], args)
            by_batch = {r["batch"]: r for r in rows}
            report["served_vs_ceiling"][cat] = {}
            for c, mean_batch in formed.items():
                row = by_batch[max(1, round(mean_batch))]
                served = report["service"][cat][c]["rps"]
                report["served_vs_ceiling"][cat][c] = {
                    "mean_batch": mean_batch,
                    "batch": row["batch"],
                    "engine_seq_s": row["engine_seq_s"],
                    "naive_seq_s": row["naive_seq_s"],
                    "served_rps": served,
                    "share": served / row["engine_seq_s"],
                }
    report["phases"] = [p.row() for p in all_phases]
    report["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report["targets"] = targets(report)
    print()
    print(markdown(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.no_docs:
        write_docs(report)
        print(f"\nwrote {DOCS / 'benchmarks.md'} and {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    main()
