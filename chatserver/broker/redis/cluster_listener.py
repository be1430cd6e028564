"""The listener on a Redis Cluster: room and user-shard channels are shard channels
(SSUBSCRIBE on the primary owning the channel's slot, one connection per primary this
worker needs); the instance channel (the keep-alive) is classic pub/sub on one primary.
Any connection lost, MOVED, or a slot migrated away (an unasked `sunsubscribe`)
reconnects the whole listener from a fresh slot map, which replays every room's gap as
after any drop."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from ...redis_urls import RedisTarget
from .client import REDIS_FAILURES, node_pubsub_client, stop
from .keys import Keys
from .listener import Listener, log, messages
from .users import UserShards


class ClusterListener(Listener):
    def __init__(
        self,
        target: RedisTarget,
        commands: RedisCluster,
        keys: Keys,
        instance: str,
        users: UserShards,
        *,
        on_connecting: Callable[[], None],
        on_reconnect: Callable[[], None],
        on_listener_restart: Callable[[], None],
    ) -> None:
        host, port = target.nodes[0]
        super().__init__(
            node_pubsub_client(target, host, port), commands, keys, instance, users,
            on_connecting=on_connecting, on_reconnect=on_reconnect,
            on_listener_restart=on_listener_restart)
        self._target = target
        self._cluster = commands
        self._shards: dict[str, tuple[aioredis.Redis, PubSub]] = {}  # node name -> its
        self._room_node: dict[str, str] = {}  # subscribed room channel -> node name
        self._readers: list[asyncio.Task[None]] = []
        self._failure: asyncio.Future[None] | None = None

    async def _listen_once(self) -> None:
        self._on_connecting()
        self._changes.clear()
        self._failure = asyncio.get_running_loop().create_future()
        try:
            await self._cluster.initialize()  # the first time: slot map and command table
            await self._cluster.nodes_manager.initialize()  # the slot map, afresh
            primaries = self._cluster.get_primaries()
        except REDIS_FAILURES as exc:
            raise RedisConnectionError(f"cluster topology: {type(exc).__name__}") from None
        node = random.choice(primaries)
        await self._client.aclose()
        self._client = node_pubsub_client(self._target, node.host, int(node.port))
        main = self._pubsub = self._client.pubsub()
        await main.subscribe(self._instance_channel)
        self._spawn_reader(main)
        sharded = [self._keys.room_channel(room) for room in self.rooms]
        sharded += [self._keys.user_channel(shard) for shard in self._users.shards]
        await self._shard_subscribe(sharded)
        await self._commands.ping()
        self._connected = True
        self._backoff = 0.1
        self._send_changes()
        log.info("redis cluster pub/sub connected; %d channels on %d primaries",
                 len(sharded) + 1, len(self._shards))
        await self._failure

    async def _shard_subscribe(self, channels: list[str]) -> None:
        by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
        for channel in channels:
            try:
                node = self._cluster.get_node_from_key(channel)
            except REDIS_FAILURES as exc:
                raise RedisConnectionError(f"slot of {channel}: {type(exc).__name__}") from None
            if node is None:
                raise RedisConnectionError(f"no primary for {channel}")
            by_node.setdefault(node.name, (node, []))[1].append(channel)
        for name, (node, names) in by_node.items():
            new = name not in self._shards
            if new:
                client = node_pubsub_client(self._target, node.host, int(node.port))
                self._shards[name] = (client, client.pubsub())
            pubsub = self._shards[name][1]
            by_slot: dict[int, list[str]] = {}
            for channel in names:
                by_slot.setdefault(self._cluster.keyslot(channel), []).append(channel)
                self._room_node[channel] = name
            for same_slot in by_slot.values():  # one SSUBSCRIBE may not span slots
                await pubsub.ssubscribe(*same_slot)
            if new:
                self._spawn_reader(pubsub)

    def _spawn_reader(self, pubsub: PubSub) -> None:
        self._readers.append(asyncio.create_task(self._read(pubsub), name="redis-shard"))

    async def _read(self, pubsub: PubSub) -> None:
        """Read one connection until it fails; the failure reconnects the listener."""
        try:
            async for msg in messages(pubsub):
                if msg["type"] == "sunsubscribe" and self._moved_away(msg["channel"]):
                    raise RedisConnectionError("a room's slot moved to another primary")
                await self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to _listen_once, whose caller sorts it
            if self._failure is not None and not self._failure.done():
                self._failure.set_exception(exc)

    def _moved_away(self, channel: bytes) -> bool:
        """An unsubscribe nobody asked for: Redis drops a slot's shard subscribers when
        the slot migrates."""
        room, shard = self._keys.room_of(channel), self._keys.shard_of(channel)
        return (room is not None and room in self.rooms) or (
            shard is not None and shard in self._users.shards)

    async def _send_subscriptions(self) -> None:
        await asyncio.sleep(0)
        while self._changes and self._connected and (main := self._pubsub) is not None:
            changes, self._changes = self._changes, {}
            rooms_on: list[str] = []
            rooms_off: list[str] = []
            on: list[str] = []
            off: list[str] = []
            for channel, wanted in changes.items():
                raw = channel.encode()
                is_shard = (self._keys.room_of(raw) is not None
                            or self._keys.shard_of(raw) is not None)
                ((rooms_on if wanted else rooms_off) if is_shard else (on if wanted else off)
                 ).append(channel)
            try:
                if on:
                    await main.subscribe(*on)
                if off:
                    await main.unsubscribe(*off)
                if rooms_on:
                    await self._shard_subscribe(rooms_on)
                for channel in rooms_off:
                    name = self._room_node.pop(channel, None)
                    if name is not None and name in self._shards:
                        await self._shards[name][1].sunsubscribe(channel)
            except REDIS_FAILURES as exc:
                if self._failure is not None and not self._failure.done():
                    self._failure.set_exception(RedisConnectionError(type(exc).__name__))
                return

    async def _drop_pubsub(self) -> None:
        readers, self._readers = self._readers, []
        for task in readers:
            await stop(task)  # redis-py may swallow one cancellation
        shards, self._shards = self._shards, {}
        self._room_node.clear()
        for client, pubsub in shards.values():
            with contextlib.suppress(*REDIS_FAILURES):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()
        await super()._drop_pubsub()
