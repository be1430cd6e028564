"""The pub/sub connection: subscribes what this worker wants, reconnects with capped
backoff, replays each room's gap from its stream on every subscribe confirmation, and
hands each payload to the sink once, in id order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from ...protocol import message_frame, message_id_of, parse_id
from ..base import Sink
from .client import REDIS_FAILURES, RedisClient, stop
from .keys import Keys
from .users import UserShards, open_envelope

log = logging.getLogger(__name__)

REPLAY_BATCH = 500  # stream entries per XRANGE of a catch-up
MIN_BACKOFF, MAX_BACKOFF = 0.1, 5.0  # seconds between reconnect attempts
SILENCE_LIMIT = 15.0  # seconds without any pub/sub traffic (pongs included) = dead link
POLL = 5.0  # seconds a read waits before pinging


async def messages(pubsub: PubSub) -> AsyncIterator[dict[str, Any]]:
    """A pub/sub connection's messages, subscribe confirmations included. A quiet link is
    pinged every POLL seconds; one silent past SILENCE_LIMIT (not even a pong) is dead:
    TimeoutError, and the caller reconnects."""
    last_seen = time.monotonic()
    while True:
        msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=POLL)
        now = time.monotonic()
        if msg is None:
            if now - last_seen > SILENCE_LIMIT:
                raise TimeoutError("pub/sub connection silent")
            await pubsub.ping()
            continue
        last_seen = now
        yield msg


class Listener:
    def __init__(
        self,
        client: aioredis.Redis,
        commands: RedisClient,
        keys: Keys,
        instance: str,
        users: UserShards,
        *,
        on_connecting: Callable[[], None],
        on_reconnect: Callable[[], None],
        on_listener_restart: Callable[[], None],
    ) -> None:
        self._client = client  # the pub/sub connection's
        self._commands = commands  # ping and catch-up reads
        self._keys = keys
        self._instance_channel = keys.instance_channel(instance)
        self._users = users
        self._on_connecting = on_connecting
        self._on_reconnect = on_reconnect
        self._on_listener_restart = on_listener_restart
        self.rooms: dict[str, tuple[int, int]] = {}  # subscribed room -> last id delivered
        self._sink: Sink | None = None
        self._pubsub: PubSub | None = None
        self._connected = False
        self._backoff = MIN_BACKOFF
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._changes: dict[str, bool] = {}  # channel -> subscribe, not yet sent
        self._subscriber: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._task = asyncio.create_task(self._listen_forever(), name="redis-listener")
        self._task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if self._closing or task.cancelled():
            return
        # _listen_forever only returns by bug; never let that be silent.
        log.error("redis listener exited unexpectedly (%r); restarting", task.exception())
        self._on_listener_restart()
        self._task = asyncio.create_task(self._listen_forever(), name="redis-listener")
        self._task.add_done_callback(self._listener_done)

    async def close(self) -> None:
        self._closing = True
        await stop(self._task)
        await stop(self._subscriber)
        await self._drop_pubsub()
        await self._client.aclose()

    # ------------------------------------------------------------ subscriptions

    def watch_room(self, room: str, last: tuple[int, int]) -> None:
        """Subscribe a room whose stream this worker has seen up to `last`."""
        self.rooms[room] = last
        self.subscription(True, self._keys.room_channel(room))

    def unwatch_room(self, room: str) -> None:
        if self.rooms.pop(room, None) is not None:
            self.subscription(False, self._keys.room_channel(room))

    def subscription(self, subscribe: bool, channel: str) -> None:
        """Queue a (un)subscribe; those of one loop pass go out as one command each way."""
        self._changes[channel] = subscribe
        self._send_changes()

    def _send_changes(self) -> None:
        if self._changes and (self._subscriber is None or self._subscriber.done()):
            self._subscriber = asyncio.create_task(self._send_subscriptions())

    async def _send_subscriptions(self) -> None:
        await asyncio.sleep(0)
        # While (re)connecting, changes wait: the connection sends them once it is up.
        while self._changes and self._connected and (pubsub := self._pubsub) is not None:
            changes, self._changes = self._changes, {}
            on = [channel for channel, wanted in changes.items() if wanted]
            off = [channel for channel, wanted in changes.items() if not wanted]
            try:
                if on:
                    await pubsub.subscribe(*on)
                if off:
                    await pubsub.unsubscribe(*off)
            except REDIS_FAILURES:
                return  # the listener sees the same failure and resubscribes

    # ------------------------------------------------------------ the connection

    async def _listen_forever(self) -> None:
        while not self._closing:
            try:
                await self._listen_once()
            except REDIS_FAILURES as exc:
                if self._connected:
                    log.warning("redis pub/sub connection lost: %s", type(exc).__name__)
                self._on_reconnect()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis listener failed; restarting it")
                self._on_listener_restart()
            self._connected = False
            await self._drop_pubsub()
            await asyncio.sleep(random.uniform(self._backoff / 2, self._backoff))
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _listen_once(self) -> None:
        self._on_connecting()
        self._changes.clear()  # `wanted` below is the state they were changing
        pubsub = self._pubsub = self._client.pubsub()
        wanted = [self._instance_channel]
        wanted += [self._keys.room_channel(room) for room in self.rooms]
        wanted += [self._keys.user_channel(shard) for shard in self._users.shards]
        await pubsub.subscribe(*wanted)
        await self._commands.ping()
        self._connected = True
        self._backoff = MIN_BACKOFF
        self._send_changes()  # those made while connecting
        log.info("redis pub/sub connected; %d channels", len(wanted))
        async for msg in messages(pubsub):
            await self._dispatch(msg)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------ what arrives

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        channel: bytes = msg["channel"] if msg.get("channel") is not None else b""
        if kind in ("message", "smessage"):
            if (room := self._keys.room_of(channel)) is not None:
                self._deliver_room(room, msg["data"])
            elif self._keys.shard_of(channel) is not None:
                self._deliver_user(msg["data"])
        elif kind in ("subscribe", "ssubscribe"):
            if (room := self._keys.room_of(channel)) is not None:
                await self._catch_up(room)
            elif (shard := self._keys.shard_of(channel)) is not None:
                self._users.confirmed(shard)

    def _deliver_room(self, room: str, payload: bytes) -> None:
        last = self.rooms.get(room)
        if last is None:
            return  # unsubscribed meanwhile
        message_id = message_id_of(payload)  # no JSON parse on the hot path
        if message_id is not None:
            key = parse_id(message_id)
            if key <= last:
                return  # already delivered by a catch-up replay
            self.rooms[room] = key
        if self._sink is not None:
            self._sink.deliver_room(room, payload)

    def _deliver_user(self, data: bytes) -> None:
        opened = open_envelope(data)
        # A shard carries every user hashed to it; only this worker's users are ours.
        if opened is not None and opened[0] in self._users and self._sink is not None:
            self._sink.deliver_user(*opened)

    async def _catch_up(self, room: str) -> None:
        """Deliver what the stream holds after the last id this worker delivered."""
        while (last := self.rooms.get(room)) is not None:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._commands.xrange(
                self._keys.stream(room), min=f"({last[0]}-{last[1]}", max="+",
                count=REPLAY_BATCH,
            )  # type: ignore[assignment]  # redis-py types replies loosely
            for entry_id, fields in entries:
                self._deliver_room(room, message_frame(entry_id.decode(), fields[b"t"]))
            if len(entries) < REPLAY_BATCH:
                return
