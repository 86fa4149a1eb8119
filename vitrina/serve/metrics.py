"""Prometheus metrics of one app: requests, latency histogram, errors, and the index size.

Each app gets its own ``CollectorRegistry`` (not the process-wide default), so several apps in one
process (tests) count apart. Requests are labelled by route template (``/api/images/{item_id}``),
never by the raw path, so the number of series stays bounded whatever clients send.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets from 5 ms (a cached thumbnail) to 10 s (a cold model on a big upload).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"


class Metrics:
    """The collectors of one app, and the text exposition of them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vitrina_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vitrina_http_request_duration_seconds",
            "Time from request to the end of the response",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "vitrina_http_errors",
            "Responses with status >= 400, by class (client: 4xx, server: 5xx)",
            ["route", "kind"],
            registry=self.registry,
        )
        self.items = Gauge("vitrina_index_items", "Items in the index", registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, "server" if status >= 500 else "client").inc()

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and records it in ``metrics``.

    The route template is read from the scope after the app ran (the router stores the matched
    route there); an exception that escapes the app counts as a 500.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, clock: Callable[[], float] = time.perf_counter) -> None:
        self.app, self.metrics, self.clock = app, metrics, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope["method"], getattr(route, "path", UNMATCHED), status, self.clock() - start)
