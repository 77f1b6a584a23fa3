"""Memory of a whole server at 1M items: mapped tables against private copies, per worker.

    python bench/memory.py                       # 1M items, 1 and 2 API workers, A B A B
    python bench/memory.py --items 100000 --rounds 1 --sides mapped   # a quick look

Sides, each ``bentoml serve .`` in-process (each API worker holds the model), one torch thread:
  - ``before``: the code before mapped loading (``--before``, a commit; extracted with
    ``git archive`` into bench/.work/) serving the model stored as it stored models then (item
    table inside weights.pt, no unit table file): every worker copies the weights and computes
    its own unit table;
  - ``mapped``: this checkout serving the model as the importer stores it now (item_table.npy,
    item_unit.npy): every worker maps the same files;
  - ``old-format``: this checkout serving the ``before`` model (the fallback for models stored
    before: weights.pt is mapped, the unit table computed per worker).
The model is a synthetic SASRec (bench/gpu.py's, hidden 64) registered in a private model store
(bench/.work/memory-home). Each server gets /recommend and /similar_items calls once ready
(every page a request reads is touched), then, once its memory is steady, the PSS of every process
of the server's process tree (/proc/<pid>/smaps_rollup: shared pages are divided among the
processes mapping them) is summed. Prints one JSON line per server and a summary; "added" is what
the second worker adds to the whole server, as a share of the first worker's PSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
HOME = WORK / "memory-home"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["BENTOML_HOME"] = str(HOME)  # before bentoml is imported

from devtools.local_server import local_server_process  # noqa: E402


def register(name: str, directory: Path, n_items: int) -> str:
    """*directory* as a stored model named *name* (metadata as the importer writes it)."""
    from recbole_bento.core import store
    from recbole_bento.core.artifact import file_digests

    metadata = {
        "recbole_model": "SASRec",
        "dataset": f"synth-{n_items}",
        "item_count": n_items,
        "user_count": 1,
        "max_history_length": 50,
        "required_inputs": ["sequence"],
        "fields": {
            "user": "user_id",
            "item": "item_id",
            "item_sequence": "item_id_list",
            "sequence_length": "item_length",
        },
        "valid_metric": "MRR@10",
        "imported_from": "bench/memory.py (synthetic)",
        "files": file_digests(directory),
    }
    return str(store.register(name, directory, metadata, {}).tag)


def models(n_items: int) -> dict[str, str]:
    """The two stored forms of one synthetic model: {"mapped": tag, "old": tag}, made once."""
    import bentoml
    from bentoml.exceptions import NotFound
    from gpu import synthetic_model

    from recbole_bento.core.artifact import ITEM_TABLE, ITEM_UNIT, WEIGHTS

    names = {"mapped": f"memory-{n_items}", "old": f"memory-{n_items}-old"}
    with contextlib.suppress(NotFound):
        return {side: str(bentoml.models.get(name).tag) for side, name in names.items()}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        mapped = synthetic_model(n_items, Path(tmp) / "mapped")
        old = Path(tmp) / "old"
        shutil.copytree(mapped, old)
        state = torch.load(old / WEIGHTS, weights_only=True)
        state["item_embedding.weight"] = torch.from_numpy(np.load(old / ITEM_TABLE))
        torch.save(state, old / WEIGHTS)
        (old / ITEM_TABLE).unlink()
        (old / ITEM_UNIT).unlink()
        return {
            "mapped": register(names["mapped"], mapped, n_items),
            "old": register(names["old"], old, n_items),
        }


def before_tree(commit: str) -> Path:
    """The checkout as it was at *commit*, extracted once (no git state is touched)."""
    tree = WORK / f"before-{commit[:12]}"
    if not (tree / "service.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def tree_pids(root: int) -> list[int]:
    """*root* and every live process descended from it (BentoML's workers run in sessions of
    their own, so the process tree, not the session, is the server)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parents[int(entry)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in found]
        found.update(children)
        frontier.extend(children)
    return sorted(p for p in found if p in parents)


def rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/<pid>/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def role(pid: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = " ".join(part.decode(errors="replace") for part in cmd)
    if "--worker-id" in text:
        return "worker-" + text.split("--worker-id", 1)[1].split()[0]
    if "bentoml serve" in text:
        return "arbiter"
    return text[:60]


def measure(root: int) -> list[dict]:
    rows = []
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            r = rollup(pid)
            rows.append(
                {
                    "pid": pid,
                    "role": role(pid),
                    "pss_mb": round(r["Pss"] / 1024, 1),
                    "pss_anon_mb": round(r.get("Pss_Anon", 0) / 1024, 1),
                    "pss_file_mb": round(r.get("Pss_File", 0) / 1024, 1),
                    "rss_mb": round(r["Rss"] / 1024, 1),
                }
            )
    return rows


@contextlib.contextmanager
def server(tree: Path, tag: str, workers: int, log: Path) -> Iterator[tuple[str, int]]:
    """``bentoml serve .`` from *tree* in its own session; yields (url, its pid) once /readyz is 200."""
    env = {
        "PYTHONPATH": str(tree),  # the tree's own package, whatever the venv's editable install says
        "BENTOML_HOME": str(HOME),
        "BENTOML_DO_NOT_TRACK": "true",
        "RECBOLE_BENTO_TOPOLOGY": "inprocess",
        "RECBOLE_BENTO_API_WORKERS": str(workers),
        "RECBOLE_BENTO_TORCH_THREADS": "1",
    }
    with contextlib.ExitStack() as stack:
        try:
            served = stack.enter_context(
                local_server_process(tag, cwd=tree, env=env, ready_timeout=600, log_path=log)
            )
        except RuntimeError as exc:  # exited, or not ready in time: the reason and the log's tail
            raise SystemExit(str(exc)) from None
        yield served


def exercise(url: str, n_items: int, calls: int = 300) -> None:
    """/recommend and /similar_items calls on fresh connections (so both workers get some)."""
    rng = random.Random(0)

    def call(i: int) -> int:
        items = [f"i{rng.randrange(1, n_items + 1)}" for _ in range(20)]
        path, body = (
            ("/similar_items", {"items": items[:3], "topk": 10})
            if i % 4 == 0
            else ("/recommend", {"sequence": items, "topk": 10})
        )
        return httpx.post(url + path, json=body, timeout=60, headers={"connection": "close"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(calls)))
    if set(codes) != {200}:
        raise SystemExit(f"calls answered {sorted(set(codes))}, not all 200")


def steady(root: int, workers: int, timeout: float = 300) -> list[dict]:
    """The server's memory once every worker is up and the total moved < 1% over 3 s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        rows = measure(root)
        total = sum(r["pss_mb"] for r in rows)
        up = sum(r["role"].startswith("worker") for r in rows)
        if up >= workers and last is not None and abs(total - last) < 0.01 * total:
            return rows
        last = total if up >= workers else None
        time.sleep(3)
    raise SystemExit("memory never settled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default="before,mapped")
    parser.add_argument("--before", default="eebcd90^", help="the commit before mapped loading")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    tags = models(args.items)
    commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True)
    sides = {
        "before": (before_tree(commit.stdout.strip()), tags["old"]),
        "mapped": (ROOT, tags["mapped"]),
        "old-format": (ROOT, tags["old"]),
    }
    results: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for side in args.sides.split(","):
            tree, tag = sides[side]
            for workers in (int(w) for w in args.workers.split(",")):
                log = WORK / "logs" / f"memory-{side}-{workers}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with server(tree, tag, workers, log) as (url, pid):
                    exercise(url, args.items)
                    rows = steady(pid, workers)
                total = round(sum(r["pss_mb"] for r in rows), 1)
                line = {
                    "side": side,
                    "round": rnd,
                    "workers": workers,
                    "items": args.items,
                    "total_pss_mb": total,
                }
                print(json.dumps({**line, "processes": rows}), flush=True)
                results.setdefault((side, workers), []).append({"total": total, "rows": rows})
    print(summary(results), flush=True)


def summary(results: dict[tuple[str, int], list[dict]]) -> str:
    """Per side and round: whole server at 1 and 2 workers, the first worker, what the second adds."""
    lines = ["| side | round | whole server, 1 worker | 2 workers | first worker | added by the 2nd |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for side in dict.fromkeys(s for s, _ in results):
        one, two = results.get((side, 1), []), results.get((side, 2), [])
        for rnd, (a, b) in enumerate(zip(one, two, strict=False)):
            first = max(r["pss_mb"] for r in a["rows"] if r["role"].startswith("worker"))
            added = b["total"] - a["total"]
            lines.append(
                f"| {side} | {rnd} | {a['total']:,.0f} MB | {b['total']:,.0f} MB | {first:,.0f} MB "
                f"| {added:,.0f} MB ({100 * added / first:.0f}%) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
