"""What a selective filter costs: the engine's batched /recommend ranking with and without a filter
that passes 1% of the catalogue, and /similar_items, in process (no HTTP), on a fixture of
``bench/make_large_fixture.py``.

    python bench/make_large_fixture.py --items 1000000 --out bench/.work/fixtures
    python bench/filter_cost.py bench/.work/fixtures/synth-1m [--batch 8] [--seconds 10]

The fixture gets a synthetic ``category`` token attribute (item id mod 100: each category is 1% of
the catalogue); the artifact is written as the importer writes it, into a temporary folder. Prints
one JSON line: requests/s per case (histories of 10 random items; the cases take turns for
--seconds in all, and each figure is the batch size over the median time of one call).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole_bento.core import attributes  # noqa: E402
from recbole_bento.core.artifact import load_artifact, write_artifact  # noqa: E402
from recbole_bento.core.engine import Engine  # noqa: E402
from recbole_bento.core.importer import build_splits  # noqa: E402
from recbole_bento.core.ranking import RankQuery  # noqa: E402
from recbole_bento.core.safe_pickle import load_checkpoint, load_dataset_pickle  # noqa: E402

CATEGORIES = 100


def requests_per_s(
    engine: Engine, cases: dict[str, Callable[[int], list[RankQuery]]], batch: int, seconds: float
) -> dict[str, float]:
    """Per case, *batch* / the median time of one engine call. The cases take turns, one call
    each, so that load from other processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for make in cases.values():
        engine.rank(make(batch))  # warm-up (the block pool, the compiled filter)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(map(len, times.values())) < 5:
        for name, make in cases.items():
            queries = make(batch)
            start = time.perf_counter()
            engine.rank(queries)
            times[name].append(time.perf_counter() - start)
    return {name: round(batch / float(np.median(t)), 1) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path, help="a folder written by bench/make_large_fixture.py")
    parser.add_argument("--batch", type=int, default=8, help="queries per engine call")
    parser.add_argument("--seconds", type=float, default=30.0, help="timing, all cases together")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    checkpoint = load_checkpoint(args.fixture / "SASRec.pth")
    dataset = load_dataset_pickle(next(args.fixture.glob("*-SequentialDataset.pth")))
    with tempfile.TemporaryDirectory(prefix="filter-cost-") as tmp:
        directory = Path(tmp)
        write_artifact(directory, checkpoint, dataset, build_splits(dataset)[0])
        n_items = len(dataset.field2id_token[dataset.iid_field])
        category = [None] + [str(i % CATEGORIES) for i in range(1, n_items)]
        (directory / attributes.FILE).write_text(
            json.dumps({"category": attributes.encode_field("token", category)})
        )
        engine = Engine(load_artifact(directory), device="cpu")
    gen = np.random.default_rng(0)

    def queries(kind: str, filters: dict | None) -> Callable[[int], list[RankQuery]]:
        def make(batch: int) -> list[RankQuery]:
            return [
                RankQuery(gen.integers(1, n_items, 10).tolist(), 10, kind=kind, filters=filters)
                for _ in range(batch)
            ]

        return make

    one_percent = {"category": ["7"]}
    passing = engine.compile_filter(one_percent).ids.numel()
    cases = {
        "recommend": queries("next", None),
        "recommend_filter_1pct": queries("next", one_percent),
        "similar_items": queries("similar", None),
        "similar_items_filter_1pct": queries("similar", one_percent),
    }
    result = {
        "items": n_items - 1,
        "batch": args.batch,
        "torch_threads": torch.get_num_threads(),
        "block_path": engine.block is not None,
        "filter_passing_items": passing,
        "requests_per_s": requests_per_s(engine, cases, args.batch, args.seconds),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
