"""How a worker process loads the models its routes name (``core/routes.py``), in either layout:

* in-process: each API worker loads the engine itself, checks the stored files' sha256 and warms
  it with one call before the model can take a request;
* split: an API worker needs the planner only (ids, popularity, attributes: no weights); the Ranker
  workers hold the engines (``RankerModels``), loaded on the first query that names a model and
  kept while the routes in force, or the ones before them, name it. The API worker's warm-up call
  goes to the Ranker, so a swap is published only once a Ranker holds the new model.

A model that cannot be loaded is a ``SwapError`` naming it and the reason; nothing is changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core import routes as routing
from ..core import store
from ..core.artifact import ArtifactError
from ..core.engine import Engine
from ..core.planner import Planner
from ..core.ranking import RankQuery, RankResult
from . import observability, topology
from .request_path import LocalModel, ModelPort, ranked
from .variants import POLL_S, Ranked, Snapshot, StateFile, release_memory

logger = logging.getLogger("recbole_bento")


@dataclass(frozen=True)
class Batching:
    max_batch: int
    max_wait_s: float
    concurrency: int


def resolve(tag: str) -> str:
    """The stored model's full tag for *tag* as written (``name`` alone: its latest version)."""
    try:
        return str(store.resolve(tag).tag)
    except ArtifactError as exc:
        raise routing.SwapError(tag, str(exc)) from None


def estimate(tag: str) -> int:
    """About the memory one process that holds *tag* takes for it (``topology.model_copy_bytes``)."""
    return topology.model_copy_bytes(store.stored_size(store.resolve(tag))) - topology.RUNTIME_BYTES


def load_engine(tag: str, device: str, block_items: int) -> Engine:
    """The engine of stored model *tag*, its files checked against their sha256, warmed by one call."""
    model = store.resolve(tag)
    engine = Engine(store.load(model, verified=False), device=device, block_items=block_items)
    engine.rank([warm_query(engine.artifact.spec.needs_user, tag)])
    return engine


def warm_query(needs_user: bool, tag: str) -> RankQuery:
    return RankQuery([1], 1, user=1 if needs_user else None, model=tag)


def observed(engine: Engine, tag: str, queries: Sequence[RankQuery]) -> list[RankResult]:
    with observability.model_call(tag, len(queries)):
        return engine.rank(queries)


def in_process(
    device: str, block_items: int, max_topk: int, batching: Batching
) -> Callable[[str], routing.Loaded[Ranked]]:
    """The loader of an in-process API worker: the whole model, in this process."""

    def load(tag: str) -> routing.Loaded[Ranked]:
        def build() -> tuple[Planner, Ranked]:
            engine = load_engine(tag, device, block_items)
            port = LocalModel(lambda queries: observed(engine, tag, queries), str(engine.device))
            handle = ranked(port, batching.max_batch, batching.max_wait_s, batching.concurrency, holds=engine)
            return Planner(engine.artifact, max_topk), handle

        return routing.timed_load(tag, build, estimate(tag))

    return load


def remote(port: ModelPort, max_topk: int, batching: Batching) -> Callable[[str], routing.Loaded[Ranked]]:
    """The loader of a split-layout API worker: the planner here, the model in the Ranker (*port*)."""

    def load(tag: str) -> routing.Loaded[Ranked]:
        def build() -> tuple[Planner, Ranked]:
            artifact = store.load(store.resolve(tag), load_weights=False, verified=False)
            return Planner(artifact, max_topk), ranked(
                port, batching.max_batch, batching.max_wait_s, batching.concurrency
            )

        return routing.timed_load(tag, build, estimate(tag))

    return load


async def warm_remote(loaded: routing.Loaded[Ranked]) -> None:
    """One call to the Ranker for the new model: it loads it before the swap is published."""
    await loaded.model.port.rank([warm_query(loaded.planner.spec.needs_user, loaded.tag)])


def builder(
    load: Callable[[str], routing.Loaded[Ranked]], budget_bytes: int
) -> Callable[[routing.Routes, int, Snapshot | None], Snapshot]:
    """``Host``'s build step: ``core.routes.build`` with this process's loader and budget."""

    def build(routes: routing.Routes, generation: int, previous: Snapshot | None) -> Snapshot:
        return routing.build(
            routes, generation, _load_or_refuse(load), resolve=resolve, estimate=estimate,
            previous=previous, budget_bytes=budget_bytes,
        )  # fmt: skip

    return build


def _load_or_refuse(load: Callable[[str], routing.Loaded[Ranked]]) -> Callable[[str], routing.Loaded[Ranked]]:
    def guarded(tag: str) -> routing.Loaded[Ranked]:
        try:
            return load(tag)
        except routing.SwapError:
            raise
        except ArtifactError as exc:  # an altered file, weights that do not fit ...
            raise routing.SwapError(tag, str(exc)) from None
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise routing.SwapError(tag, f"out of memory while loading ({exc})") from None
        except Exception as exc:  # anything else a model file can make a loader raise
            raise routing.SwapError(tag, f"{type(exc).__name__}: {exc}") from None

    return guarded


class RankerModels:
    """The split layout's Ranker: an engine per stored model that the routes name. A query names
    its model (``RankQuery.model``); the first query for a model loads it (the API worker's warm-up
    call, before the swap is published). Engines the routes in force and the ones before them no
    longer name are dropped, and their memory returned, when the state file changes."""

    def __init__(
        self, default_tag: str, named: set[str], device: str, block_items: int, state: StateFile | None
    ) -> None:
        self.default_tag = default_tag  # what a query that names no model is ranked by
        self.device = device
        self.block_items = block_items
        self.state = state
        self.engines: dict[str, Engine] = {}
        self._loading = threading.Lock()
        self._named = named  # the tags of the routes in force (at start: the start-up routes')

    def rank(self, queries: Sequence[RankQuery]) -> list[RankResult]:
        groups: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.model or self.default_tag, []).append(i)
        out: list[RankResult | None] = [None] * len(queries)
        for tag, rows in groups.items():
            results = observed(self.engine(tag), tag, [queries[i] for i in rows])
            for i, result in zip(rows, results, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]

    def engine(self, tag: str) -> Engine:
        engine = self.engines.get(tag)
        if engine is not None:
            return engine
        with self._loading:
            if tag not in self.engines:
                self.engines[tag] = load_engine(tag, self.device, self.block_items)
                logger.info("ranker: loaded %s", tag)
            return self.engines[tag]

    def watch(self) -> None:
        """Follow the routes state in a daemon thread: new models are loaded before the first query
        names them, released ones dropped."""

        def follow() -> None:
            while True:
                time.sleep(POLL_S)
                try:
                    self._follow_routes()
                except Exception:  # the ranker must outlive any bad routes
                    logger.exception("ranker: following the routes failed")

        threading.Thread(target=follow, daemon=True, name="routes").start()

    def _follow_routes(self) -> None:
        if self.state is None or not self.state.changed():
            return
        try:
            found = self.state.read()
        except routing.RoutesError as exc:
            logger.warning("routes state ignored: %s", exc)
            return
        if found is None:
            return
        routes = found[1]
        named = {resolve_quietly(v.model) for v in routes.variants} | {resolve_quietly(routes.shadow)}
        keep = named | self._named  # the routes before: requests admitted under them may still come
        self._named = named
        for tag in sorted(named - {""}):
            self.engine(tag)
        with self._loading:
            dropped = [tag for tag in self.engines if tag not in keep]
            for tag in dropped:
                del self.engines[tag]
        if dropped:
            release_memory()
            logger.info("ranker: released %s", ", ".join(dropped))


def reread(path: str, state: StateFile) -> None:
    """SIGHUP in the arbiter: the routes file read again, its models checked (in the store, their
    sha256), and published to the workers; a bad file or model is logged and changes nothing."""
    try:
        routes = routing.read(path)
        tags = [v.model for v in routes.variants] + ([routes.shadow] if routes.shadow else [])
        for tag in tags:
            try:
                store.verify(store.resolve(tag))
            except ArtifactError as exc:
                raise routing.SwapError(tag, str(exc)) from None
        with state.lock():
            found = state.read_or_none()
            generation = (found[0] if found else 0) + 1
            state.write(generation, routes)
    except (routing.RoutesError, routing.SwapError, OSError) as exc:
        logger.warning("SIGHUP: routes not changed: %s", exc)
        return
    logger.info("SIGHUP: %s re-read: generation %d published to the workers", path, generation)


def resolve_quietly(tag: str | None) -> str:
    try:
        return resolve(tag) if tag else ""
    except routing.SwapError:
        return tag or ""
