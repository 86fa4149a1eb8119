"""``vitrina serve``: the HTTP API and web page of one index, under uvicorn."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from vitrina.errors import UserError
from vitrina.serve.app import create_app

__all__ = ["SERVE_THREADS", "create_app", "serve"]

# One query is a batch of one: splitting it over cores gains little, and when the cores are busy
# (indexing, training, other users) every parallel op waits for a descheduled thread. Measured on
# the 2-core machine under load: clip-tiny text query 0.7 ms with 1 thread vs 130 ms with 2.
SERVE_THREADS = 1


def _check_port_free(host: str, port: int) -> None:
    """A one-line ``UserError`` now, rather than uvicorn's log line and exit, when the port is taken."""
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be between 1 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(f"{host}:{port}: cannot listen there ({error.strerror}); pick another --port") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    index_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_ref: str | None = None,
    threads: int = SERVE_THREADS,
    precision: str = "fp32",
    runtime: str = "auto",
    reranker: str | None = None,
) -> None:
    """Serve ``index_dir`` at ``http://host:port/`` until interrupted; the model is loaded once, first.

    ``threads`` sets torch's intra-op threads for the whole process (see ``SERVE_THREADS``). ``runtime``: what
    embeds query texts (``create_app``).
    """
    import torch
    import uvicorn

    _check_port_free(host, port)
    if threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    torch.set_num_threads(threads)
    app = create_app(Path(index_dir), model_ref=model_ref, precision=precision, runtime=runtime, reranker=reranker)
    if not _is_loopback(host):
        print(
            f"warning: listening on {host}: anyone who can reach it can search and view the indexed images "
            "(there is no login)",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    texts = "the exported ONNX text tower" if app.state.text_runtime == "onnx" else "PyTorch"
    if runtime == "auto" and app.state.text_runtime == "torch":
        texts += " (the version has no exported text tower: `vitrina index` exports it)"
    print(f"vitrina: serving {index_dir} at http://{shown}:{port}/  (API schema: /openapi.json; Ctrl+C stops)")
    print(f"vitrina: query texts are embedded by {texts}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
