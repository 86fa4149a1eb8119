"""A one-thread worker that owns an object made on that thread, for use from async request handlers.

SQLite connections may only be used on the thread that opened them, and the model is best fed one
batch at a time on a 2-core machine anyway; so the index and the encoder each live on one worker
thread, and request handlers ``await worker.run(fn, ...)`` instead of touching them directly. The
event loop stays free for health checks, metrics and static files while a search runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Worker(Generic[T]):
    """Runs ``factory()`` on a dedicated thread, then runs every later call on that same thread."""

    def __init__(self, name: str, factory: Callable[[], T], *, close: Callable[[T], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._close = close
        self._closed = False
        try:
            self._obj: T = self._pool.submit(factory).result()  # errors (a bad index) surface here
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(obj, *args)`` on the worker thread, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self._pool.submit(fn, self._obj, *args))

    def call(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(obj, *args)`` on the worker thread, waited for synchronously (set-up and shutdown)."""
        return self._pool.submit(fn, self._obj, *args).result()

    def shutdown(self) -> None:
        """Close the owned object on its thread and stop the thread (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self._close is not None:
            self._pool.submit(self._close, self._obj).result()
        self._pool.shutdown(wait=True)
