"""In-process broker: one worker, no Redis. Same semantics as RedisBroker (ids, epochs,
bounded history, presence), so the embedded default behaves like production.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque

from .. import protocol
from ..protocol import message_frame, parse_id
from .base import Broker, Member, Replay, Sink


class _Stream:
    def __init__(self, maxlen: int) -> None:
        self.entries: deque[tuple[tuple[int, int], bytes]] = deque()
        self.maxlen = maxlen
        self.last = (0, 0)
        self.max_deleted = (0, 0)
        self.epoch = uuid.uuid4().hex

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
    def __init__(self, *, history_maxlen: int = 1000, presence_event_limit: int = 100) -> None:
        self._maxlen = history_maxlen
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
            stream = self._streams[room] = _Stream(self._maxlen)
        return stream

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
        frames = [frame for key, frame in stream.entries if key > after]
        return Replay(frames, same_epoch and after >= stream.max_deleted, stream.epoch)

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
