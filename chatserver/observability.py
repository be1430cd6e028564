"""Metrics (prometheus-client), /healthz, /readyz, /metrics, and logging setup.

With several workers, PROMETHEUS_MULTIPROC_DIR is set by the supervisor and /metrics on
any worker answers the sum over all workers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

ReadyCheck = Callable[[], tuple[bool, str]]  # (ready, why not)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds
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
        self.half_open = Gauge(
            "chatserver_half_open_connections",
            "Connections that have not sent a complete request head yet",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.half_open_dropped = Counter(
            "chatserver_half_open_dropped",
            "Connections dropped before their first request head, by reason",
            ["reason"],
            registry=reg,
        )
        self.handshakes_shed = Counter(
            "chatserver_handshakes_shed",
            "Upgrades answered 503 at once because CHAT_MAX_HANDSHAKES were in flight",
            registry=reg,
        )
        self.loop_lag = Histogram(
            "chatserver_loop_lag_seconds",
            "How late the event loop ran a timer due every 20 ms (what every frame waits)",
            buckets=LAG_BUCKETS,
            registry=reg,
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


def metrics_handler(metrics: Metrics, token: str | None = None) -> Handler:
    """/metrics for a scraper on the same host or network, never for the public: without
    CHAT_METRICS_TOKEN, only direct requests (no proxy's X-Forwarded-For or Forwarded)
    from loopback or private addresses; with it, only its bearer."""
    expected = f"Bearer {token}".encode() if token else None

    async def render(request: web.Request) -> web.Response:
        if expected is not None:
            presented = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(presented, expected):
                return web.json_response({"error": "unauthenticated"}, status=401)
        elif not _scraper(request):
            return web.json_response({"error": "forbidden"}, status=403)
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return render


def _scraper(request: web.Request) -> bool:
    if "X-Forwarded-For" in request.headers or "Forwarded" in request.headers:
        return False  # came through the public proxy
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return peer.is_loopback or peer.is_private


class QuietAiohttp(logging.Filter):
    """aiohttp's own log lines, made safe for anyone to trigger: a malformed request
    (its parser error quotes the request's bytes: cookies, tokens) becomes one counted
    WARNING line at most every `every` seconds, without the bytes or a traceback; and the
    subprotocols a client offered (a JWT, for some clients) are never written out."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every = every
        self._clock = clock
        self._count = 0  # malformed requests since the last line
        self._logged: float | None = None  # when the last line went out

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiohttp.websocket" and "protocols" in str(record.msg):
            record.msg, record.args = "client offered WebSocket subprotocols; none is served", ()
            return logging.getLogger("chatserver").isEnabledFor(logging.DEBUG)
        error = record.exc_info[1] if record.exc_info else None
        if record.name != "aiohttp.server" or not isinstance(error, HttpProcessingError):
            return True  # an exception in our own handler: keep its traceback
        self._count += 1
        now = self._clock()
        if self._logged is not None and now - self._logged < self._every:
            return False
        record.msg = "%d malformed HTTP requests since the last such line (last: %s)"
        record.args = (self._count, type(error).__name__)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._count, self._logged = 0, now
        return True


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
    quiet = QuietAiohttp()
    for name in ("aiohttp.server", "aiohttp.websocket"):
        logging.getLogger(name).addFilter(quiet)

