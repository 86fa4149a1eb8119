"""HTTP load on ``vitrina serve``: N concurrent clients on loopback for a bounded time.

The server runs in its own process (``vitrina.serve.serve``, exactly what ``vitrina serve`` runs);
the clients are threads of this process, each with its own keep-alive ``http.client`` connection
(the lightest client at hand: httpx's async client cost more CPU than the server), each sending
text queries (``GET /api/search?q=…&k=10``) back to back until the time is up. Clients and server
share this machine's cores, so the numbers are a floor for a server with a machine of its own.

The index: ``--index``, else the first index under ``runs/`` built by a trained checkpoint, else a
tiny index of generated pictures embedded with the untrained ``clip-tiny`` preset (the row name
says which). Queries are the index's own labels and captions. Any error fails the run (exit 1).

Each client count is run twice: with every query text made unique (a number appended: the server's
query-embedding cache never answers, every query runs the text tower: the honest throughput) and with
the texts repeating (cache hits: what a page reloading popular queries sees). The rows say which.

``--runtime`` is the server's (``vitrina serve --runtime``): what embeds the query texts, the index's
exported ONNX text tower or the PyTorch model (the rest of a request is the same code). Give several
(``--runtime onnx torch``) to measure them one after the other in this run, each in a fresh server
process. The rows name the runtime (``auto: onnx`` when ``auto`` chose the exported tower); with
``torch`` among them, the other rows carry ``*_vs_torch`` ratios to the same clients and queries
under PyTorch.

Usage: ``.venv/bin/python bench/serve_load.py [--index DIR] [--clients 1 8] [--seconds 20] [--runtime onnx torch]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._report import record  # noqa: E402
from vitrina.errors import UserError  # noqa: E402
from vitrina.index.store import IndexStore, choose_index_kind  # noqa: E402
from vitrina.models.precision import PRECISIONS  # noqa: E402

BENCHMARK = "serve_load"
K = 10
WARMUP_S = 2.0
FALLBACK_IMAGES = 300


def trained_index() -> Path | None:
    """The first index under ``runs/`` whose model is a checkpoint folder that still exists."""
    for meta in sorted((REPO / "runs").glob("**/meta.sqlite")):
        try:
            with IndexStore.open(meta.parent) as store:
                ref, count = store.active_version().model_ref, store.count
        except UserError:  # an older format, or no active version yet
            continue
        if ref and Path(ref).is_dir() and count:
            return meta.parent
    return None


def tiny_index(folder: Path) -> Path:
    """``FALLBACK_IMAGES`` generated pictures in 10 labelled folders, embedded with clip-tiny."""
    from PIL import Image, ImageDraw

    from vitrina.checkpoint import load_encoder
    from vitrina.index.embed import index_folder

    rng = np.random.default_rng(0)
    names = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey"]
    for i in range(FALLBACK_IMAGES):
        label = names[i % len(names)]
        (folder / "photos" / label).mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 256, 3)))
        box = sorted(rng.integers(4, 60, 2).tolist())
        ImageDraw.Draw(image).ellipse((box[0], box[0], box[1], box[1]), fill=label)
        image.save(folder / "photos" / label / f"{i:04d}.png")
    encoder = load_encoder("clip-tiny")
    index_folder(folder / "photos", encoder, folder / "index", model_ref="clip-tiny", progress=False)
    return folder / "index"


def index_queries(index_dir: Path, limit: int = 200) -> list[str]:
    """Distinct labels and captions of the index, as a person might type them."""
    with IndexStore.open(index_dir) as store:
        texts = {t for _, _, label, caption in store.items() for t in (label, caption) if t}
    queries = sorted(texts)[:limit]
    return queries or ["a photo", "something red", "a dog -cat", "a small bird"]


def run_server(index_dir: str, port: int, runtime: str, precision: str = "fp32") -> None:
    """Child process: exactly what ``vitrina serve INDEX --port PORT --runtime RUNTIME --precision P`` runs."""
    from vitrina.serve import serve

    serve(Path(index_dir), port=port, runtime=runtime, precision=precision)


def runtime_used(base_url: str, runtime: str) -> str:
    """What embeds the server's query texts, as ``/api/info`` says: ``onnx`` or ``torch``."""
    import httpx

    return httpx.get(f"{base_url}/api/info", timeout=10).json()["model"]["text_runtime"]


def load(
    port: int, queries: list[str], clients: int, seconds: float, *, unique: bool = False
) -> tuple[list[float], int, float]:
    """``clients`` threads querying until ``seconds`` pass -> (latencies in s, error count, elapsed s).

    ``unique``: every request's text is new (a number appended), so the server's query-embedding cache
    never answers: every query runs the text tower.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = time.perf_counter()
    deadline = start + seconds

    def one_client(c: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = c
        while time.perf_counter() < deadline:
            text = queries[i % len(queries)] + (f" {i}" if unique else "")
            path = "/api/search?" + urllib.parse.urlencode({"q": text, "k": K})
            sent = time.perf_counter()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                ok = response.status == 200 and "hits" in json.loads(response.read())
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                connection.close()  # reconnects on the next request
            latencies[c].append(time.perf_counter() - sent)
            errors[c] += not ok
            i += clients
        connection.close()

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [x for per_client in latencies for x in per_client], sum(errors), time.perf_counter() - start


def wait_healthy(base_url: str, process: multiprocessing.Process, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise SystemExit(f"the server process exited with code {process.exitcode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not answer /healthz in time")


def measure(
    index_dir: Path,
    queries: list[str],
    runtime: str,
    client_counts: list[int],
    seconds: float,
    count: int,
    rows: dict,
    precision: str = "fp32",
) -> bool:
    """One server process with ``runtime``; a row per client count, unique and repeated texts, into ``rows``
    (keyed by (runtime it ran, clients, kind)). Returns whether any request failed."""
    with socket.socket() as probe:  # a port the OS says is free; serve() re-checks it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("spawn").Process(
        target=run_server, args=(str(index_dir), port, runtime, precision)
    )
    server.start()
    failed = False
    try:
        wait_healthy(base_url, server)
        ran = runtime_used(base_url, runtime)
        ran = ran if ran == runtime else f"{runtime}: {ran}"  # auto says what it chose
        load(port, queries, 1, WARMUP_S)  # first requests pay one-off costs
        for clients, unique in [(c, u) for c in client_counts for u in (True, False)]:
            latencies, errors, elapsed = load(port, queries, clients, seconds, unique=unique)
            ms = np.asarray(latencies) * 1e3
            kind = "unique queries (no cache)" if unique else "repeated queries (cache hits)"
            rows[(ran, clients, kind)] = {
                "clients": clients,
                "runtime": ran,
                "seconds": round(elapsed, 1),
                "requests": len(latencies),
                "qps": len(latencies) / elapsed,
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "errors": errors,
                "items": count,
            }
            print(
                f"--runtime {runtime} ({ran}), {clients:>3} clients, {kind}: {len(latencies) / elapsed:.1f} req/s, "
                f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, "
                f"{errors} errors over {len(latencies)} requests"
            )
            failed = failed or errors > 0
    finally:
        server.terminate()
        server.join(timeout=10)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="index folder to serve (default: a trained one under runs/)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one row each")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each row")
    parser.add_argument(
        "--precision", default="fp32", choices=PRECISIONS, help="the server's --precision (every runtime of the run)"
    )
    parser.add_argument("--label", default=None, help="the model's name in the rows (default: its folder's name)")
    parser.add_argument(
        "--runtime",
        nargs="+",
        default=["auto"],
        choices=["auto", "onnx", "torch"],
        help="the server's --runtime (what embeds query texts); several: one server after the other, rows side by side",
    )
    args = parser.parse_args()
    if args.precision != "fp32" and "onnx" in args.runtime:
        parser.error(f"--precision {args.precision} runs the PyTorch towers: give --runtime auto or torch")

    with tempfile.TemporaryDirectory(prefix="vitrina-serve-load-") as tmp:
        index_dir = args.index or trained_index()
        if index_dir is None:
            print("no trained index under runs/: serving clip-tiny (untrained) over generated pictures")
            index_dir, model = tiny_index(Path(tmp)), "clip-tiny (untrained)"
        else:
            with IndexStore.open(index_dir) as store:
                model = args.label or Path(store.active_version().model_ref).name
        with IndexStore.open(index_dir) as store:
            count = store.count
            index_kind = choose_index_kind(count, store.active_version().index_kind)
        queries = index_queries(index_dir)

        rows: dict[tuple[str, int, str], dict] = {}
        failed = False
        for runtime in args.runtime:
            failed = (
                measure(index_dir, queries, runtime, args.clients, args.seconds, count, rows, args.precision) or failed
            )
    for (runtime, clients, kind), row in rows.items():
        torch_row = rows.get(("torch", clients, kind))
        if torch_row is not None and runtime != "torch":  # side by side, same run: < 1 is faster than PyTorch
            row["p50_vs_torch"] = row["p50_ms"] / torch_row["p50_ms"]
            row["p99_vs_torch"] = row["p99_ms"] / torch_row["p99_ms"]
            row["qps_vs_torch"] = row["qps"] / torch_row["qps"]
        record(
            BENCHMARK,
            f"{model} · {index_kind} · {count} items · GET /api/search k={K} · {clients} clients · {kind} · {runtime}"
            + ("" if args.precision == "fp32" else f" · {args.precision}"),
            row,
        )
    if failed:
        print("errors during the load test: see the rows above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
