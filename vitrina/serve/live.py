"""Keeps a running server on the newest published state of its index, without a restart.

A ``Reloader`` thread checks twice a second whether the indexer published a newer ANN file of the
active version, or whether another version was activated. When so, it loads the new view (and the
new version's model, warmed up) on its own thread with its own SQLite connection, and swaps it into
the ``Searcher`` with one reference assignment. A query in flight keeps the state it started with;
none waits for a load; a load that fails is logged and retried, while the old state keeps serving.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from vitrina.index.store import IndexStore
from vitrina.search import Searcher

log = logging.getLogger("vitrina.serve")

POLL_S = 0.5


class Reloader:
    """A daemon thread that calls ``searcher.refresh`` every ``interval_s`` seconds until ``stop()``."""

    def __init__(self, searcher: Searcher, index_dir: Path, *, interval_s: float = POLL_S) -> None:
        self.searcher, self.index_dir, self.interval_s = searcher, Path(index_dir), interval_s
        self.swaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitrina-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store: IndexStore | None = None
        while not self._stop.wait(self.interval_s):
            try:
                store = store or IndexStore.open(self.index_dir)
                before = self.searcher.served
                if self.searcher.refresh(store):
                    self.swaps += 1
                    after = self.searcher.served
                    log.info(
                        "serving %s generation %d (%d vectors), was %s generation %d",
                        after.version.name,
                        after.view.generation,
                        after.view.count,
                        before.version.name,
                        before.view.generation,
                    )
            except Exception:  # never let the loader die: the old state keeps serving
                log.exception("could not load the index's newest state; still serving the previous one")
        if store is not None:
            store.close()

    def stop(self) -> None:
        """Stop the thread (waits for a load in progress)."""
        self._stop.set()
        self._thread.join()
