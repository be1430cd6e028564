"""One client connection: its identity, rooms, rate limit and bounded send backlog.

Writes go straight to the transport as pre-encoded frames and never wait: a client whose
unsent backlog passes its bound is closed with 1013 instead of slowing anyone else.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .auth.tokens import User
from .broker.base import Member
from .protocol import SLOW_CONSUMER, Close, text_frame

_ids = itertools.count(1)


class TokenBucket:
    """`rate` tokens a second, up to `burst`; rate 0 disables the limit."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def take(self) -> bool:
        if self._rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


UNLIMITED = TokenBucket(0, 1)


class Connection:
    """State of one WebSocket; only its handler task reads from it, anyone may write."""

    __slots__ = (
        "_backlog_limit",
        "bucket",
        "close",
        "closed",
        "heard",
        "id",
        "member",
        "on_kick",
        "pinged",
        "reader",
        "readonly",
        "rooms",
        "strikes",
        "transport",
        "user",
        "user_bucket",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        user: User,
        *,
        backlog_limit: int,
        rate: float,
        burst: int,
        on_kick: Callable[[Connection], None],
    ) -> None:
        self.id = f"c{next(_ids)}"
        self.ws = ws
        self.transport = transport
        self.user = user
        self.member = Member(user.sub, user.username)
        self.rooms: set[str] = set()
        self.readonly: set[str] | None = None  # joined rooms it may not publish to
        self.bucket = TokenBucket(rate, burst)
        # Shared by all of the user's connections on this worker (ChatService.connect).
        self.user_bucket = UNLIMITED
        self.strikes = 0
        # Liveness for the worker's heartbeat sweep (WsEndpoint.keep_alive): a frame
        # heard since the last ping, and whether a ping is out.
        self.heard = True
        self.pinged = False
        self.closed = False
        self.close: Close | None = None  # why the server closes it, once kicked
        self.on_kick = on_kick
        # The handler task while it waits in receive(), so a kick can wake it.
        self.reader: asyncio.Task[Any] | None = None
        self._backlog_limit = backlog_limit

    def write(self, frame: bytes) -> None:
        """Queue pre-encoded frame bytes; never blocks, never raises."""
        transport = self.transport
        if self.closed or transport.is_closing():
            return
        transport.write(frame)
        if transport.get_write_buffer_size() > self._backlog_limit:
            self.kick(SLOW_CONSUMER)

    def send(self, payload: bytes) -> None:
        """One server frame (a protocol builder's bytes)."""
        self.write(text_frame(payload))

    def kick(self, close: Close) -> None:
        """Stop writing to this client and have its socket closed with `close`."""
        if self.closed:
            return
        self.closed = True
        self.close = close
        self.on_kick(self)

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user.sub}>"
