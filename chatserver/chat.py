"""ChatService: what a connection can do (join, leave, publish, direct, members), tying
the local Hub to the Broker. Knows nothing of HTTP; the /ws handler feeds it commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass

from . import protocol
from .broker.base import Broker, BrokerUnavailable
from .connection import Connection, TokenBucket
from .control import UserControl
from .counters import CounterUnavailable, HitCounter, MemoryHitCounter
from .hub import Hub
from .memberships import MemoryMemberships
from .permissions import Access, Gatekeeper, RoomRules
from .protocol import (
    BAD_REQUEST,
    FLOODING,
    FORBIDDEN,
    LOBBY,
    RATE_LIMITED,
    UNAVAILABLE,
    Direct,
    Join,
    Leave,
    Members,
    ProtocolError,
    Publish,
    message_id_of,
    message_tail,
    parse_client_frame,
    text_frame,
)

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class Limits:
    max_rooms: int = 50
    max_text_chars: int = 4000
    flood_strikes: int = 20  # frames refused in a row by the rate limit before close 1008
    user_rate: float = 0.0  # messages a second for all of one user's connections (0: off)
    user_burst: int = 1
    direct_needs_shared_room: bool = False  # CHAT_DIRECT_MESSAGES=shared-room
    user_rooms_per_hour: int = 0  # rooms a user may open that this worker lacks (0: off)
    rooms_per_hour: int = 0  # the same for the deployment (0: off)


ROOM_WINDOW = 3600  # seconds over which rooms opened are counted


class ChatService:
    """Also the broker's sink (deliver_room, deliver_user)."""

    def __init__(self, hub: Hub, broker: Broker, limits: Limits,
                 gate: Gatekeeper | None = None, hits: HitCounter | None = None) -> None:
        self.hub = hub
        self.broker = broker
        self.limits = limits
        self.gate = gate or Gatekeeper(RoomRules(()), MemoryMemberships())
        self.hits = hits or MemoryHitCounter()  # rooms opened, shared by the deployment
        self._user_buckets: dict[str, TokenBucket] = {}  # sub -> bucket, while connected
        self.control = UserControl(hub, broker, self.gate, self._leave)
        # The broker's sink: room payloads straight to the Hub (the hot path pays no
        # extra call), per-user ones through the control layer.
        self.deliver_room = hub.deliver_room
        self.deliver_user = self.control.deliver_user
        self.sign_out = self.control.sign_out
        self.grant = self.control.grant
        self.revoke = self.control.revoke

    # ------------------------------------------------------------- lifecycle

    async def connect(
        self, conn: Connection, instance: str, since: str | None, epoch: str | None
    ) -> None:
        """Register conn, join the lobby (if the rules let the user read it), greet.
        Raises BrokerUnavailable (conn unregistered)."""
        sub = conn.user.sub
        if self.hub.register(conn):
            self._user_buckets[sub] = TokenBucket(self.limits.user_rate, self.limits.user_burst)
            try:
                await self.broker.subscribe_user(sub)
            except BrokerUnavailable:
                self.hub.unregister(conn)
                del self._user_buckets[sub]
                raise
        conn.user_bucket = self._user_buckets[sub]
        try:
            lobby = await self.gate.access(LOBBY, conn.user)
            greeting = protocol.welcome(conn.user.public(), [LOBBY] if lobby.read else [],
                                        instance)
            if lobby.read:
                await self._join(conn, Join(LOBBY, since, epoch), greeting=greeting,
                                 access=lobby)
            else:
                conn.send(greeting)
        except BrokerUnavailable:
            await self.disconnect(conn)
            raise

    async def disconnect(self, conn: Connection) -> None:
        for room in list(conn.rooms):
            await self._leave(conn, room)
        if self.hub.unregister(conn):
            self._user_buckets.pop(conn.user.sub, None)
            await self._quietly(self.broker.unsubscribe_user(conn.user.sub))

    # -------------------------------------------------------------- commands

    async def handle_text(self, conn: Connection, data: str) -> None:
        """One client frame: rate limit, parse, act; errors become error frames."""
        if not (conn.bucket.take() and conn.user_bucket.take()):
            conn.strikes += 1
            if conn.strikes > self.limits.flood_strikes:
                conn.kick(FLOODING)
            else:
                ref, room = self._about(data)
                conn.send(protocol.error(RATE_LIMITED, "slow down", ref, room))
            return
        conn.strikes = 0
        try:
            command = parse_client_frame(data, max_text_chars=self.limits.max_text_chars)
        except ProtocolError as exc:
            conn.send(protocol.error(exc.code, exc.detail, exc.ref, exc.room))
            return
        try:
            if isinstance(command, Publish):
                self.publish(conn, command)
            elif isinstance(command, Join):
                await self._join(conn, command)
            elif isinstance(command, Leave):
                await self.leave(conn, command)
            elif isinstance(command, Members):
                await self.members(conn, command)
            else:
                await self.direct(conn, command)
        except ProtocolError as exc:
            conn.send(protocol.error(exc.code, exc.detail, command.ref, exc.room))
        except BrokerUnavailable:
            detail = "not done: the message broker is unavailable"
            conn.send(protocol.error(UNAVAILABLE, detail, command.ref, command.room))

    def _about(self, data: str) -> tuple[str | None, str | None]:
        """The ref and room of a frame refused before it was acted on, so the client can
        tell which command the refusal answers (a refusal run ends in a kick, so this
        parse is bounded by CHAT_BURST frames)."""
        try:
            command = parse_client_frame(data, max_text_chars=self.limits.max_text_chars)
        except ProtocolError as exc:
            return exc.ref, exc.room
        return command.ref, command.room

    def publish(self, conn: Connection, command: Publish) -> None:
        """Hand the message to the broker and go on reading; the outcome comes back as
        an ack (with a ref) or an `unavailable` error, never silently."""
        if command.room not in conn.rooms:
            raise ProtocolError(FORBIDDEN, f"join {command.room!r} first", room=command.room)
        if conn.readonly and command.room in conn.readonly:
            raise ProtocolError(FORBIDDEN, "this room is read-only for you", room=command.room)
        user = conn.user
        tail = message_tail(command.room, user.sub, user.username, command.text, _now_ms())
        future = self.broker.publish(command.room, tail)
        ref = command.ref
        if future.done():
            _published(conn, ref, future)
        else:
            future.add_done_callback(lambda done: _published(conn, ref, done))

    async def publish_as_service(self, service: str, room: str, text: str) -> str:
        """The HTTP publish API: a backend service speaks in a room under its own name."""
        tail = message_tail(room, service, service, text, _now_ms())
        return await self.broker.publish(room, tail)

    async def direct(self, conn: Connection, command: Direct) -> None:
        user = conn.user
        if self.limits.direct_needs_shared_room and not await self._share_a_room(conn, command.to):
            raise ProtocolError(FORBIDDEN, "direct messages need a room you share")
        payload = protocol.direct(
            uuid.uuid4().hex, user.sub, user.username, command.to, command.text, _now_ms()
        )
        await self.broker.send_user(command.to, payload)
        if command.to != user.sub:
            await self.broker.send_user(user.sub, payload)  # the sender's other tabs
        if command.ref is not None:
            conn.send(protocol.ack(command.ref, None))

    async def members(self, conn: Connection, command: Members) -> None:
        room = command.room
        if room not in conn.rooms:
            raise ProtocolError(FORBIDDEN, f"join {room!r} first", room=room)
        found = await self.broker.members(room)
        conn.send(protocol.members(room, [m.public() for m in found]))

    async def leave(self, conn: Connection, command: Leave) -> None:
        room = command.room
        if room not in conn.rooms:
            raise ProtocolError(BAD_REQUEST, f"not in {room!r}", room=room)
        await self._leave(conn, room)
        conn.send(protocol.left(room))

    async def _share_a_room(self, conn: Connection, sub: str) -> bool:
        for room in conn.rooms:
            if any(m.sub == sub for m in await self.broker.members(room)):
                return True
        return False

    # --------------------------------------------------------------- joining

    async def _join(self, conn: Connection, join: Join, *, greeting: bytes | None = None,
                    access: Access | None = None) -> None:
        room = join.room
        if room in conn.rooms:
            raise ProtocolError(BAD_REQUEST, f"already in {room!r}", room=room)
        if len(conn.rooms) >= self.limits.max_rooms:
            raise ProtocolError(FORBIDDEN, f"at most {self.limits.max_rooms} rooms", room=room)
        access = access or await self.gate.access(room, conn.user)
        if not access.read:
            # The same answer whether the room exists or not: nothing leaks.
            raise ProtocolError(FORBIDDEN, "not allowed in this room", room=room)
        if room != LOBBY and room not in self.hub.rooms:
            await self._count_room_opened(conn.user.sub, room)
        state, created = self.hub.reserve(room)
        try:
            if created:
                await self._subscribe(room, state.subscribed)
            elif not state.subscribed.done():
                await asyncio.shield(state.subscribed)
            elif state.subscribed.exception() is not None:
                raise BrokerUnavailable("room subscription failed")
            current = await self.broker.epoch(room) if join.since is None else ""
        except BrokerUnavailable:
            self.hub.release(room)
            await self._drop_room_if_empty(room)
            raise
        if conn.closed:
            self.hub.release(room)
            await self._drop_room_if_empty(room)
            return
        if not access.write:
            conn.readonly = (conn.readonly or set()) | {room}
        if join.since is None:
            first = self.hub.add(conn, room)
            frames = text_frame(protocol.joined(room, current))
            if greeting is not None:  # one write for both frames
                frames = text_frame(greeting) + frames
            conn.write(frames)
        else:
            first = self.hub.add(conn, room, replaying=True)
            if greeting is not None:
                conn.send(greeting)
            await self._replay(conn, room, join.since, join.epoch)
        if first:
            self.broker.presence(room, conn.member, True)

    async def _count_room_opened(self, sub: str, room: str) -> None:
        """Rooms are made by joining them, so a join of a room this worker lacks counts
        against the user's and the deployment's hourly allowance: nobody can fill Redis
        with rooms (their state expires with CHAT_ROOM_TTL besides)."""
        for key, allowed in ((f"rooms-opened:{sub}", self.limits.user_rooms_per_hour),
                             ("rooms-opened", self.limits.rooms_per_hour)):
            if not allowed:
                continue
            try:
                opened = await self.hits.hit(key, ROOM_WINDOW)
            except CounterUnavailable as exc:
                raise BrokerUnavailable("room counter unavailable") from exc
            if opened > allowed:
                raise ProtocolError(RATE_LIMITED, "too many new rooms this hour; try an "
                                    "existing one or later", room=room)

    async def _subscribe(self, room: str, subscribed: asyncio.Future[None]) -> None:
        try:
            await self.broker.subscribe_room(room)
        except BrokerUnavailable as exc:
            subscribed.set_exception(exc)
            subscribed.exception()  # joiners waiting on it see it; none may be waiting
            raise
        subscribed.set_result(None)

    async def _replay(self, conn: Connection, room: str, since: str, epoch: str | None) -> None:
        try:
            replay = await self.broker.history(room, since, epoch)
        except BrokerUnavailable:
            await self._leave(conn, room)
            raise
        for frame in replay.frames:
            conn.write(text_frame(frame))
        if replay.frames:
            last: str | None = message_id_of(replay.frames[-1])
        else:
            last = since if replay.epoch == epoch else None
        if room in conn.rooms:
            self.hub.finish_replay(conn, room, last)
        conn.send(protocol.recovered(room, replay.complete, replay.epoch))

    async def _leave(self, conn: Connection, room: str) -> None:
        if conn.readonly:
            conn.readonly = conn.readonly - {room} or None
        last_of_user = self.hub.remove(conn, room)
        await self._drop_room_if_empty(room)
        if last_of_user:
            self.broker.presence(room, conn.member, False)

    async def _drop_room_if_empty(self, room: str) -> None:
        if self.hub.close_room_if_empty(room):
            await self._quietly(self.broker.unsubscribe_room(room))

    async def _quietly(self, coro: Awaitable[None]) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await coro


def _published(conn: Connection, ref: str | None, done: asyncio.Future[str]) -> None:
    if done.exception() is not None:
        conn.send(protocol.error(UNAVAILABLE, "not sent: the message broker is unavailable", ref))
    elif ref is not None:
        conn.send(protocol.ack(ref, done.result()))


def _now_ms() -> int:
    return int(time.time() * 1000)
