"""The in-process ceiling: batched ranking in a loop, no HTTP, no batching queue.

    BENTOML_HOME=bench/.work/bentoml python bench/ceiling.py sasrec-synth-1m --threads 1 --processes 2

For each batch size, sequences/s of
  - ``naive``: ``full_sort_predict`` on the batch, masks, ``torch.topk`` (the B x N score matrix), and
  - ``engine``: ``Engine.rank`` as the service runs it (block top-k where the model allows it),
sustained over the budget by ``--processes`` processes at once, each with ``--threads`` torch threads
(the serving layout: every process that holds the model ranks its own batches), summed.
Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _calls_within(fn: Callable[[], object], start: Any, budget_s: float) -> int:
    fn()  # warm-up
    start.wait()
    deadline = time.perf_counter() + budget_s
    calls = 0
    while time.perf_counter() < deadline:
        fn()
        calls += 1
    return calls


def _steps(
    tag: str, batches: list[int], threads: int, seed: int
) -> Iterator[tuple[int, str, Callable[[], object]]]:
    """(batch, "naive" | "engine", the call to time), in the same order in every process."""
    from recbole_bento.core import store
    from recbole_bento.core.engine import Engine
    from recbole_bento.core.ranking import RankQuery, apply_masks

    if threads:
        torch.set_num_threads(threads)
    engine = Engine(store.load(store.resolve(tag)))
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        queries = [
            RankQuery(torch.randint(1, engine.n_items, (engine.artifact.window,), generator=gen).tolist(), 10)
            for _ in range(batch)
        ]

        @torch.inference_mode()
        def naive(queries: list = queries) -> None:
            scores = engine.model.full_sort_predict(engine.interaction(queries)).view(len(queries), -1)
            apply_masks(scores, queries)
            torch.topk(scores, 10, dim=1)

        yield batch, "naive", naive
        yield batch, "engine", lambda q=queries: engine.rank(q)


def _process(
    tag: str, batches: list[int], threads: int, seed: int, budget_s: float, start: Any, out: Any
) -> None:
    """One of the processes: each step's call count into *out*."""
    warnings.filterwarnings("ignore")
    for _, _, call in _steps(tag, batches, threads, seed):
        out.put(_calls_within(call, start, budget_s))


def measure(
    tag: str, batches: list[int], threads: int, processes: int = 1, budget_s: float = 2.0, seed: int = 0
) -> list[dict]:
    """Each step timed in *processes* processes at once (this one and freshly spawned ones, each
    loading the model as a serving worker does; forked ones could not use torch's thread pool)."""
    ctx = multiprocessing.get_context("spawn")
    start, counts = ctx.Barrier(processes), ctx.Queue()
    args = (tag, batches, threads, seed, budget_s, start, counts)
    others = [ctx.Process(target=_process, args=args, daemon=True) for _ in range(processes - 1)]
    for other in others:
        other.start()
    rates: dict[tuple[int, str], float] = {}
    for batch, mode, call in _steps(tag, batches, threads, seed):
        calls = _calls_within(call, start, budget_s) + sum(counts.get(timeout=600) for _ in others)
        rates[batch, mode] = round(calls * batch / budget_s, 1)
    for other in others:
        other.join()
    from recbole_bento.core import store

    n_items = int(store.resolve(tag).info.metadata["item_count"])
    return [
        {
            "model": tag,
            "items": n_items,
            "threads": torch.get_num_threads(),
            "processes": processes,
            "batch": batch,
            "naive_seq_s": rates[batch, "naive"],
            "engine_seq_s": rates[batch, "engine"],
        }
        for batch in batches
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="model store tag")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--processes", type=int, default=1, help="processes ranking at once, summed")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for row in measure(
        args.tag, [int(b) for b in args.batches.split(",")], args.threads, args.processes, args.budget
    ):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
