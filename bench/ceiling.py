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
from collections.abc import Callable

import torch


def _calls_within(
    fn: Callable[[], object], start: multiprocessing.synchronize.Barrier, budget_s: float
) -> int:
    fn()  # warm-up
    start.wait()
    deadline = time.perf_counter() + budget_s
    calls = 0
    while time.perf_counter() < deadline:
        fn()
        calls += 1
    return calls


def _rate(fn: Callable[[], object], batch: int, budget_s: float, processes: int) -> float:
    """Sequences/s of *processes* processes calling *fn* (on a batch of *batch*) for *budget_s* at
    once: forked from this one, so each holds the same model (copy-on-write), as serving workers do."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(processes)
    counts = ctx.Queue()

    def worker() -> None:
        counts.put(_calls_within(fn, start, budget_s))

    children = [ctx.Process(target=worker) for _ in range(processes - 1)]
    for child in children:
        child.start()
    calls = _calls_within(fn, start, budget_s) + sum(counts.get() for _ in children)
    for child in children:
        child.join()
    return calls * batch / budget_s


def measure(
    tag: str, batches: list[int], threads: int, processes: int = 1, budget_s: float = 2.0, seed: int = 0
) -> list[dict]:
    from recbole_bento.core import store
    from recbole_bento.core.engine import Engine
    from recbole_bento.core.ranking import RankQuery, apply_masks

    if threads:
        torch.set_num_threads(threads)
    engine = Engine(store.load(store.resolve(tag)))
    window = engine.artifact.window
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batches:
        queries = [
            RankQuery(torch.randint(1, engine.n_items, (window,), generator=gen).tolist(), 10)
            for _ in range(batch)
        ]

        @torch.inference_mode()
        def naive(queries=queries) -> None:
            scores = engine.model.full_sort_predict(engine.interaction(queries)).view(len(queries), -1)
            apply_masks(scores, queries)
            torch.topk(scores, 10, dim=1)

        rows.append(
            {
                "model": tag,
                "items": engine.n_items - 1,
                "threads": torch.get_num_threads(),
                "processes": processes,
                "batch": batch,
                "naive_seq_s": round(_rate(naive, batch, budget_s, processes), 1),
                "engine_seq_s": round(_rate(lambda q=queries: engine.rank(q), batch, budget_s, processes), 1),
                "block_topk": engine.block is not None,
            }
        )
    return rows


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
