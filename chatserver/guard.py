"""What a connection may cost before its first request head: a deadline for the complete
head, and a cap on such half-open connections per client address (slowloris, idle
floods). aiohttp bounds the head's size but not the time to send it.

The guard wraps aiohttp's protocol only until the head is in; then it hands the
transport back (transport.set_protocol), so a served request, and every idle WebSocket,
pays nothing for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable
from typing import cast

from prometheus_client import Counter, Gauge

HEAD_END = b"\r\n\r\n"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HeadGuard:
    """A protocol factory for loop.create_server, around aiohttp's (runner.server)."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        *,
        timeout: float,
        per_ip: int,
        exempt: Iterable[Network] = (),
        half_open: Gauge | None = None,
        dropped: Counter | None = None,
    ) -> None:
        self._factory = factory
        self.timeout = timeout
        self.per_ip = per_ip
        self._exempt = tuple(exempt)  # trusted proxies: they forward complete heads
        self._half_open = half_open
        self._dropped = dropped
        self.waiting: dict[str, int] = {}  # client address -> connections with no head yet

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self._factory())

    def admit(self, ip: str) -> bool:
        count = self.waiting.get(ip, 0)
        if count >= self.per_ip and not self._is_exempt(ip):
            self._drop("per_ip_cap")
            return False
        self.waiting[ip] = count + 1
        if self._half_open is not None:
            self._half_open.inc()
        return True

    def release(self, ip: str) -> None:
        count = self.waiting.get(ip, 0) - 1
        if count > 0:
            self.waiting[ip] = count
        else:
            self.waiting.pop(ip, None)
        if self._half_open is not None:
            self._half_open.dec()

    def _drop(self, reason: str) -> None:
        if self._dropped is not None:
            self._dropped.labels(reason).inc()

    def _is_exempt(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._exempt)


class _Guarded(asyncio.Protocol):
    __slots__ = ("_admitted", "_guard", "_inner", "_ip", "_tail", "_timer", "_transport")

    def __init__(self, guard: HeadGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._admitted = False
        self._ip: str | None = None  # set while counted as half-open
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are one in kind.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        if not self._guard.admit(ip):
            self._transport.abort()  # the inner protocol never sees it
            return
        self._ip, self._admitted = ip, True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.timeout, self._expire)
        self._inner.connection_made(self._transport)

    def data_received(self, data: bytes) -> None:
        if HEAD_END in self._tail + data[:4] or HEAD_END in data:
            self._headed()
        else:
            self._tail = data[-3:]
        self._inner.data_received(data)

    def _headed(self) -> None:
        self._stop_counting()
        assert self._transport is not None
        self._transport.set_protocol(self._inner)  # from now on aiohttp's alone

    def _expire(self) -> None:
        self._timer = None
        if self._ip is not None and self._transport is not None:
            self._guard._drop("head_timeout")
            self._transport.abort()

    def _stop_counting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ip is not None:
            self._guard.release(self._ip)
            self._ip = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_counting()
        if self._admitted:  # aiohttp saw connection_made, so it must see this too
            self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

