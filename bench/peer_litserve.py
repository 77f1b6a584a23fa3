"""LitServe peer of the benchmark: the same ``/recommend`` as the service, batched by LitServe.

    bench/.work/peers-venv/bin/python bench/peer_litserve.py --checkpoint SASRec.pth \
        --dataset-pickle ds.pth --port 8002

``max_batch_size=64``, ``batch_timeout=0.005``, one inference worker per core with one torch thread
each (LitServe's default of one HTTP server process per inference worker), uvloop and httptools, no
access log. Each batch is one plain ``full_sort_predict`` (bench/recipe_model.py). A bad request is
answered as a 400 response object from ``encode_response``: an exception anywhere in the batched
loop fails every request of the batch. Runs in the peers venv (bench/peers/setup.sh).
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import litserve as ls
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_model import Query, RecipeModel  # noqa: E402

warnings.filterwarnings("ignore")


class RecommendAPI(ls.LitAPI):
    def __init__(self, checkpoint: str, dataset_pickle: str, torch_threads: int) -> None:
        super().__init__(max_batch_size=64, batch_timeout=0.005, api_path="/recommend")
        self.paths = (checkpoint, dataset_pickle, torch_threads)

    def setup(self, device: str) -> None:
        self.model = RecipeModel(*self.paths)

    # LitServe turns the annotations of `request` and of encode_response's result into FastAPI's
    # request and response models: left out, the body reaches decode_request as parsed JSON and the
    # result leaves as is (a dict as JSON, a Response unchanged).
    def decode_request(self, request) -> Query | str:
        return self.model.parse(request)

    def batch(self, inputs: list[Query | str]) -> list[Query | str]:
        return inputs

    def predict(self, inputs: list[Query | str]) -> list[dict | str]:
        queries = [q for q in inputs if isinstance(q, Query)]
        ranked = iter(self.model.rank(queries) if queries else [])
        return [next(ranked) if isinstance(q, Query) else q for q in inputs]

    def unbatch(self, outputs: list[dict | str]) -> list[dict | str]:
        return outputs

    def encode_response(self, output: dict | str):
        return JSONResponse({"detail": output}, status_code=400) if isinstance(output, str) else output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset-pickle", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker; 0 = torch's default")
    args = parser.parse_args()
    api = RecommendAPI(str(args.checkpoint.resolve()), str(args.dataset_pickle.resolve()), args.torch_threads)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=60)
    server.run(
        host=args.host,
        port=args.port,
        log_level="warning",
        generate_client_file=False,
        loop="uvloop",
        http="httptools",
        access_log=False,
    )


if __name__ == "__main__":
    main()
