"""Revoked tokens, shared by every worker and replica: token ids (`jti`) denylisted until
their `exp`, and per-user "not before" times (sign-out everywhere) checked against `iat`.

Every worker holds the whole list in memory (Mirror), so checking a token costs two dict
lookups and no Redis call: sign-outs are rare, connects are not, and a per-connect Redis
lookup would put Redis on the hot path of every reconnect storm. With Redis, a
revocation goes to two sorted sets and is published on one channel every worker listens
to; a worker loads the sets after each (re)subscribe, so one that was disconnected, or
restarted, catches up on what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from ..broker.redis.client import REDIS_FAILURES, RedisClient, pubsub_client, stop
from .tokens import User

log = logging.getLogger(__name__)

KEEP_NOT_BEFORE = 8 * 24 * 3600  # seconds: longer than any token accepted (dev refresh: 7 d)
PRUNE_EVERY = 1024  # entries added between sweeps of expired ones (then doubling with size)
START_WAIT = 5.0  # seconds start() waits for the first load before serving anyway
PING_EVERY = 15.0  # seconds of a quiet channel before the listener pings Redis
RETRY_FOR = 600.0  # seconds a revocation is retried while Redis is down
JTI, NOT_BEFORE = b"j", b"n"  # the broadcast's kinds: b"j <exp> <jti>", b"n <at> <sub>"


def encode(kind: bytes, key: str, when: float) -> bytes:
    return kind + b" " + repr(float(when)).encode() + b" " + key.encode()


class Mirror:
    """The worker's copy of the denylist. Entries leave only by expiring, so merging a
    load from Redis never forgets a revocation made here that Redis has not taken yet."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._jtis: dict[str, float] = {}  # jti -> exp
        self._not_before: dict[str, float] = {}  # sub -> tokens issued at or before it fail
        self._prune_at = PRUNE_EVERY

    def refuses(self, user: User) -> bool:
        if user.jti and user.jti in self._jtis:
            return True
        before = self._not_before.get(user.sub)
        return before is not None and user.iat <= before

    def __len__(self) -> int:
        return len(self._jtis) + len(self._not_before)

    def add(self, kind: bytes, key: str, when: float) -> None:
        table = self._jtis if kind == JTI else self._not_before
        table[key] = max(when, table.get(key, when))
        if len(self) > self._prune_at:
            self.prune()

    def apply(self, payload: bytes) -> None:
        """One broadcast; a malformed one is logged and dropped."""
        kind, _, rest = payload.partition(b" ")
        when, _, key = rest.partition(b" ")
        try:
            if kind not in (JTI, NOT_BEFORE) or not key:
                raise ValueError("unknown kind or no key")
            self.add(kind, key.decode(), float(when))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("denylist broadcast dropped: %s", exc)

    def prune(self) -> None:
        now = self._clock()
        self._jtis = {k: exp for k, exp in self._jtis.items() if exp > now}
        oldest = now - KEEP_NOT_BEFORE
        self._not_before = {k: at for k, at in self._not_before.items() if at > oldest}
        self._prune_at = max(PRUNE_EVERY, 2 * len(self))


class Denylist(Protocol):
    """`refuses` is synchronous and local; the rest reach every worker and replica."""

    def refuses(self, user: User) -> bool: ...

    async def revoke(self, jti: str, exp: float) -> None:
        """Refuse the token with this id until `exp`."""
        ...

    async def revoke_before(self, sub: str, at: float) -> None:
        """Refuse the user's tokens issued at or before `at`."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class MemoryDenylist:
    """One process (the embedded default): the mirror is the whole list."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.mirror = Mirror(clock)
        self.refuses = self.mirror.refuses  # bound once: the verifier calls it per token

    async def revoke(self, jti: str, exp: float) -> None:
        self.mirror.add(JTI, jti, exp)

    async def revoke_before(self, sub: str, at: float) -> None:
        self.mirror.add(NOT_BEFORE, sub, at)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisDenylist:
    """Sorted sets `<prefix>revoked-jti` (score: exp) and `<prefix>not-before` (score:
    the time), and the channel `<prefix>revocations`. One listener task per worker."""

    def __init__(self, store: RedisClient, url: str, prefix: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.mirror = Mirror(clock)
        self.refuses = self.mirror.refuses
        self._store = store
        self._url = url
        self._clock = clock
        self._keys = {JTI: f"{prefix}revoked-jti", NOT_BEFORE: f"{prefix}not-before"}
        self._channel = f"{prefix}revocations"
        self._loaded = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()

    async def revoke(self, jti: str, exp: float) -> None:
        await self._revoke(JTI, jti, exp)

    async def revoke_before(self, sub: str, at: float) -> None:
        await self._revoke(NOT_BEFORE, sub, at)

    async def _revoke(self, kind: bytes, key: str, when: float) -> None:
        """Refused here at once; stored and broadcast, or retried in the background while
        Redis is down (the sign-out itself never fails on it)."""
        self.mirror.add(kind, key, when)
        try:
            await self._store_and_publish(kind, key, when)
        except REDIS_FAILURES as exc:
            log.warning("revocation not shared yet (%s); retrying", type(exc).__name__)
            task = asyncio.create_task(self._retry(kind, key, when), name="denylist-retry")
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _store_and_publish(self, kind: bytes, key: str, when: float) -> None:
        now = self._clock()
        stale = now if kind == JTI else now - KEEP_NOT_BEFORE
        async with self._store.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys[kind], {key: when}, gt=True)
            pipe.zremrangebyscore(self._keys[kind], "-inf", stale)
            await pipe.execute()
        # Not in the pipeline: a cluster's refuses PUBLISH (it has no key to route by).
        await self._store.publish(self._channel, encode(kind, key, when))

    async def _retry(self, kind: bytes, key: str, when: float) -> None:
        deadline, pause = time.monotonic() + RETRY_FOR, 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            try:
                await self._store_and_publish(kind, key, when)
                log.info("revocation shared after Redis came back")
                return
            except REDIS_FAILURES:
                pause = min(pause * 2, 5.0)
        log.error("a revocation never reached Redis in %.0f s: other workers accept the "
                  "token until it expires", RETRY_FOR)

    async def start(self) -> None:
        """Start listening, and wait (bounded) for the first load, so a restarted worker
        refuses what was revoked before it started from its first connection on."""
        self._listener = asyncio.create_task(self._listen(), name="denylist-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), START_WAIT)
        if not self._loaded.is_set():
            log.warning("denylist not loaded from Redis in %.0f s; serving, loading on", START_WAIT)

    async def _listen(self) -> None:
        """Subscribe, then load (so nothing published in between is missed), then apply
        broadcasts until the connection drops; then again, with backoff."""
        pause = 0.1
        while True:
            client = pubsub_client(self._url)  # anew each time: on a cluster, another node
            try:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self._channel)
                    await self._load()
                    self._loaded.set()
                    pause = 0.1
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=PING_EVERY)
                        if message is None:
                            await pubsub.ping()  # a quiet channel: is the connection alive?
                        elif message.get("type") == "message":
                            self.mirror.apply(message["data"])
                except REDIS_FAILURES as exc:
                    log.warning("denylist listener lost Redis (%s); reloading in %.1f s",
                                type(exc).__name__, pause)
                finally:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def _load(self) -> None:
        now = self._clock()
        floors = {JTI: now, NOT_BEFORE: now - KEEP_NOT_BEFORE}
        for kind, key in self._keys.items():
            entries: Any = await self._store.zrangebyscore(key, floors[kind], "+inf",
                                                           withscores=True)
            for member, score in entries:
                self.mirror.add(kind, member.decode(), float(score))
        log.info("denylist loaded: %d entries", len(self.mirror))

    async def close(self) -> None:
        await stop(self._listener)
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
