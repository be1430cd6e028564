"""The Broker contract: store-and-broadcast for rooms, per-user channels, and presence.

A broker carries payloads (bytes of JSON, never re-encoded on the way) between the
workers of every instance. Room messages are stored first and get their id from the
store; the broker hands each payload of a subscribed room to its sink exactly once per
worker, in id order, replaying from the store after a reconnect or a new subscription
so that nothing is skipped in between (pub/sub alone is at-most-once).
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Protocol


class BrokerUnavailable(Exception):
    """The broker cannot take the request now (Redis down); the client gets `unavailable`."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored messages of a room after a given id."""

    frames: list[bytes]  # message payloads after `since` (all kept, if the epoch changed)
    # False: the epoch changed, history no longer reaches `since`, or `since` is past the
    # room's last message (then frames are the whole kept history)
    complete: bool
    epoch: str


@dataclass(frozen=True, slots=True)
class Member:
    sub: str
    username: str

    def public(self) -> dict[str, str]:
        return {"sub": self.sub, "username": self.username}


class Sink(Protocol):
    """Where a broker hands what it receives: the worker's Hub."""

    def deliver_room(self, room: str, payload: bytes) -> None: ...

    def deliver_user(self, sub: str, payload: bytes) -> None: ...


class Broker(abc.ABC):
    """One per worker. Subscriptions and presence are counted by the Hub: the broker is
    told of a room's first local member and a user's first local connection, never more."""

    @abc.abstractmethod
    async def start(self, sink: Sink) -> None:
        """Begin handing received payloads to `sink` (nothing is received before)."""

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
        """The last message id this worker has handed to its sink for a subscribed room."""

    @abc.abstractmethod
    async def epoch(self, room: str) -> str:
        """The room's history epoch, made on first use."""

    @abc.abstractmethod
    async def history(self, room: str, since: str, epoch: str | None) -> Replay: ...

    @abc.abstractmethod
    def presence(self, room: str, member: Member, joined: bool) -> None:
        """Record that a member's first connection on this worker joined the room (or its
        last one left). When that makes them present (absent) across all instances, and
        the room had at most the event limit of members with them, a `presence` frame
        (protocol.presence) goes to the room. Best effort, in order with publishes;
        returns at once."""

    @abc.abstractmethod
    def hand_off(self, seconds: float) -> None:
        """The worker is shutting down and its clients will reconnect to other instances:
        members that leave from now on stay present `seconds` longer (then disappear, with
        their leave events, unless they came back), so that a restart is no wave of leaves
        and joins to every room. Only where presence outlives the worker (Redis)."""

    @abc.abstractmethod
    async def members(self, room: str) -> list[Member]: ...
