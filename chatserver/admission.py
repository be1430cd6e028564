"""Admission control for WebSocket handshakes. A handshake is answered 503 with
Retry-After at once, before the token's RSA check (the dear part), when

- CHAT_MAX_HANDSHAKES are already in flight on this worker (from the request's arrival
  until the client is greeted or refused), or
- the worker's event loop runs late by more than CHAT_SHED_LAG: it is saturated, so
  every handshake admitted now would delay the frames of the clients it already holds.

In a reconnect storm a worker that queues every handshake times them all out and its
clients' messages with them; one that sheds the excess keeps serving what it holds and
lets the rest retry (nginx retries a 503 on another replica; clients back off with
jitter and honour Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from .responses import error

ADMITTED = web.RequestKey("chatserver.admitted", bool)
RETRY_AFTER = "1"  # seconds: a handshake takes milliseconds; the storm passes soon
TICK = 0.02  # seconds between loop-lag samples
WEIGHT = 0.3  # of the newest sample in the moving average


class LoopLag:
    """How late this worker's event loop runs a timer, in seconds: a moving average, so
    that one long pass (a GC pause) sheds nothing, while a loop that stays saturated
    sheds within a few passes, and until it keeps time again."""

    def __init__(self, observe: Callable[[float], None] | None = None) -> None:
        self.value = 0.0
        self._observe = observe  # each sample, e.g. into a histogram metric
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + TICK
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        sample = max(0.0, now - self._due)
        self.value += WEIGHT * (sample - self.value)
        if self._observe is not None:
            self._observe(sample)
        self._due = now + TICK
        self._handle = loop.call_at(self._due, self._tick, loop)


class Admission:
    def __init__(self, limit: int, on_shed: Callable[[], None], *, max_lag: float = 0.0,
                 lag: LoopLag | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self.max_lag = max_lag  # seconds; 0: the loop's lag is not looked at
        self.lag = lag or LoopLag()
        self._on_shed = on_shed

    def enter(self, request: web.Request) -> web.Response | None:
        """None: admitted (call leave() when greeted); else the 503 to answer."""
        if self.in_flight >= self.limit or (self.max_lag and self.lag.value > self.max_lag):
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
