"""Pending sign-in challenges, kept on the server so Cognito's Session never reaches the
browser: the browser holds only an opaque id (an HttpOnly cookie scoped to /auth). Each
id is single use (taken atomically: GETDEL in Redis) and lives as long as Cognito's
session (3 minutes). In memory for one process, else in Redis, shared by every worker.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..broker.redis.client import REDIS_FAILURES, RedisClient

MAX_MEMORY_PENDING = 100_000  # past this, the oldest pending challenges are dropped


class ChallengeStoreUnavailable(Exception):
    """The store cannot answer (Redis down)."""


@dataclass(frozen=True)
class Pending:
    """One challenge waiting for its answer."""

    challenge: str
    session: str = field(repr=False)  # Cognito's: never logged, never sent to the browser
    username: str  # Cognito's name for the user (USER_ID_FOR_SRP): USERNAME and SECRET_HASH
    typed: str  # what the user typed at sign-in: the per-username rate limit's key
    deadline: float  # unix time Cognito's session ends
    required: tuple[str, ...] = ()  # NEW_PASSWORD_REQUIRED: attributes Cognito asks for

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Pending:
        raw = json.loads(text)
        return Pending(**{**raw, "required": tuple(raw.get("required", ()))})


class ChallengeStore(Protocol):
    async def put(self, pending: Pending) -> str:
        """Keep `pending` until its deadline; returns the new opaque id."""
        ...

    async def take(self, pending_id: str) -> Pending | None:
        """The pending challenge, removed (single use); None when unknown or expired."""
        ...


def new_id() -> str:
    return secrets.token_urlsafe(32)


class MemoryChallengeStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, Pending] = {}

    async def put(self, pending: Pending) -> str:
        now = self._clock()
        if len(self._pending) >= MAX_MEMORY_PENDING:
            self._pending = {k: p for k, p in self._pending.items() if p.deadline > now}
            while len(self._pending) >= MAX_MEMORY_PENDING:
                del self._pending[next(iter(self._pending))]
        pending_id = new_id()
        self._pending[pending_id] = pending
        return pending_id

    async def take(self, pending_id: str) -> Pending | None:
        pending = self._pending.pop(pending_id, None)
        if pending is None or pending.deadline <= self._clock():
            return None
        return pending


class RedisChallengeStore:
    def __init__(self, client: RedisClient, prefix: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock

    async def put(self, pending: Pending) -> str:
        pending_id = new_id()
        millis = int((pending.deadline - self._clock()) * 1000)
        if millis > 0:
            await self._call(self._client.set(f"{self._prefix}challenge:{pending_id}",
                                              pending.to_json(), px=millis))
        return pending_id

    async def take(self, pending_id: str) -> Pending | None:
        raw = await self._call(self._client.getdel(f"{self._prefix}challenge:{pending_id}"))
        if raw is None:
            return None
        try:
            pending = Pending.from_json(raw)
        except (ValueError, TypeError):
            return None
        return pending if pending.deadline > self._clock() else None

    async def _call(self, awaitable: Any) -> Any:  # redis-py types its replies loosely
        try:
            return await awaitable
        except REDIS_FAILURES as exc:
            raise ChallengeStoreUnavailable(f"redis challenges: {type(exc).__name__}") from None
