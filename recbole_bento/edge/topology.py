"""Where the model runs, and how many processes serve: decided once, at import, from what is served.

Two layouts (``RECBOLE_BENTO_TOPOLOGY``):

* ``split``: the public ``Recommender`` calls a batchable ``Ranker`` service (``bentoml.depends``)
  that holds the model. One model copy serves every API worker, and batches gather the traffic of
  all of them: what a GPU wants (one copy in device memory), and a large catalogue on CPU (one
  copy of a big item table, large batches over it). Each batch costs an inter-service HTTP hop.
* ``inprocess``: each API worker holds the model and batches its own requests (``edge/batcher.py``);
  no second service, no hop. What a small catalogue on CPU wants: the hop costs more than the
  model there, and a model copy per worker is cheap.

``auto`` (unset): ``split`` on CUDA; on CPU, ``inprocess`` up to ``INPROCESS_MAX_ITEMS`` items and
``split`` above. Worker and thread counts left at 0 are picked so that processes x torch threads
never exceeds the cores this process may use (cgroup quota or CPU affinity): on CPU, every thread
beyond a core stalls the others at OpenMP barriers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings

TOPOLOGIES = ("split", "inprocess")
# Above this many items a model copy per API worker costs real memory (the item table and the
# loader's copy of it), and batches shared by every worker pay for the hop (docs/benchmarks.md).
INPROCESS_MAX_ITEMS = 200_000
SPLIT_CPU_WORKERS = 2  # on CPU, per service: two of each was 1.3-1.6x one of each on 2 cores


@dataclass(frozen=True)
class Layout:
    topology: str  # "split" | "inprocess"
    reason: str  # why, for the start-up log line
    api_workers: int
    ranker_workers: int  # 0 in-process: there is no Ranker service
    torch_threads: int  # per process that holds the model

    @property
    def split(self) -> bool:
        return self.topology == "split"

    def describe(self) -> str:
        model = (
            f"{self.ranker_workers} model worker(s)"
            if self.split
            else "the model in each of them, batched in process"
        )
        return (
            f"topology {self.topology} ({self.reason}): {self.api_workers} API worker(s), {model}, "
            f"{self.torch_threads} torch thread(s) each"
        )


def choose(settings: Settings, device: str, n_items: int, cores: int) -> Layout:
    """The layout for *settings* (explicit values win) serving *n_items* on *device*."""
    requested = (settings.topology or "auto").lower()
    if requested not in ("auto", *TOPOLOGIES):
        raise ValueError(f"RECBOLE_BENTO_TOPOLOGY={settings.topology!r}: use auto, split or inprocess")
    on_cuda = device.startswith("cuda")
    if requested != "auto":
        topology, reason = requested, "RECBOLE_BENTO_TOPOLOGY"
    elif on_cuda:
        topology, reason = "split", "CUDA: one model copy shared by every API worker"
    elif n_items > INPROCESS_MAX_ITEMS:
        topology, reason = "split", f"CPU, {n_items} items > {INPROCESS_MAX_ITEMS}: one shared model copy"
    else:
        topology, reason = "inprocess", f"CPU, {n_items} items <= {INPROCESS_MAX_ITEMS}: no inter-service hop"
    if topology == "inprocess":
        api = settings.api_workers or cores
        return Layout(topology, reason, api, 0, settings.torch_threads or max(1, cores // api))
    api = settings.api_workers or min(SPLIT_CPU_WORKERS, cores)
    rankers = settings.ranker_workers or (1 if on_cuda else min(SPLIT_CPU_WORKERS, cores))
    return Layout(topology, reason, api, rankers, settings.torch_threads or max(1, cores // rankers))


def available_cores() -> int:
    """The CPUs this process may use: the cgroup v2 quota (a container's ``limits.cpu``), else the
    CPU affinity; rounded up, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota == "max":
        return max(1, cores)
    return max(1, min(cores, math.ceil(int(quota) / int(period))))
