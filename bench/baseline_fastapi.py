"""The per-request recipe, as a competent user runs it: FastAPI + uvicorn, one ``full_sort_predict``
per request (bench/recipe_model.py), several uvicorn workers with one torch thread each.

    python bench/baseline_fastapi.py --checkpoint SASRec.pth --dataset-pickle ds.pth --port 8001

Defaults: one worker per core this process may run on, one torch thread per worker (workers x
threads <= cores: with torch's default thread count every worker runs one OpenMP thread per core
and they oversubscribe the cores), an ``async`` handler (no thread pool), uvloop and httptools, no
access log. Same request and response
bodies as the service's ``/recommend``. ``GET /health`` answers once the worker has loaded the
model, with its pid and load time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_model import RecipeModel  # noqa: E402

warnings.filterwarnings("ignore")

CHECKPOINT = "BASELINE_CHECKPOINT"
DATASET = "BASELINE_DATASET_PICKLE"
THREADS = "BASELINE_TORCH_THREADS"


class RecommendRequest(BaseModel):
    sequence: list[int | str]
    topk: int = 10


_model: RecipeModel | None = None


@contextlib.asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    global _model
    _model = RecipeModel(os.environ[CHECKPOINT], os.environ[DATASET], int(os.environ.get(THREADS, "1")))
    yield


app = FastAPI(lifespan=_lifespan)


@app.get("/health")
def health() -> dict:
    """Answers once this worker has loaded the model (uvicorn starts accepting after the lifespan)."""
    return {
        "load_s": _model.load_s if _model else None,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }


@app.post("/recommend")
async def recommend(req: RecommendRequest) -> dict:
    # async: ranked on the event loop, one request at a time per worker. A plain `def` runs in
    # FastAPI's thread pool, where concurrent requests contend for the GIL between torch's
    # operators: several times the CPU per request under load (docs/benchmarks.md).
    query = _model.query(req.sequence, req.topk)  # type: ignore[union-attr]
    if isinstance(query, str):
        raise HTTPException(400, query)
    return _model.rank([query])[0]  # type: ignore[union-attr]


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset-pickle", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker; 0 = torch's default")
    args = parser.parse_args()
    os.environ[CHECKPOINT] = str(args.checkpoint.resolve())
    os.environ[DATASET] = str(args.dataset_pickle.resolve())
    os.environ[THREADS] = str(args.torch_threads)
    uvicorn.run(
        "baseline_fastapi:app",
        app_dir=str(Path(__file__).resolve().parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
