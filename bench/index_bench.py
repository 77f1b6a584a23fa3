"""The exact path against the retrieval index on one stored model, in process (no HTTP).

    export BENTOML_HOME=bench/.work/bentoml
    python bench/make_large_fixture.py --wide --items 10000000
    python -m recbole_bento.index sasrec-wide-10m --index ivf --min-recall 0.98 \\
        --histories bench/.work/fixtures/wide-10m/sessions-tune.jsonl
    python bench/index_bench.py sasrec-wide-10m --sessions bench/.work/fixtures/wide-10m/sessions-eval.jsonl

One process holds the model with its index; the exact path is the same engine with the index set
aside, so both rank the same query vectors against the same table. The queries are the model's own
for held-out sessions (never random vectors: random queries flatter an index). Prints one JSON
line:

- ``recall_at_10``: of the index path's top-10 against the exact top-10, over ``--recall-queries``
  sessions; ``filter_1pct``: the same with a filter that passes 1% of the catalogue (a synthetic
  ``category`` = item id mod 100, attached in a temporary copy of the model's folder), as the
  engine answers it (``path``: which one it took) and forced through the index (``index_forced``);
- ``batch32_req_s``: 32 / the median time of one ``Engine.rank`` of 32 queries (what the service's
  batcher forms at c=32), per path; ``c1_p50_ms``: the median time of one query alone. The paths
  take turns (A B A B, ``--rounds``), so load from other processes falls on both alike;
- ``pss_mb``: the process's proportional set size with the model and index loaded, and the
  index's share (its file size: it is held in memory as stored);
- the index's parameters, build time and size, as recorded in the model's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole_bento.core import attributes, store  # noqa: E402
from recbole_bento.core.artifact import load_artifact  # noqa: E402
from recbole_bento.core.engine import Engine  # noqa: E402
from recbole_bento.core.index import RetrievalIndex  # noqa: E402
from recbole_bento.core.ranking import RankQuery, RankResult  # noqa: E402

CATEGORIES = 100


def pss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def with_category(model_path: Path, tmp: Path, n_items: int) -> Path:
    """The model's files (hard links) plus a ``category`` attribute: item id mod 100."""
    directory = tmp / "model"
    directory.mkdir()
    for path in Path(model_path).iterdir():
        if path.is_file() and path.name != "model.yaml":
            os.link(path, directory / path.name)
    category = [None] + [str(i % CATEGORIES) for i in range(1, n_items)]
    (directory / attributes.FILE).write_text(
        json.dumps({"category": attributes.encode_field("token", category)})
    )
    return directory


def recall(got: list[RankResult], ref: list[RankResult]) -> float:
    hits = sum(len(set(a.items) & set(b.items)) for a, b in zip(got, ref, strict=True))
    return round(hits / max(1, sum(len(b.items) for b in ref)), 4)


def in_batches(engine: Engine, queries: list[RankQuery], size: int = 32) -> list[RankResult]:
    return [r for start in range(0, len(queries), size) for r in engine.rank(queries[start : start + size])]


def timed(paths: dict[str, Callable[[], object]], rounds: int, seconds: float) -> dict[str, list[float]]:
    """Each path's call times, the paths taking turns for *seconds* each per round."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for call in paths.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in paths.items():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or not times[name]:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="a stored model with a retrieval index")
    parser.add_argument("--sessions", type=Path, required=True, help="held-out sessions, JSON lines")
    parser.add_argument("--recall-queries", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per path per round")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch (and faiss) threads; 0: torch's default"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = store.resolve(args.tag)
    meta = model.info.metadata
    if "retrieval_index" not in meta:
        raise SystemExit(f"{model.tag} has no retrieval index: python -m recbole_bento.index {model.tag} ...")
    n_items = int(meta["item_count"]) + 1
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        started = time.perf_counter()
        engine = Engine(load_artifact(with_category(Path(model.path), Path(tmp), n_items)), device="cpu")
        load_s = time.perf_counter() - started
    index = engine.index
    assert isinstance(index, RetrievalIndex)
    exact = Engine.__new__(Engine)
    exact.__dict__.update(engine.__dict__, index=None)
    ids = {token: i for i, token in enumerate(engine.artifact.item_tokens)}
    sessions = [
        [ids[t] for t in json.loads(line) if t in ids][-engine.artifact.window :]
        for line in args.sessions.read_text().splitlines()
        if line.strip()
    ]
    queries = [RankQuery(s, 10) for s in sessions if s]
    probe = queries[: args.recall_queries]
    result: dict = {"model": str(model.tag), "items": n_items - 1, "torch_threads": torch.get_num_threads()}
    result["load_s"] = round(load_s, 1)
    result["pss_mb"] = {"process": pss_mb(), "index": round(index.params.bytes / 2**20, 1)}
    result["index"] = meta["retrieval_index"]
    got = in_batches(engine, probe)
    result["recall_at_10"] = recall(got, in_batches(exact, probe))
    result["answered_by_index"] = sum(r.retrieval == "index" for r in got) / len(got)
    one = {"category": ["7"]}
    filtered = [RankQuery(q.history, 10, filters=one) for q in probe[:200]]
    ref = in_batches(exact, filtered)
    got = in_batches(engine, filtered)
    index.prefers_exact = lambda allowed: False  # type: ignore[method-assign]
    forced = in_batches(engine, filtered)
    del index.prefers_exact
    result["filter_1pct"] = {
        "passing": int(engine.compile_filter(one).ids.numel()),
        "path": sorted({r.retrieval for r in got}),
        "recall_at_10": recall(got, ref),
        "index_forced_recall_at_10": recall(forced, ref),
        "index_forced_path": sorted({r.retrieval for r in forced}),
    }
    cursor = {"next": 0}

    def batch_of(size: int) -> list[RankQuery]:
        start = cursor["next"] % (len(queries) - size)
        cursor["next"] += size
        return queries[start : start + size]

    calls = timed(
        {
            "exact_b32": lambda: exact.rank(batch_of(32)),
            "index_b32": lambda: engine.rank(batch_of(32)),
            "exact_c1": lambda: exact.rank(batch_of(1)),
            "index_c1": lambda: engine.rank(batch_of(1)),
        },
        args.rounds,
        args.seconds,
    )
    result["batch32_req_s"] = {
        p: round(32 / statistics.median(calls[f"{p}_b32"]), 1) for p in ("exact", "index")
    }
    result["c1_p50_ms"] = {
        p: round(1000 * statistics.median(calls[f"{p}_c1"]), 2) for p in ("exact", "index")
    }
    result["index_speedup_b32"] = round(
        result["batch32_req_s"]["index"] / result["batch32_req_s"]["exact"], 2
    )
    result["pss_mb"]["process_after"] = pss_mb()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
