"""Granted room memberships (the `members` audience of the room rules), shared by every
worker and replica: in memory for the embedded default, else two Redis hashes per grant
(room -> sub -> role, and sub -> room -> role), so both directions are one lookup.
"""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio.cluster import RedisCluster

from .broker.base import BrokerUnavailable
from .broker.redis.client import REDIS_FAILURES, RedisClient

ROLES = ("read", "write")
MAX_PAGE = 500


class MembershipsUnavailable(BrokerUnavailable):
    """The store cannot answer (Redis down): callers answer `unavailable`, never guess."""


Page = tuple[list[tuple[str, str]], str | None]  # [(sub, role)], the next page's `after`


class Memberships(Protocol):
    async def role(self, room: str, sub: str) -> str | None: ...

    async def grant(self, room: str, sub: str, role: str) -> None: ...

    async def revoke(self, room: str, sub: str) -> bool:
        """True when there was a grant to remove."""
        ...

    async def members(self, room: str, after: str | None, limit: int) -> Page:
        """Grants of a room by sub, after `after`, at most `limit`."""
        ...

    async def rooms_of(self, sub: str) -> list[tuple[str, str]]: ...


def _page(grants: dict[str, str], after: str | None, limit: int) -> Page:
    subs = sorted(s for s in grants if after is None or s > after)
    page = subs[:limit]
    more = len(subs) > limit
    return [(s, grants[s]) for s in page], (page[-1] if more and page else None)


class MemoryMemberships:
    def __init__(self) -> None:
        self._rooms: dict[str, dict[str, str]] = {}
        self._users: dict[str, dict[str, str]] = {}

    async def role(self, room: str, sub: str) -> str | None:
        return self._rooms.get(room, {}).get(sub)

    async def grant(self, room: str, sub: str, role: str) -> None:
        self._rooms.setdefault(room, {})[sub] = role
        self._users.setdefault(sub, {})[room] = role

    async def revoke(self, room: str, sub: str) -> bool:
        found = self._rooms.get(room, {}).pop(sub, None) is not None
        self._users.get(sub, {}).pop(room, None)
        for index, key in ((self._rooms, room), (self._users, sub)):
            if not index.get(key):
                index.pop(key, None)
        return found

    async def members(self, room: str, after: str | None, limit: int) -> Page:
        return _page(self._rooms.get(room, {}), after, limit)

    async def rooms_of(self, sub: str) -> list[tuple[str, str]]:
        return sorted(self._users.get(sub, {}).items())


class RedisMemberships:
    def __init__(self, client: RedisClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        # A room's grants and a user's index live in two slots on a cluster, where MULTI
        # cannot span them: there the room's hash (which decides) is written first.
        self._atomic = not isinstance(client, RedisCluster)

    def _room_key(self, room: str) -> str:
        return f"{self._prefix}grants:{room}"

    def _user_key(self, sub: str) -> str:
        return f"{self._prefix}user-grants:{sub}"

    async def role(self, room: str, sub: str) -> str | None:
        value = await self._call(self._client.hget(self._room_key(room), sub))
        return value.decode() if value else None

    async def grant(self, room: str, sub: str, role: str) -> None:
        async with self._client.pipeline(transaction=self._atomic) as pipe:
            pipe.hset(self._room_key(room), sub, role)
            pipe.hset(self._user_key(sub), room, role)
            await self._call(pipe.execute())

    async def revoke(self, room: str, sub: str) -> bool:
        async with self._client.pipeline(transaction=self._atomic) as pipe:
            pipe.hdel(self._room_key(room), sub)
            pipe.hdel(self._user_key(sub), room)
            removed, _ = await self._call(pipe.execute())
        return bool(removed)

    async def members(self, room: str, after: str | None, limit: int) -> Page:
        # A room's grants are read whole and paged here: fine up to tens of thousands of
        # members a room (a sorted set would page in Redis past that).
        raw = await self._call(self._client.hgetall(self._room_key(room)))
        return _page({k.decode(): v.decode() for k, v in raw.items()}, after, limit)

    async def rooms_of(self, sub: str) -> list[tuple[str, str]]:
        raw = await self._call(self._client.hgetall(self._user_key(sub)))
        return sorted((k.decode(), v.decode()) for k, v in raw.items())

    async def _call(self, awaitable: Any) -> Any:  # redis-py types its replies loosely
        try:
            return await awaitable
        except REDIS_FAILURES as exc:
            raise MembershipsUnavailable(f"redis memberships: {type(exc).__name__}") from None
