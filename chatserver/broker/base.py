"""The Broker contract: store-and-broadcast for rooms, per-user channels, and presence.

A broker carries payloads (bytes of JSON, never re-encoded on the way) between the
workers of every instance. Room messages are stored first and get their id from the
store; the broker hands each payload of a subscribed room to `on_room` exactly once per
worker, in id order, replaying from the store after a reconnect or a new subscription
so that nothing is skipped in between (pub/sub alone is at-most-once).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (Redis down); the client gets `unavailable`."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored messages of a room after a given id."""

    frames: list[bytes]  # message payloads after `since` (all kept, if the epoch changed)
    complete: bool  # False: the epoch changed or history no longer reaches `since`
    epoch: str


@dataclass(frozen=True, slots=True)
class Member:
    sub: str
    username: str

    def public(self) -> dict[str, str]:
        return {"sub": self.sub, "username": self.username}


RoomHandler = Callable[[str, bytes], None]  # (room, payload)
UserHandler = Callable[[str, bytes], None]  # (sub, payload)
StateHandler = Callable[[bool], None]  # connected or not


class Broker(abc.ABC):
    """One per worker. Subscriptions are reference counted by the Hub, not here."""

    def __init__(self) -> None:
        self.on_room: RoomHandler = _ignore
        self.on_user: UserHandler = _ignore
        self.on_state: StateHandler = _ignore_state

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @abc.abstractmethod
    def publish(self, room: str, tail: bytes) -> asyncio.Future[str]:
        """Store a message (protocol.message_tail) and broadcast it; resolves to its id.

        Returns at once so a client's next frame is read without waiting on Redis;
        publishes resolve, and reach the store, in the order they were made. Failure:
        the future raises BrokerUnavailable.
        """

    @abc.abstractmethod
    async def publish_event(self, room: str, payload: bytes) -> None:
        """Broadcast a payload to a room without storing it (presence)."""

    @abc.abstractmethod
    async def send_user(self, sub: str, payload: bytes) -> None:
        """Deliver to every connection of one user, on every instance."""

    @abc.abstractmethod
    async def subscribe_room(self, room: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe_room(self, room: str) -> None: ...

    @abc.abstractmethod
    async def subscribe_user(self, sub: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe_user(self, sub: str) -> None: ...

    @abc.abstractmethod
    def position(self, room: str) -> tuple[int, int] | None:
        """The last message id this worker has handed to on_room for a subscribed room."""

    @abc.abstractmethod
    async def epoch(self, room: str) -> str:
        """The room's history epoch, made on first use."""

    @abc.abstractmethod
    async def history(self, room: str, since: str, epoch: str | None) -> Replay: ...

    @abc.abstractmethod
    def presence(self, room: str, member: Member, joined: bool, event: bytes) -> None:
        """Record that a member's first connection here joined the room (or its last one
        left). When that makes them present (or absent) across all instances and the room
        has at most the event limit of members, `event` is broadcast to the room. Best
        effort, in order with publishes; returns at once."""

    @abc.abstractmethod
    async def members(self, room: str) -> list[Member]: ...

    @abc.abstractmethod
    async def hit(self, key: str, window: int) -> int:
        """Count one hit on `key` in the current fixed window of `window` seconds."""


def _ignore(key: str, payload: bytes) -> None:
    return None


def _ignore_state(connected: bool) -> None:
    return None
