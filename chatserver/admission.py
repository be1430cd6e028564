"""Admission control for WebSocket handshakes: at most CHAT_MAX_HANDSHAKES in flight per
worker, from the request's arrival (before the token's RSA check, the dear part) until
the client is greeted or refused. Past it a handshake is answered 503 with Retry-After
at once: in a reconnect storm a worker that queues every handshake times them all out,
while one that sheds the excess serves what it holds and lets the rest retry (nginx
retries a 503 on another replica; clients back off with jitter).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .responses import error

ADMITTED = web.RequestKey("chatserver.admitted", bool)
RETRY_AFTER = "1"  # seconds: a handshake takes milliseconds; the storm passes soon


class Admission:
    def __init__(self, limit: int, on_shed: Callable[[], None]) -> None:
        self.limit = limit
        self.in_flight = 0
        self._on_shed = on_shed

    def enter(self, request: web.Request) -> web.Response | None:
        """None: admitted (call leave() when greeted); else the 503 to answer."""
        if self.in_flight >= self.limit:
            self._on_shed()
            response = error(503, "unavailable", "too many connections opening; retry")
            response.headers["Retry-After"] = RETRY_AFTER
            return response
        self.in_flight += 1
        request[ADMITTED] = True
        return None

    def leave(self, request: web.Request) -> None:
        """The handshake is over (greeted, refused or failed); idempotent."""
        if request.get(ADMITTED):
            request[ADMITTED] = False
            self.in_flight -= 1
