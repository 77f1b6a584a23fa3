"""Ray Serve peer of the benchmark: the same ``/recommend`` as the service, batched by ``@serve.batch``.

    bench/.work/peers-venv/bin/python bench/peer_rayserve.py --checkpoint SASRec.pth \
        --dataset-pickle ds.pth --port 8003

One replica, ``@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)``, ``max_ongoing_requests``
raised to 256 (its default of 5 caps every batch at 5), Ray's workers at nice 0 instead of 15 (level
with the load generator), no dashboard, everything on 127.0.0.1. Each batch is one plain
``full_sort_predict`` (bench/recipe_model.py). Stop it with SIGTERM: it shuts Serve and Ray down
itself (a SIGKILL leaves Ray's agents running). Runs in the peers venv (bench/peers/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

# Read by Ray's processes when they start: set before ray is imported.
os.environ["RAY_worker_niceness"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_model import Query, RecipeModel  # noqa: E402

warnings.filterwarnings("ignore")


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Recommender:
    def __init__(self, checkpoint: str, dataset_pickle: str, torch_threads: int) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        self.model = RecipeModel(checkpoint, dataset_pickle, torch_threads)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def rank(self, queries: list[Query]) -> list[dict]:
        return self.model.rank(queries)

    async def __call__(self, request: Request) -> dict | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
        query = self.model.parse(body)
        if isinstance(query, str):
            return JSONResponse({"detail": query}, status_code=400)
        return await self.rank(query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset-pickle", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--torch-threads", type=int, default=1, help="of the replica; 0 = torch's default")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    # A short private temp dir: Ray's socket paths must fit 107 bytes, and it must not meet another
    # Ray on the machine.
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    ray.init(
        num_cpus=cores,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        logging_level="WARNING",
        log_to_driver=False,
        # The replica imports recipe_model from bench/.
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}},
    )
    # A handler, not the default action: whichever of Ray's threads the signal reaches, the main
    # thread then shuts Serve and Ray down.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = Recommender.bind(
            str(args.checkpoint.resolve()), str(args.dataset_pickle.resolve()), args.torch_threads
        )
        serve.run(app, route_prefix="/recommend")
        print(json.dumps({"ready": True, "port": args.port, "ray_temp_dir": temp_dir}), flush=True)
        stopping.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
