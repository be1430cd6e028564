"""Fixed-window hit counters for the sign-in rate limits, shared by every worker.

A small seam of its own, not part of the Broker: one process counts in memory; with
Redis, INCR + EXPIRE on one key per window (no multi-key command: any Redis mode works).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from .broker.redis.client import REDIS_FAILURES, RedisClient

MAX_MEMORY_KEYS = 100_000  # past this, keys of older windows are dropped


class CounterUnavailable(Exception):
    """The shared store could not count (Redis down)."""


class HitCounter(Protocol):
    """Every method raises CounterUnavailable when the shared store cannot answer."""

    async def hit(self, key: str, window: int) -> int:
        """Count one hit on `key` in the current fixed window of `window` seconds and
        return the window's count so far."""
        ...

    async def clear(self, key: str, window: int) -> None:
        """Forget the current window's hits on `key`."""
        ...

    async def hold(self, key: str, seconds: float) -> None:
        """Mark `key` for `seconds` (a wait imposed on it)."""
        ...

    async def held(self, key: str) -> float:
        """Seconds left of the mark on `key`; 0 when there is none."""
        ...


class MemoryHitCounter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._hits: dict[str, tuple[int, int]] = {}  # key -> (window number, count)
        self._holds: dict[str, float] = {}  # key -> until

    async def hit(self, key: str, window: int) -> int:
        slot = int(self._clock()) // window
        if len(self._hits) > MAX_MEMORY_KEYS:
            self._hits = {k: v for k, v in self._hits.items() if v[0] == slot}
        start, count = self._hits.get(key, (slot, 0))
        count = count + 1 if start == slot else 1
        self._hits[key] = (slot, count)
        return count

    async def clear(self, key: str, window: int) -> None:
        self._hits.pop(key, None)

    async def hold(self, key: str, seconds: float) -> None:
        now = self._clock()
        if len(self._holds) > MAX_MEMORY_KEYS:
            self._holds = {k: until for k, until in self._holds.items() if until > now}
        self._holds[key] = now + seconds

    async def held(self, key: str) -> float:
        return max(0.0, self._holds.get(key, 0.0) - self._clock())


class RedisHitCounter:
    def __init__(
        self, client: RedisClient, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock

    def _window_key(self, key: str, window: int) -> str:
        return f"{self._prefix}hits:{key}:{int(self._clock()) // window}"

    async def hit(self, key: str, window: int) -> int:
        name = self._window_key(key, window)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.incr(name)
            pipe.expire(name, window * 2)
            count, _ = await self._call(pipe.execute())
        return int(count)

    async def clear(self, key: str, window: int) -> None:
        await self._call(self._client.delete(self._window_key(key, window)))

    async def hold(self, key: str, seconds: float) -> None:
        millis = max(1, int(seconds * 1000))
        await self._call(self._client.set(f"{self._prefix}hold:{key}", 1, px=millis))

    async def held(self, key: str) -> float:
        left = await self._call(self._client.pttl(f"{self._prefix}hold:{key}"))
        return max(0, int(left)) / 1000

    async def _call(self, awaitable: Any) -> Any:  # redis-py types its replies loosely
        try:
            return await awaitable
        except REDIS_FAILURES as exc:
            raise CounterUnavailable(f"redis counter: {type(exc).__name__}") from None
