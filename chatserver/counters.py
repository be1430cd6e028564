"""Fixed-window hit counters for the sign-in rate limits, shared by every worker.

A small seam of its own, not part of the Broker: one process counts in memory; with
Redis, INCR + EXPIRE on one key per window (no multi-key command: any Redis mode works).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

MAX_MEMORY_KEYS = 100_000  # past this, keys of older windows are dropped


class CounterUnavailable(Exception):
    """The shared store could not count (Redis down)."""


class HitCounter(Protocol):
    async def hit(self, key: str, window: int) -> int:
        """Count one hit on `key` in the current fixed window of `window` seconds and
        return the window's count so far. Raises CounterUnavailable."""
        ...


class MemoryHitCounter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._hits: dict[str, tuple[int, int]] = {}  # key -> (window number, count)

    async def hit(self, key: str, window: int) -> int:
        slot = int(self._clock()) // window
        if len(self._hits) > MAX_MEMORY_KEYS:
            self._hits = {k: v for k, v in self._hits.items() if v[0] == slot}
        start, count = self._hits.get(key, (slot, 0))
        count = count + 1 if start == slot else 1
        self._hits[key] = (slot, count)
        return count


class RedisHitCounter:
    def __init__(
        self, client: aioredis.Redis, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock

    async def hit(self, key: str, window: int) -> int:
        name = f"{self._prefix}hits:{key}:{int(self._clock()) // window}"
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, window * 2)
                count, _ = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            raise CounterUnavailable(f"redis hit failed: {type(exc).__name__}") from None
        return int(count)
