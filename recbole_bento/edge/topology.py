"""Where the model runs, and how many processes serve: decided once, at import, from what is served.

Two layouts (``RECBOLE_BENTO_TOPOLOGY``):

* ``split``: the public ``Recommender`` calls a batchable ``Ranker`` service (``bentoml.depends``)
  that holds the model. One model copy serves every API worker, and batches gather the traffic of
  all of them: what a GPU wants (one copy in device memory), and a CPU machine whose memory
  cannot hold a copy per API worker. Each batch costs an inter-service HTTP hop.
* ``inprocess``: each API worker holds the model and batches its own requests (``edge/batcher.py``);
  no second service, no hop. What CPU serving wants wherever the copies fit.

``auto`` (unset): ``split`` on CUDA. On CPU ``inprocess``, as long as one model copy per API
worker fits in half the memory this process may use; ``split`` when it does not. On CPU
``inprocess`` was faster than ``split`` at every load on both benchmark catalogues, 1,682 and
1,000,000 items, and took less memory in total (docs/benchmarks.md): ``split`` keeps a model copy
per Ranker worker *and* the vocabulary in every API worker. Worker and thread counts left at 0 are
picked so that processes x torch threads never exceeds the cores this process may use (cgroup quota
or CPU affinity): on CPU, every thread beyond a core stalls the others at OpenMP barriers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings

TOPOLOGIES = ("split", "inprocess")
# A process that holds the model, measured (docs/benchmarks.md): the Python + torch runtime, plus
# about 4x the stored files it reads into its own memory (the vocabulary as Python strings and a
# dict, popularity; for a model stored before the tables were mapped, the unit-norm table it
# computes too). The files it maps (core/artifact.py: the weights, the item table and its unit-norm
# copy) are one physical copy for the whole server: they count once, not per process.
RUNTIME_BYTES = 400 * 2**20
STORED_BYTES_FACTOR = 4
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


def model_copy_bytes(stored_bytes: int, mapped_bytes: int = 0) -> int:
    """About what one process that holds a model of *stored_bytes* stored files takes in its own
    memory; *mapped_bytes* of them are mapped (``store.mapped_size``) and shared by every process
    of the server (``choose``'s *shared_bytes*)."""
    return RUNTIME_BYTES + STORED_BYTES_FACTOR * (stored_bytes - mapped_bytes)


def choose(
    settings: Settings, device: str, cores: int, copy_bytes: int, memory_bytes: int, shared_bytes: int = 0
) -> Layout:
    """The layout for *settings* (explicit values win) on *device*, for a model that takes about
    *copy_bytes* per process that holds it, plus *shared_bytes* once for the whole server (mapped
    files), with *memory_bytes* to use."""
    requested = (settings.topology or "auto").lower()
    if requested not in ("auto", *TOPOLOGIES):
        raise ValueError(f"RECBOLE_BENTO_TOPOLOGY={settings.topology!r}: use auto, split or inprocess")
    on_cuda = device.startswith("cuda")
    fit = max(0, memory_bytes // 2 - shared_bytes) // max(1, copy_bytes)  # copies that fit in half the memory
    in_process_api = settings.api_workers or cores
    if requested != "auto":
        topology, reason = requested, "RECBOLE_BENTO_TOPOLOGY"
    elif on_cuda:
        topology, reason = "split", "CUDA: one model copy shared by every API worker"
    else:
        need = f"{in_process_api} model copies of ~{copy_bytes / 2**30:.1f} GiB"
        if shared_bytes:
            need += f" + {shared_bytes / 2**30:.1f} GiB mapped once"
        half = f"half of {memory_bytes / 2**30:.1f} GiB"
        if in_process_api <= fit:
            topology, reason = "inprocess", f"CPU, {need} fit in {half}: no inter-service hop"
        else:
            topology, reason = "split", f"CPU, {need} exceed {half}: shared model copies"
    if topology == "inprocess":
        threads = settings.torch_threads or max(1, cores // in_process_api)
        return Layout(topology, reason, in_process_api, 0, threads)
    api = settings.api_workers or min(SPLIT_CPU_WORKERS, cores)
    rankers = settings.ranker_workers or (1 if on_cuda else min(SPLIT_CPU_WORKERS, cores, max(1, fit)))
    return Layout(topology, reason, api, rankers, settings.torch_threads or max(1, cores // rankers))


def available_memory() -> int:
    """Bytes this process may use: the cgroup v2 limit (a container's ``limits.memory``) where
    there is one, else the machine's memory. Never what is free right now: every BentoML process
    (the arbiter, each worker, a restarted one) computes the layout on its own, so it has to come
    out the same each time."""
    available = _meminfo_bytes("MemTotal")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return available
    return available if limit == "max" else min(available, int(limit))


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise OSError(f"/proc/meminfo has no {field}")


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
