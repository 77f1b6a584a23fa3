"""The per-request recipe the benchmark compares against: FastAPI + uvicorn, the RecBole checkpoint
and the pickled Dataset loaded as blog posts do, and one ``full_sort_predict`` per request under
``torch.no_grad()``, the padding item masked, ``torch.topk``. Same request and response bodies as
the service's ``/recommend`` (``{"sequence": [...], "topk": 10}`` -> ``item_list``, ``score_list``).

    python bench/baseline_fastapi.py --checkpoint SASRec.pth --dataset-pickle ds.pth --port 8001

Both files are unpickled with plain pickle (``torch.load(weights_only=False)``), as the recipe
does: only run it on files you made. ``GET /health`` answers once the model is loaded, with the
load time in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

warnings.filterwarnings("ignore")

CHECKPOINT = "BASELINE_CHECKPOINT"
DATASET = "BASELINE_DATASET_PICKLE"
THREADS = "BASELINE_TORCH_THREADS"


class RecommendRequest(BaseModel):
    sequence: list[int | str]
    topk: int = 10


class Recipe:
    """Everything the endpoint needs, loaded once per worker."""

    def __init__(self, checkpoint_path: str, dataset_path: str) -> None:
        from recbole.utils import get_model

        start = time.perf_counter()
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        with open(dataset_path, "rb") as f:
            dataset = pickle.load(f)
        config = checkpoint["config"]
        config["device"] = torch.device("cpu")
        model = get_model(config["model"])(config, dataset)
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        self.model = model.eval()
        self.window = config["MAX_ITEM_LIST_LENGTH"]
        self.token2id = dataset.field2token_id[dataset.iid_field]
        self.id2token = dataset.field2id_token[dataset.iid_field]
        self.load_s = time.perf_counter() - start

    def recommend(self, req: RecommendRequest) -> dict:
        from recbole.data.interaction import Interaction

        history = [self.token2id[str(x)] for x in req.sequence if str(x) in self.token2id][-self.window :]
        if not history:
            raise HTTPException(400, "no known item in the sequence")
        if not 1 <= req.topk < len(self.id2token):
            raise HTTPException(400, "bad topk")
        seq = torch.zeros((1, self.window), dtype=torch.long)
        seq[0, : len(history)] = torch.tensor(history)
        model = self.model
        inter = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([len(history)])})
        with torch.no_grad():
            scores = model.full_sort_predict(inter).view(1, -1)
            scores[:, 0] = float("-inf")  # the padding item
            values, indices = torch.topk(scores, req.topk, dim=1)
        return {"item_list": self.id2token[indices[0].numpy()].tolist(), "score_list": values[0].tolist()}


_recipe: Recipe | None = None


@contextlib.asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    global _recipe
    if int(os.environ.get(THREADS, "0")):
        torch.set_num_threads(int(os.environ[THREADS]))
    _recipe = Recipe(os.environ[CHECKPOINT], os.environ[DATASET])
    yield


app = FastAPI(lifespan=_lifespan)


@app.get("/health")
def health() -> dict:
    """Answers once this worker has loaded the model (uvicorn starts accepting after the lifespan)."""
    return {
        "load_s": _recipe.load_s if _recipe else None,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }


@app.post("/recommend")
def recommend(req: RecommendRequest) -> dict:
    return _recipe.recommend(req)  # type: ignore[union-attr]


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset-pickle", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=0, help="per worker; 0 = torch's default")
    args = parser.parse_args()
    os.environ[CHECKPOINT] = str(args.checkpoint.resolve())
    os.environ[DATASET] = str(args.dataset_pickle.resolve())
    os.environ[THREADS] = str(args.torch_threads)
    sys.argv = sys.argv[:1]  # RecBole's Config parses sys.argv
    uvicorn.run(
        "baseline_fastapi:app",
        app_dir=str(Path(__file__).resolve().parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
