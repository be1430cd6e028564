"""In-process broker: one worker, no Redis. Same semantics as RedisBroker (ids, epochs,
bounded history, presence, room expiry), so the embedded default behaves like production.

Rooms must not pile up in memory: a room nobody is in that holds no message is dropped
when its last member leaves (nothing is lost: a new epoch of an empty room replays the
same nothing), and one with history once it has not been used for the room TTL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque

from .. import protocol
from ..protocol import message_frame, parse_id
from .base import Broker, Member, Replay, Sink

SWEEP_EVERY = 60.0  # seconds between looks for expired rooms


class _Stream:
    def __init__(self, maxlen: int) -> None:
        self.entries: deque[tuple[tuple[int, int], bytes]] = deque()
        self.maxlen = maxlen
        self.last = (0, 0)
        self.max_deleted = (0, 0)
        self.epoch = uuid.uuid4().hex
        self.used = time.monotonic()

    def add(self, tail: bytes) -> str:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self.last
        self.last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        message_id = f"{self.last[0]}-{self.last[1]}"
        frame = message_frame(message_id, tail)
        self.entries.append((self.last, frame))
        while len(self.entries) > self.maxlen:
            self.max_deleted = self.entries.popleft()[0]
        return message_id


class MemoryBroker(Broker):
    def __init__(self, *, history_maxlen: int = 1000, presence_event_limit: int = 100,
                 room_ttl: float = 0) -> None:
        self._maxlen = history_maxlen
        self._room_ttl = room_ttl  # seconds; 0: rooms with history are kept
        self._next_sweep = time.monotonic() + min(room_ttl, SWEEP_EVERY)
        self._event_limit = presence_event_limit
        self._streams: dict[str, _Stream] = {}
        self._rooms: set[str] = set()
        self._users: set[str] = set()
        self._presence: dict[str, set[Member]] = {}
        self._sink: Sink | None = None

    async def start(self, sink: Sink) -> None:
        self._sink = sink

    async def close(self) -> None:
        return None

    @property
    def connected(self) -> bool:
        return True

    def _stream(self, room: str) -> _Stream:
        stream = self._streams.get(room)
        if stream is None:
            self._sweep()
            stream = self._streams[room] = _Stream(self._maxlen)
        stream.used = time.monotonic()
        return stream

    def _sweep(self) -> None:
        """Drop rooms unused for the TTL that nobody is in; at most once a SWEEP_EVERY,
        when a room is made, so its cost is spread over the rooms that caused it."""
        now = time.monotonic()
        if not self._room_ttl or now < self._next_sweep:
            return
        self._next_sweep = now + min(self._room_ttl, SWEEP_EVERY)
        idle = [room for room, stream in self._streams.items()
                if room not in self._rooms and now - stream.used >= self._room_ttl]
        for room in idle:
            del self._streams[room]

    def publish(self, room: str, tail: bytes) -> asyncio.Future[str]:
        stream = self._stream(room)
        message_id = stream.add(tail)
        self._to_room(room, stream.entries[-1][1])
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.set_result(message_id)
        return done

    def _to_room(self, room: str, payload: bytes) -> None:
        if room in self._rooms and self._sink is not None:
            self._sink.deliver_room(room, payload)

    async def publish_event(self, room: str, payload: bytes) -> None:
        self._to_room(room, payload)

    async def send_user(self, sub: str, payload: bytes) -> None:
        if sub in self._users and self._sink is not None:
            self._sink.deliver_user(sub, payload)

    async def subscribe_room(self, room: str) -> None:
        self._rooms.add(room)

    async def unsubscribe_room(self, room: str) -> None:
        self._rooms.discard(room)
        stream = self._streams.get(room)
        if stream is not None and not stream.entries and not stream.max_deleted > (0, 0):
            del self._streams[room]

    async def subscribe_user(self, sub: str) -> None:
        self._users.add(sub)

    async def unsubscribe_user(self, sub: str) -> None:
        self._users.discard(sub)

    def position(self, room: str) -> tuple[int, int] | None:
        if room not in self._rooms:
            return None
        stream = self._streams.get(room)
        return stream.last if stream is not None else (0, 0)

    async def epoch(self, room: str) -> str:
        return self._stream(room).epoch

    async def history(self, room: str, since: str, epoch: str | None) -> Replay:
        stream = self._stream(room)
        same_epoch = epoch == stream.epoch
        after = parse_id(since) if same_epoch else (0, 0)
        from_the_future = after > stream.last  # replayed whole, as after a new epoch
        if from_the_future:
            after = (0, 0)
        frames = [frame for key, frame in stream.entries if key > after]
        complete = same_epoch and not from_the_future and after >= stream.max_deleted
        return Replay(frames, complete, stream.epoch)

    def hand_off(self, seconds: float) -> None:
        """Presence ends with this process, and so do all of its clients' sockets."""

    def presence(self, room: str, member: Member, joined: bool) -> None:
        here = self._presence.setdefault(room, set())
        before = len(here)
        if joined:
            here.add(member)
        else:
            here.discard(member)
        if len(here) != before and max(before, len(here)) <= self._event_limit:
            event = "join" if joined else "leave"
            self._to_room(room, protocol.presence(room, event, member.public()))
        if not here:
            del self._presence[room]

    async def members(self, room: str) -> list[Member]:
        return sorted(self._presence.get(room, ()), key=lambda m: m.username)
