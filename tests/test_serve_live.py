"""A running server follows its index: new publications and a newly activated version are swapped in
without a restart, while requests keep being answered (none fails)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_index import draw, write_collection

from vitrina.checkpoint import load_encoder, save_model
from vitrina.index.embed import index_folder
from vitrina.index.lock import WriterLock
from vitrina.index.store import IndexStore
from vitrina.models.registry import build_model
from vitrina.search import Searcher
from vitrina.serve.app import create_app


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Hammer:
    """Threads sending searches back to back until stopped; every status is kept."""

    def __init__(self, client: TestClient, threads: int = 3) -> None:
        self.client, self.statuses, self._stop = client, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            if i % 2:
                response = self.client.get("/api/search", params={"q": "a red circle", "k": 5})
            else:
                response = self.client.post("/api/search", json={"image_id": 1 + i, "k": 5})
            self.statuses.append(response.status_code)

    def stop(self) -> list[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.statuses


@pytest.fixture
def setup(tmp_path: Path):
    collection = tmp_path / "photos"
    write_collection(collection)
    save_model(build_model("clip-tiny", seed=0), tmp_path / "A")
    save_model(build_model("clip-tiny", seed=1), tmp_path / "B")
    index_dir = tmp_path / "idx"
    index_folder(collection, load_encoder(tmp_path / "A"), index_dir, model_ref=str(tmp_path / "A"), progress=False)
    return collection, index_dir, tmp_path / "A", tmp_path / "B"


def test_server_swaps_to_new_items_and_a_new_version_without_failing_a_request(setup) -> None:
    collection, index_dir, a, b = setup
    app = create_app(index_dir, reload_s=0.1)
    with TestClient(app) as client:
        info = client.get("/api/info").json()
        assert (info["version"], info["served_vectors"], info["model"]["ref"]) == ("v1", 24, "A")
        hammer = Hammer(client)
        try:
            # New files: the indexer publishes, the server picks the new generation up by itself.
            for i in range(4):
                draw((200, 100 + 30 * i, 50), "circle", i % 3).save(collection / "red" / f"new-{i}.png")
            index_folder(collection, load_encoder(a), index_dir, model_ref=str(a), progress=False)
            wait_for(lambda: client.get("/api/info").json()["served_vectors"] == 28)
            # A new version built while serving, then activated: the server moves to it and to its model.
            report = index_folder(collection, load_encoder(b), index_dir, model_ref=str(b), new_version=True)
            assert report.activated
            wait_for(lambda: client.get("/api/info").json()["version"] == "v2")
            time.sleep(0.3)  # some requests on the new version too
        finally:
            statuses = hammer.stop()
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        info = client.get("/api/info").json()
        assert info["model"]["ref"] == "B" and info["model"]["digest"] == load_encoder(b).identity["digest"]
        assert info["swaps"] >= 2 and info["served_vectors"] == 28
        # The answers are the new version's: the same as a fresh searcher on the index.
        with Searcher(index_dir) as fresh:
            expected = [h.id for h in fresh.search_text("a red circle", k=5)]
        got = client.get("/api/search", params={"q": "a red circle", "k": 5}).json()["hits"]
        assert [h["id"] for h in got] == expected
        # Rolling back is as quick.
        with WriterLock(index_dir), IndexStore.open(index_dir) as store:
            store.activate("v1")
        wait_for(lambda: client.get("/api/info").json()["version"] == "v1")
        assert client.get("/api/info").json()["model"]["ref"] == "A"
