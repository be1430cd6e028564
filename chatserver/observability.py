"""Metrics (prometheus-client), /healthz, /readyz, /metrics, and logging setup.

With several workers, PROMETHEUS_MULTIPROC_DIR is set by the supervisor and /metrics on
any worker answers the sum over all workers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

ReadyCheck = Callable[[], tuple[bool, str]]  # (ready, why not)
Handler = Callable[[web.Request], Awaitable[web.Response]]


class Metrics:
    """The server's metrics, on a registry of their own (tests build many apps)."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created adds noise
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        reg = None if self.multiprocess else self.registry
        self.connections = Gauge(
            "chatserver_connections",
            "Open WebSocket connections",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.messages_in = Counter(
            "chatserver_messages_in", "Messages accepted from clients", registry=reg
        )
        self.messages_out = Counter(
            "chatserver_messages_out",
            "Frames delivered to clients (one per recipient)",
            registry=reg,
        )
        self.auth_failures = Counter(
            "chatserver_auth_failures", "Refused upgrades and sign-ins", ["reason"], registry=reg
        )
        self.closes = Counter(
            "chatserver_closes", "Server-initiated closes by code", ["code"], registry=reg
        )
        self.slow_consumers = Counter(
            "chatserver_slow_consumer_closes",
            "Clients closed 1013 for a full backlog",
            registry=reg,
        )
        self.redis_reconnects = Counter(
            "chatserver_redis_reconnects", "Redis pub/sub reconnect attempts", registry=reg
        )
        self.listener_restarts = Counter(
            "chatserver_listener_restarts", "Broker listener tasks restarted", registry=reg
        )
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self.registry)


def healthz_handler(instance: str) -> Handler:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "instance": instance})

    return healthz


def readyz_handler(is_ready: ReadyCheck) -> Handler:
    async def readyz(request: web.Request) -> web.Response:
        ready, detail = is_ready()
        return web.json_response({"ready": ready, "detail": detail}, status=200 if ready else 503)

    return readyz


def metrics_handler(metrics: Metrics) -> Handler:
    async def render(request: web.Request) -> web.Response:
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return render


def setup_logging(level: str) -> None:
    # The logging HOWTO's "Optimization": we print no file/line, thread or multiprocessing
    # name, so skip gathering them (findCaller's stack walk is most of a log call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

