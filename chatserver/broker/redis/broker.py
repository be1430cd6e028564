"""RedisBroker: the Broker seam over Redis, tying the listener, the outbox, presence and
the user shards together; it also owns history (streams and their epochs)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ...protocol import MESSAGE_PREFIX, message_frame, parse_id
from ...redis_urls import parse_target
from ..base import Broker, BrokerUnavailable, Member, Replay, Sink
from .client import OUTBOX_POOL_SIZE, REDIS_FAILURES, command_client, pubsub_client
from .cluster_listener import ClusterListener
from .keys import Keys
from .listener import Listener
from .outbox import Outbox
from .presence import Presence
from .scripts import Call, Scripts
from .users import UserShards, envelope, user_shard

SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to confirm a new user-shard subscription


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        instance: str,
        prefix: str = "chat:",
        history_maxlen: int = 1000,
        room_ttl: int = 0,
        presence_ttl: float = 30.0,
        presence_event_limit: int = 100,
        on_reconnect: Callable[[], None] | None = None,
        on_listener_restart: Callable[[], None] | None = None,
    ) -> None:
        self._maxlen = history_maxlen
        self._room_ttl = room_ttl  # seconds; 0: room keys never expire
        target = parse_target(url)
        sharded = target.mode == "cluster"
        self._redis = command_client(url)
        self._keys = Keys(prefix, sharded=sharded)
        self._scripts = Scripts(self._redis, sharded=sharded)
        # The outbox (publishes, presence) has connections of its own: in a reconnect
        # storm thousands of resumes wait for the pool's, and the publishes of the
        # clients already here must not wait behind them. (A cluster client keeps a
        # pool per node and never queues.)
        self._outbox_redis = (self._redis if sharded
                              else command_client(url, pool_size=OUTBOX_POOL_SIZE))
        self._outbox = Outbox(Scripts(self._outbox_redis, sharded=sharded))
        self._users = UserShards()
        self._epochs: dict[str, str] = {}  # subscribed room -> its history epoch
        hooks: dict[str, Callable[[], None]] = {
            "on_connecting": self._epochs.clear, "on_reconnect": on_reconnect or _nothing,
            "on_listener_restart": on_listener_restart or _nothing}
        self._listener: Listener
        if isinstance(self._redis, RedisCluster):
            self._listener = ClusterListener(target, self._redis, self._keys, instance,
                                             self._users, **hooks)
        else:
            self._listener = Listener(pubsub_client(url), self._redis, self._keys, instance,
                                      self._users, **hooks)
        self._presence = Presence(
            self._redis, self._keys, self._scripts, self._outbox,
            instance=instance, ttl=presence_ttl, event_limit=presence_event_limit,
            rooms=lambda: self._listener.rooms, publish_event=self.publish_event,
        )

    async def start(self, sink: Sink) -> None:
        self._listener.start(sink)
        self._presence.start()

    async def close(self) -> None:
        await self._presence.close()  # queues this worker's leaves...
        await self._outbox.close()  # ...and sends them
        await self._listener.close()  # closes its pub/sub clients
        await self._redis.aclose()
        if self._outbox_redis is not self._redis:
            await self._outbox_redis.aclose()

    @property
    def connected(self) -> bool:
        return self._listener.connected

    # ------------------------------------------------------------ traffic

    def publish(self, room: str, tail: bytes) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        keys = [self._keys.stream(room), self._keys.epoch(room)]
        args = [self._maxlen, tail, uuid.uuid4().hex, MESSAGE_PREFIX, self._room_ttl,
                self._keys.room_channel(room)]
        self._outbox.put(Call(self._scripts.publish, keys, args), future, _decode)
        return future

    async def publish_event(self, room: str, payload: bytes) -> None:
        channel = self._keys.room_channel(room)
        if self._keys.sharded:
            await _call("spublish", self._redis.spublish(channel, payload))
        else:
            await _call("publish", self._redis.publish(channel, payload))

    async def send_user(self, sub: str, payload: bytes) -> None:
        channel = self._keys.user_channel(user_shard(sub))
        if self._keys.sharded:
            await _call("spublish", self._redis.spublish(channel, envelope(sub, payload)))
        else:
            await _call("publish", self._redis.publish(channel, envelope(sub, payload)))

    # ------------------------------------------------------------ subscriptions

    async def subscribe_room(self, room: str) -> None:
        if room in self._listener.rooms:
            return
        newest = await _call("xrevrange", self._redis.xrevrange(self._keys.stream(room), count=1))
        if room in self._listener.rooms:
            return  # subscribed by a concurrent call meanwhile
        self._listener.watch_room(room, parse_id(newest[0][0].decode()) if newest else (0, 0))

    async def unsubscribe_room(self, room: str) -> None:
        self._epochs.pop(room, None)
        self._listener.unwatch_room(room)

    async def subscribe_user(self, sub: str) -> None:
        """Returns once Redis confirmed the user's shard subscription (at once when it
        already had), so a direct message sent after the welcome is not missed."""
        if sub in self._users:
            return
        ready, new_shard = self._users.add(sub)
        if new_shard:
            self._listener.subscription(True, self._keys.user_channel(user_shard(sub)))
        if not ready.done():
            try:
                await asyncio.wait_for(asyncio.shield(ready), SUBSCRIBE_TIMEOUT)
            except TimeoutError:
                await self.unsubscribe_user(sub)
                raise BrokerUnavailable("redis did not confirm the subscription") from None

    async def unsubscribe_user(self, sub: str) -> None:
        shard = self._users.remove(sub)
        if shard is not None:
            self._listener.subscription(False, self._keys.user_channel(shard))

    def position(self, room: str) -> tuple[int, int] | None:
        return self._listener.rooms.get(room)

    # ------------------------------------------------------------ history

    async def epoch(self, room: str) -> str:
        """Cached while subscribed; the cache is dropped whenever pub/sub reconnects, since
        that is when Redis may have lost its data (history() always reads it afresh)."""
        cached = self._epochs.get(room)
        if cached is not None:
            return cached
        fresh = uuid.uuid4().hex
        ttl = self._room_ttl or None
        old = await _call(
            "epoch", self._redis.set(self._keys.epoch(room), fresh, nx=True, get=True, ex=ttl)
        )
        value = old.decode() if old else fresh
        if room in self._listener.rooms:
            self._epochs[room] = value
        return value

    async def history(self, room: str, since: str, epoch: str | None) -> Replay:
        keys = [self._keys.stream(room), self._keys.epoch(room)]
        args: list[str | int] = [
            since, self._maxlen, uuid.uuid4().hex, epoch or "", self._room_ttl]
        current, max_deleted, newest, last = await _call(
            "history", self._scripts.history(keys=keys, args=args)
        )
        current = current.decode()
        if epoch == current and parse_id(since) > parse_id(last.decode()):
            # A `since` this stream never gave: replay it whole, and say it is not the
            # client's history (else the client would wait, deaf, for that id).
            replay = await self.history(room, "0-0", current)
            return Replay(replay.frames, False, current)
        frames = [
            message_frame(eid.decode(), dict(_pairs(fields))[b"t"])
            for eid, fields in reversed(newest[: self._maxlen])
        ]
        complete = (
            epoch == current
            and len(newest) <= self._maxlen  # else older ones were left out
            and parse_id(since) >= parse_id(max_deleted.decode())
        )
        return Replay(frames, complete, current)

    # ------------------------------------------------------------ presence

    def presence(self, room: str, member: Member, joined: bool) -> None:
        self._presence.change(room, member, joined)

    def hand_off(self, seconds: float) -> None:
        self._presence.hand_off(seconds)

    async def members(self, room: str) -> list[Member]:
        return await self._presence.members(room)


async def _call(what: str, pending: Awaitable[Any]) -> Any:
    """Await a command; a Redis failure becomes BrokerUnavailable (the client hears
    `unavailable`). Replies are typed loosely by redis-py, hence Any."""
    try:
        return await pending
    except REDIS_FAILURES as exc:
        raise BrokerUnavailable(f"redis {what} failed: {type(exc).__name__}") from None


def _decode(reply: bytes) -> str:
    return reply.decode()


def _pairs(fields: Any) -> list[tuple[bytes, bytes]]:
    """Lua returns stream fields as a flat list; redis-py's xrange returns a dict."""
    if isinstance(fields, dict):
        return list(fields.items())
    return list(zip(fields[::2], fields[1::2], strict=True))


def _nothing() -> None:
    return None
