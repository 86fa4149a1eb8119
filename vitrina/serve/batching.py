"""Micro-batching of searches, and a bounded lane for the expensive routes.

``MicroBatcher``: concurrent queries are gathered for at most ``window_ms`` after the first one
arrives (or until ``max_batch`` are waiting, or while the search worker is still busy with the
previous batch), then run as one ``Searcher.run_batch`` on the search worker: their texts go through
the text tower in one batch and their vectors through one ANN search. A lone client does not wait
for the window (the last batch held one query); eight clients share one forward pass instead of
queueing for eight.

``HeavyLane``: uploads, zero-shot classification and attention maps run the image tower and many
prompts; they get their own worker thread and a bounded number of places, so they never queue in
front of searches, and a flood of them is answered 503 (with ``Retry-After``) instead of piling up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from vitrina.search import Query, Results, Searcher
from vitrina.serve.workers import Worker

R = TypeVar("R")

WINDOW_MS = 2.0
MAX_BATCH = 32
HEAVY_SLOTS = 4  # expensive requests running or waiting at once; more are refused with 503


class MicroBatcher:
    """Runs queries submitted from the event loop in batches on ``worker`` (the searcher's thread)."""

    def __init__(self, worker: Worker[Searcher], *, window_ms: float = WINDOW_MS, max_batch: int = MAX_BATCH) -> None:
        self.worker, self.window_s, self.max_batch = worker, window_ms / 1000, max_batch
        self._pending: list[tuple[Query, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.queries = 0
        self._last_size = 0

    async def submit(self, query: Query) -> Results:
        """The results of ``query``, run in the next batch; its ``UserError`` is raised here."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        future: asyncio.Future = loop.create_future()
        self._pending.append((query, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        """The one consumer: wait for a first query, let more gather, run them, repeat."""
        while True:
            await self._wake.wait()
            # Let concurrent queries join this batch, but only when there is concurrency to wait for: a lone
            # client (the last batch held one query, and one is waiting) is answered at once.
            concurrent = self._last_size > 1 or len(self._pending) > 1
            if concurrent and len(self._pending) < self.max_batch and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if not self._pending:
                self._wake.clear()
            if not batch:
                continue
            self.batches += 1
            self.queries += len(batch)
            self._last_size = len(batch)
            try:
                results = await self.worker.run(Searcher.run_batch, [query for query, _ in batch])
            except Exception as error:  # a bug in the batch: every query of it gets the error
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def stop(self) -> None:
        """Cancel the consumer (at shutdown)."""
        if self._task is not None:
            self._task.cancel()

    @property
    def mean_batch(self) -> float:
        """Queries per batch so far."""
        return self.queries / self.batches if self.batches else 0.0


class Busy(Exception):
    """All places of the heavy lane are taken: answer 503 and ask the client to retry."""


class HeavyLane:
    """A worker thread of its own for expensive work, with at most ``slots`` requests in it at once."""

    def __init__(self, worker: Worker, *, slots: int = HEAVY_SLOTS) -> None:
        self.worker, self.slots = worker, slots
        self._taken = 0

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(obj, *args)`` on the lane's thread; ``Busy`` at once when every slot is taken."""
        if self._taken >= self.slots:
            raise Busy
        self._taken += 1  # the event loop is one thread: no lock needed
        try:
            return await self.worker.run(fn, *args)
        finally:
            self._taken -= 1
