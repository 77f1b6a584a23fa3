"""The in-process ceiling: batched ranking in a loop, no HTTP, no batching queue.

    BENTOML_HOME=bench/.work/bentoml python bench/ceiling.py sasrec-synth-1m --threads 1

For each batch size, sequences/s of
  - ``naive``: ``full_sort_predict`` on the batch, masks, ``torch.topk`` (the B x N score matrix), and
  - ``engine``: ``Engine.rank`` as the service runs it (block top-k where the model allows it).
Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch


def _rate(fn, batch: int, budget_s: float) -> float:
    """Sequences/s: best of several timed calls within about *budget_s* seconds."""
    fn()  # warm-up
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    calls = 0
    while calls < 3 or (time.perf_counter() < deadline and calls < 50):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        calls += 1
    return batch / best


def measure(tag: str, batches: list[int], threads: int, budget_s: float = 2.0, seed: int = 0) -> list[dict]:
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
                "batch": batch,
                "naive_seq_s": round(_rate(naive, batch, budget_s), 1),
                "engine_seq_s": round(_rate(lambda q=queries: engine.rank(q), batch, budget_s), 1),
                "block_topk": engine.block is not None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="model store tag")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement (about)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for row in measure(args.tag, [int(b) for b in args.batches.split(",")], args.threads, args.budget):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
