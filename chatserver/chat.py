"""ChatService: what a connection can do (join, leave, publish, direct, members), tying
the local Hub to the Broker. Knows nothing of HTTP; the /ws handler feeds it commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .broker.base import Broker, BrokerUnavailable, Member
from .connection import Connection
from .hub import SIGNOUT, Hub
from .protocol import (
    BAD_REQUEST,
    CLOSE_POLICY,
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
    encode,
    error_event,
    message_id_of,
    message_tail,
    parse_client_frame,
    presence_event,
    text_frame,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_rooms: int = 50
    max_text_chars: int = 4000
    flood_strikes: int = 20  # frames refused in a row by the rate limit before close 1008


class ChatService:
    def __init__(self, hub: Hub, broker: Broker, limits: Limits) -> None:
        self.hub = hub
        self.broker = broker
        self.limits = limits

    # ------------------------------------------------------------- lifecycle

    async def connect(
        self, conn: Connection, greeting: dict[str, Any], since: str | None, epoch: str | None
    ) -> None:
        """Register conn, join the lobby, greet. Raises BrokerUnavailable (conn unregistered)."""
        if self.hub.register(conn):
            try:
                await self.broker.subscribe_user(conn.user.sub)
            except BrokerUnavailable:
                self.hub.unregister(conn)
                raise
        try:
            await self._join(conn, LOBBY, since, epoch, greeting=greeting)
        except BrokerUnavailable:
            await self.disconnect(conn)
            raise

    async def disconnect(self, conn: Connection) -> None:
        for room in list(conn.rooms):
            await self._leave(conn, room)
        if self.hub.unregister(conn):
            await self._quietly(self.broker.unsubscribe_user(conn.user.sub))

    # -------------------------------------------------------------- commands

    async def handle_text(self, conn: Connection, data: str) -> None:
        """One client frame: rate limit, parse, act; errors become error frames."""
        if not conn.bucket.take():
            conn.strikes += 1
            if conn.strikes > self.limits.flood_strikes:
                conn.kick(CLOSE_POLICY, "rate limit exceeded")
            else:
                conn.send(error_event(RATE_LIMITED, "slow down"))
            return
        conn.strikes = 0
        try:
            command = parse_client_frame(data, max_text_chars=self.limits.max_text_chars)
            if isinstance(command, Publish):
                self.publish(conn, command)
            elif isinstance(command, Join):
                await self._join(conn, command.room, command.since, command.epoch)
            elif isinstance(command, Leave):
                await self.leave(conn, command.room)
            elif isinstance(command, Members):
                await self.members(conn, command.room)
            else:
                await self.direct(conn, command)
        except ProtocolError as exc:
            conn.send(error_event(exc.code, exc.detail, exc.ref, exc.room))
        except BrokerUnavailable:
            ref, room = getattr(command, "ref", None), getattr(command, "room", None)
            detail = "not done: the message broker is unavailable"
            conn.send(error_event(UNAVAILABLE, detail, ref, room))

    def publish(self, conn: Connection, command: Publish) -> None:
        """Hand the message to the broker and go on reading; the outcome comes back as
        an ack (with a ref) or an `unavailable` error, never silently."""
        if command.room not in conn.rooms:
            raise ProtocolError(
                FORBIDDEN, f"join {command.room!r} first", command.ref, room=command.room
            )
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
        payload = encode(
            {
                "type": "direct",
                "id": uuid.uuid4().hex,
                "from": user.sub,
                "user": user.sub,
                "username": user.username,
                "to": command.to,
                "message": command.text,
                "ts": _now_ms(),
            }
        )
        await self.broker.send_user(command.to, payload)
        if command.to != user.sub:
            await self.broker.send_user(user.sub, payload)  # the sender's other tabs
        if command.ref is not None:
            conn.send({"type": "ack", "ref": command.ref, "id": None})

    async def members(self, conn: Connection, room: str) -> None:
        if room not in conn.rooms:
            raise ProtocolError(FORBIDDEN, f"join {room!r} first", room=room)
        found = await self.broker.members(room)
        conn.send({"type": "members", "room": room, "members": [m.public() for m in found]})

    async def leave(self, conn: Connection, room: str) -> None:
        if room not in conn.rooms:
            raise ProtocolError(BAD_REQUEST, f"not in {room!r}", room=room)
        await self._leave(conn, room)
        conn.send({"type": "left", "room": room})

    async def sign_out(self, sub: str) -> None:
        """Close every socket of this user on every worker and replica."""
        await self.broker.send_user(sub, SIGNOUT)

    # --------------------------------------------------------------- joining

    async def _join(
        self,
        conn: Connection,
        room: str,
        since: str | None,
        epoch: str | None,
        *,
        greeting: dict[str, Any] | None = None,
    ) -> None:
        if room in conn.rooms:
            raise ProtocolError(BAD_REQUEST, f"already in {room!r}", room=room)
        if len(conn.rooms) >= self.limits.max_rooms:
            raise ProtocolError(FORBIDDEN, f"at most {self.limits.max_rooms} rooms", room=room)
        state, created = self.hub.reserve(room)
        try:
            if created:
                await self._subscribe(room, state.subscribed)
            elif not state.subscribed.done():
                await asyncio.shield(state.subscribed)
            elif state.subscribed.exception() is not None:
                raise BrokerUnavailable("room subscription failed")
            current = await self.broker.epoch(room) if since is None else ""
        except BrokerUnavailable:
            self.hub.release(room)
            await self._drop_room_if_empty(room)
            raise
        if conn.closed:
            self.hub.release(room)
            await self._drop_room_if_empty(room)
            return
        if since is None:
            first = self.hub.add(conn, room)
            joined = text_frame(encode({"type": "joined", "room": room, "epoch": current}))
            if greeting is not None:  # one write for both frames
                joined = text_frame(encode(greeting)) + joined
            conn.write(joined)
        else:
            first = self.hub.add(conn, room, replaying=True)
            if greeting is not None:
                conn.send(greeting)
            await self._replay(conn, room, since, epoch)
        if first:
            self._presence(room, conn.member, True)

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
        conn.send(
            {"type": "recovered", "room": room, "complete": replay.complete, "epoch": replay.epoch}
        )

    async def _leave(self, conn: Connection, room: str) -> None:
        last_of_user = self.hub.remove(conn, room)
        await self._drop_room_if_empty(room)
        if last_of_user:
            self._presence(room, conn.member, False)

    async def _drop_room_if_empty(self, room: str) -> None:
        if self.hub.close_room_if_empty(room):
            await self._quietly(self.broker.unsubscribe_room(room))

    def _presence(self, room: str, member: Member, joined: bool) -> None:
        """Best effort: the broker records it in order with publishes, and says so
        to the room when the user became present (absent) across every instance."""
        event = presence_event(room, "join" if joined else "leave", member.public())
        self.broker.presence(room, member, joined, encode(event))

    async def _quietly(self, coro: Any) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await coro


def _published(conn: Connection, ref: str | None, done: asyncio.Future[str]) -> None:
    error = done.exception()
    if error is not None:
        conn.send(error_event(UNAVAILABLE, "not sent: the message broker is unavailable", ref))
    elif ref is not None:
        conn.send({"type": "ack", "ref": ref, "id": done.result()})


def _now_ms() -> int:
    return int(time.time() * 1000)
