"""Presence across every instance: this worker's members per room (a set, never a
count), join/leave with their events, the refresh that keeps its entries alive, the
sweep of dead instances' entries, and the members list."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ... import protocol
from ..base import Member
from .client import REDIS_FAILURES, RedisClient, stop
from .keys import Keys
from .outbox import Outbox
from .scripts import Call, Scripts

log = logging.getLogger(__name__)


class Presence:
    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        scripts: Scripts,
        outbox: Outbox,
        *,
        instance: str,
        ttl: float,
        event_limit: int,
        rooms: Callable[[], Iterable[str]],
        publish_event: Callable[[str, bytes], Awaitable[None]],
    ) -> None:
        self._client = client
        self._keys = keys
        self._scripts = scripts
        self._outbox = outbox
        self._instance = instance
        self._ttl = ttl
        self._event_limit = event_limit
        self._rooms = rooms  # the rooms to sweep: those this worker is subscribed to
        self._publish_event = publish_event
        self._here: dict[str, set[Member]] = {}  # room -> members on this worker
        self._kept_until = 0.0  # shutting down: leaving members stay present until then
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="redis-presence")

    def hand_off(self, seconds: float) -> None:
        """Shutting down: members that leave from now on stay present `seconds` more."""
        if seconds > 0:
            self._kept_until = time.time() + seconds

    async def close(self) -> None:
        """On a clean shutdown this worker's members leave at once (events included), or
        are kept for the hand-off; the caller then drains the outbox."""
        for room, here in list(self._here.items()):
            for member in list(here):
                self.change(room, member, False)
        await stop(self._task)

    def _entry(self, member: Member) -> str:
        username = member.username.replace("\t", " ")
        return f"{member.sub}\t{self._instance}\t{username}"

    def _script_keys(self, room: str) -> list[str]:
        return [self._keys.presence(room), self._keys.present(room)]

    def change(self, room: str, member: Member, joined: bool) -> None:
        """A member's first local connection joined (or last one left); queued in order
        with publishes."""
        if joined:
            self._here.setdefault(room, set()).add(member)
            event = protocol.presence(room, "join", member.public())
            args: list[Any] = [self._entry(member), time.time() + self._ttl, member.sub,
                               self._expire_seconds(), self._event_limit, event,
                               self._keys.room_channel(room)]
            script = self._scripts.presence_join
        else:
            here = self._here.get(room, set())
            here.discard(member)
            if not here:
                self._here.pop(room, None)
            if self._kept_until:  # no longer refreshed here: swept once the hand-off ends
                keep = [self._entry(member), self._kept_until]
                self._outbox.put(Call(self._scripts.presence_keep, [self._keys.presence(room)],
                                      keep))
                return
            event = protocol.presence(room, "leave", member.public())
            args = [self._entry(member), member.sub, self._event_limit, event,
                    self._keys.room_channel(room)]
            script = self._scripts.presence_leave
        self._outbox.put(Call(script, self._script_keys(room), args))

    def members(self, room: str) -> asyncio.Future[list[Member]]:
        """Everyone present in the room on any instance, sorted by username; read through
        the outbox, so it reflects every change made before."""
        found: asyncio.Future[list[Member]] = asyncio.get_running_loop().create_future()
        call = Call(self._scripts.members, [self._keys.presence(room)], [time.time()])
        self._outbox.put(call, found, _members)
        return found

    def _expire_seconds(self) -> int:
        """Keys outlive their entries' TTL, so a quiet room's keys still go away."""
        return int(self._ttl * 4)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self._refresh_once()
            except REDIS_FAILURES as exc:
                log.debug("presence refresh failed: %s", type(exc).__name__)

    async def _refresh_once(self) -> None:
        """Keep this worker's members alive and sweep those of dead instances."""
        now = time.time()
        async with self._client.pipeline(transaction=False) as pipe:
            for room, here in self._here.items():
                key = self._keys.presence(room)
                pipe.zadd(key, {self._entry(m): now + self._ttl for m in here}, xx=True)
                pipe.expire(key, self._expire_seconds())
            await pipe.execute()
        for room in list(self._rooms()):
            keys = [self._keys.presence(room), self._keys.present(room)]
            gone = await self._scripts.presence_sweep(keys=keys, args=[now, self._event_limit])
            for member in _members(gone):
                event = protocol.presence(room, "leave", member.public())
                await self._publish_event(room, event)


def _members(entries: list[bytes]) -> list[Member]:
    """Members of "sub\\tinstance\\tusername" entries, one per sub, sorted by username."""
    seen: dict[str, Member] = {}
    for item in entries:
        sub, _, rest = item.decode().partition("\t")
        seen.setdefault(sub, Member(sub, rest.partition("\t")[2]))
    return sorted(seen.values(), key=lambda m: m.username)
