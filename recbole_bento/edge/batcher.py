"""An adaptive batcher for one event loop: the calls that arrive while a batch is being ranked go
together in the next one. No timer: a lone request is ranked at once (no added latency at low
load), and batches grow with the load by themselves. Written here rather than taken from BentoML,
whose batcher (``CorkDispatcher``) is private API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(Exception):
    """A call waited longer than the batcher's ``max_wait_s`` before a batch took it."""


class Batcher(Generic[Q, R]):
    """``await batcher(query)`` -> that query's result from ``rank_many([..., query, ...])``.

    *rank_many* runs at most *concurrency* batches at once, each of at most *max_batch* queries;
    an exception it raises is raised by every call in that batch.
    """

    def __init__(
        self,
        rank_many: Callable[[list[Q]], Awaitable[Sequence[R]]],
        *,
        max_batch: int,
        max_wait_s: float,
        concurrency: int = 1,
    ) -> None:
        self.rank_many = rank_many
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._queue: list[tuple[Q, asyncio.Future[R], float]] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def __call__(self, query: Q) -> R:
        if self._loop_task is None:  # created lazily: the event loop exists only once serving
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((query, future, time.monotonic()))
        self._wake.set()  # type: ignore[union-attr]
        return await future

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await self._slots.acquire()
            # Let the requests already parsed in this loop turn reach the queue before taking it.
            size = -1
            while size != len(self._queue) and len(self._queue) < self.max_batch:
                size = len(self._queue)
                await asyncio.sleep(0)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            if not self._queue:
                self._wake.clear()
            asyncio.get_running_loop().create_task(self._rank(batch))

    async def _rank(self, batch: list[tuple[Q, asyncio.Future[R], float]]) -> None:
        try:
            expired = time.monotonic() - self.max_wait_s
            live = []
            for query, future, queued in batch:
                if queued < expired:
                    future.set_exception(Overloaded(f"waited more than {self.max_wait_s:g} s for the model"))
                elif not future.cancelled():
                    live.append((query, future))
            if not live:
                return
            try:
                results = await self.rank_many([query for query, _ in live])
            except Exception as exc:  # every caller in the batch gets it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._slots.release()
