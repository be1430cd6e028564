"""Redis broker: history streams, pub/sub fan-out, presence sorted sets.

A publish is one Lua call (XADD, then PUBLISH of the payload that already carries the
stream id). The listener owns one pub/sub connection; when it drops, the listener
reconnects with capped backoff, resubscribes, and on each subscribe confirmation replays
the room's stream after the last id it delivered, so a Redis blip loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from .. import protocol
from ..protocol import MESSAGE_PREFIX, message_frame, message_id_of, parse_id
from .base import Broker, BrokerUnavailable, Member, Replay, Sink

log = logging.getLogger(__name__)

PUBLISH_LUA = """
redis.call('SET', KEYS[3], ARGV[3], 'NX')
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 't', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[4] .. id .. ARGV[2])
return id
"""

# Epoch, entries after `since` (all of them when the epoch changed: the client rebuilds
# from what is kept), and the highest id ever trimmed (Redis >= 7.0), so that "history
# no longer reaches since" is exact, not guessed from the first entry.
HISTORY_LUA = """
redis.call('SET', KEYS[2], ARGV[3], 'NX')
local epoch = redis.call('GET', KEYS[2])
local since = ARGV[1]
if epoch ~= ARGV[4] then since = '0-0' end
local maxdel = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then maxdel = info[i + 1] end
  end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. since, '+', 'COUNT', ARGV[2])
return {epoch, maxdel, entries}
"""

# Presence: a sorted set of "sub\tinstance\tusername" scored by expiry, and a hash
# sub -> number of instances that have the user, so "first/last anywhere" is O(1).
# KEYS: entries, users, room channel. The event is published here, in the same call.
PRESENCE_JOIN_LUA = """
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then
  local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  if n == 1 and redis.call('HLEN', KEYS[2]) <= tonumber(ARGV[5]) then
    redis.call('PUBLISH', KEYS[3], ARGV[6])
  end
end
return 0
"""

PRESENCE_LEAVE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    if redis.call('HLEN', KEYS[2]) < tonumber(ARGV[3]) then
      redis.call('PUBLISH', KEYS[3], ARGV[4])
    end
  end
end
return 0
"""

# Removes expired entries (a dead instance's members) and returns those whose user is
# present nowhere else; only one sweeper gets each, so one leave event goes out.
PRESENCE_SWEEP_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if #gone == 0 then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local out = {}
for _, g in ipairs(gone) do
  local sub = string.match(g, '^[^\t]*')
  if redis.call('HINCRBY', KEYS[2], sub, -1) <= 0 then
    redis.call('HDEL', KEYS[2], sub)
    table.insert(out, g)
  end
end
return out
"""

REPLAY_BATCH = 500
USER_SHARDS = 256
SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to confirm a new user-shard subscription
POOL_SIZE = 32  # command connections per worker
PUBLISH_BATCH = 256  # publishes per pipeline round trip
MAX_OUTBOX = 100_000  # publishes waiting for Redis before new ones fail `unavailable`
MIN_BACKOFF, MAX_BACKOFF = 0.1, 5.0  # seconds between pub/sub reconnect attempts
SILENCE_LIMIT = 15.0  # seconds without any pub/sub traffic (pongs included) = dead link


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        instance: str,
        prefix: str = "chat:",
        history_maxlen: int = 1000,
        presence_ttl: float = 30.0,
        presence_event_limit: int = 100,
        on_reconnect: Callable[[], None] | None = None,
        on_listener_restart: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._instance = instance
        self._prefix = prefix
        self._maxlen = history_maxlen
        self._presence_ttl = presence_ttl
        self._event_limit = presence_event_limit
        self._on_reconnect = on_reconnect or _nothing
        self._on_listener_restart = on_listener_restart or _nothing
        # Commands: a bounded pool (a burst of joins queues instead of opening hundreds
        # of connections), a short retry, then the caller hears `unavailable`.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=5,
            socket_connect_timeout=2,
            socket_timeout=5,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            health_check_interval=15,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        # Pub/sub: no hidden retry; the listener owns reconnecting so it can replay gaps.
        self._sub_redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        self._publish = self._redis.register_script(PUBLISH_LUA)
        self._history = self._redis.register_script(HISTORY_LUA)
        self._presence_join = self._redis.register_script(PRESENCE_JOIN_LUA)
        self._presence_leave = self._redis.register_script(PRESENCE_LEAVE_LUA)
        self._presence_sweep = self._redis.register_script(PRESENCE_SWEEP_LUA)
        self._scripts = (self._publish, self._history, self._presence_join,
                         self._presence_leave, self._presence_sweep)
        self._room_channel_prefix = f"{prefix}room:".encode()
        self._user_channel_prefix = f"{prefix}users:".encode()
        self._instance_channel = f"{prefix}instance:{instance}"
        self._rooms: dict[str, tuple[int, int]] = {}  # subscribed room -> last id delivered
        self._epochs: dict[str, str] = {}  # subscribed room -> its history epoch
        self._users: set[str] = set()
        self._shards: dict[int, int] = {}  # user shard -> local users in it
        self._shard_ready: dict[int, asyncio.Future[None]] = {}  # resolved on confirmation
        self._present: dict[str, set[Member]] = {}  # room -> members on this worker
        self._sink: Sink | None = None
        self._pubsub: PubSub | None = None
        self._connected = False
        self._backoff = MIN_BACKOFF
        self._closing = False
        self._listener: asyncio.Task[None] | None = None
        # Scripts waiting for the next pipeline: publishes (with a future) and presence
        # changes (fire and forget), sent in order, one batch in flight at a time.
        self._outbox: list[tuple[Any, list[str], list[Any], asyncio.Future[str] | None]] = []
        self._sender: asyncio.Task[None] | None = None
        self._subscriptions: dict[str, bool] = {}  # channel -> subscribe, not yet sent
        self._subscriber: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ keys

    def _room_channel(self, room: str) -> str:
        return f"{self._prefix}room:{room}"

    def _user_channel(self, shard: int) -> str:
        return f"{self._prefix}users:{shard}"

    def _stream_key(self, room: str) -> str:
        return f"{self._prefix}history:{room}"

    def _epoch_key(self, room: str) -> str:
        return f"{self._prefix}epoch:{room}"

    def _presence_key(self, room: str) -> str:
        return f"{self._prefix}presence:{room}"

    # ------------------------------------------------------------- lifecycle

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._listener = asyncio.create_task(self._listen_forever(), name="redis-listener")
        self._listener.add_done_callback(self._listener_done)
        self._presence_task = asyncio.create_task(self._refresh_presence(), name="presence")

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        if self._closing or task.cancelled():
            return
        # _listen_forever only returns by bug; never let that be silent.
        log.error("redis listener exited unexpectedly (%r); restarting", task.exception())
        self._on_listener_restart()
        self._listener = asyncio.create_task(self._listen_forever(), name="redis-listener")
        self._listener.add_done_callback(self._listener_done)

    async def close(self) -> None:
        self._closing = True
        self._drop_local_presence()
        if self._sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sender), 2)
        tasks = (self._listener, self._presence_task, self._sender, self._subscriber)
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                    await task
        await self._redis.aclose()
        await self._sub_redis.aclose()

    @property
    def connected(self) -> bool:
        return self._connected

    def _set_connected(self, value: bool) -> None:
        self._connected = value

    # --------------------------------------------------------------- listener

    async def _listen_forever(self) -> None:
        while not self._closing:
            try:
                await self._listen_once()
            except (TimeoutError, RedisError, OSError) as exc:
                if self._connected:
                    log.warning("redis pub/sub connection lost: %s", type(exc).__name__)
                self._on_reconnect()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("redis listener failed; restarting it")
                self._on_listener_restart()
            self._set_connected(False)
            await self._drop_pubsub()
            await asyncio.sleep(random.uniform(self._backoff / 2, self._backoff))
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    async def _listen_once(self) -> None:
        self._epochs.clear()
        pubsub = self._sub_redis.pubsub()
        self._pubsub = pubsub
        wanted = [self._instance_channel]
        wanted += [self._room_channel(room) for room in self._rooms]
        wanted += [self._user_channel(shard) for shard in self._shards]
        await pubsub.subscribe(*wanted)
        await self._redis.ping()
        self._set_connected(True)
        self._backoff = MIN_BACKOFF
        log.info("redis pub/sub connected; %d channels", len(wanted))
        last_seen = time.monotonic()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0)
            now = time.monotonic()
            if msg is None:
                if now - last_seen > SILENCE_LIMIT:
                    raise TimeoutError("pub/sub connection silent")
                await pubsub.ping()
                continue
            last_seen = now
            await self._dispatch(msg)

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        channel: bytes = msg["channel"] if msg.get("channel") is not None else b""
        if kind == "message":
            if channel.startswith(self._room_channel_prefix):
                self._deliver_room(channel[len(self._room_channel_prefix) :].decode(), msg["data"])
            elif channel.startswith(self._user_channel_prefix):
                sub, _, payload = msg["data"].partition(b"\n")
                if self._sink is not None:
                    self._sink.deliver_user(sub.decode(), payload)
        elif kind == "subscribe" and channel.startswith(self._room_channel_prefix):
            await self._catch_up(channel[len(self._room_channel_prefix) :].decode())
        elif kind == "subscribe" and channel.startswith(self._user_channel_prefix):
            ready = self._shard_ready.get(int(channel[len(self._user_channel_prefix) :]))
            if ready is not None and not ready.done():
                ready.set_result(None)

    def _deliver_room(self, room: str, payload: bytes) -> None:
        last = self._rooms.get(room)
        if last is None:
            return  # unsubscribed meanwhile
        message_id = message_id_of(payload)
        if message_id is not None:
            key = parse_id(message_id)
            if key <= last:
                return  # already delivered by a catch-up replay
            self._rooms[room] = key
        if self._sink is not None:
            self._sink.deliver_room(room, payload)

    async def _catch_up(self, room: str) -> None:
        """Deliver what the stream holds after the last id this worker delivered."""
        while (last := self._rooms.get(room)) is not None:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(
                self._stream_key(room), min=f"({last[0]}-{last[1]}", max="+", count=REPLAY_BATCH
            )  # type: ignore[assignment]  # redis-py types replies loosely
            for entry_id, fields in entries:
                self._deliver_room(room, message_frame(entry_id.decode(), fields[b"t"]))
            if len(entries) < REPLAY_BATCH:
                return

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _subscription(self, subscribe: bool, channel: str) -> None:
        """Queue a (un)subscribe; those of one loop pass go out as one command each way."""
        self._subscriptions[channel] = subscribe
        if self._subscriber is None or self._subscriber.done():
            self._subscriber = asyncio.create_task(self._send_subscriptions())

    async def _send_subscriptions(self) -> None:
        await asyncio.sleep(0)
        while self._subscriptions:
            changes, self._subscriptions = self._subscriptions, {}
            pubsub = self._pubsub
            if pubsub is None or not self._connected:
                return  # the listener subscribes everything wanted when it reconnects
            on = [channel for channel, wanted in changes.items() if wanted]
            off = [channel for channel, wanted in changes.items() if not wanted]
            try:
                if on:
                    await pubsub.subscribe(*on)
                if off:
                    await pubsub.unsubscribe(*off)
            except (RedisError, OSError):
                return  # the listener sees the same failure and resubscribes

    # ------------------------------------------------------------ operations

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except (TimeoutError, RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis {what} failed: {type(exc).__name__}") from None

    def publish(self, room: str, tail: bytes) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if len(self._outbox) >= MAX_OUTBOX:
            future.set_exception(BrokerUnavailable("too many publishes waiting for redis"))
            return future
        keys = [self._stream_key(room), self._room_channel(room), self._epoch_key(room)]
        args = [self._maxlen, tail, uuid.uuid4().hex, MESSAGE_PREFIX]
        self._enqueue(self._publish, keys, args, future)
        return future

    def _enqueue(self, script: Any, keys: list[str], args: list[Any],
                 future: asyncio.Future[str] | None) -> None:
        self._outbox.append((script, keys, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_outbox(), name="redis-sender")

    async def _send_outbox(self) -> None:
        """One pipeline in flight at a time: one round trip per batch, and batches (so
        each client's messages) reach Redis in order."""
        await asyncio.sleep(0)  # let this loop pass add to the batch
        while self._outbox:
            batch, self._outbox = self._outbox[:PUBLISH_BATCH], self._outbox[PUBLISH_BATCH:]
            try:
                results = await self._run_scripts(batch)
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:
                    # A new or restarted Redis without our scripts: those entries did not
                    # run (a script is all or nothing), so load the scripts, run just those.
                    for script in self._scripts:
                        await self._redis.script_load(script.script)
                    again = await self._run_scripts([batch[i] for i in missing])
                    for i, result in zip(missing, again, strict=True):
                        results[i] = result
            except (TimeoutError, RedisError, OSError) as exc:
                failure = BrokerUnavailable(f"redis publish failed: {type(exc).__name__}")
                results = [failure] * len(batch)
            for (_, _, _, future), result in zip(batch, results, strict=True):
                if future is None or future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(BrokerUnavailable(f"redis publish failed: {result}"))
                else:
                    future.set_result(result.decode())

    async def _run_scripts(self, batch: list[Any]) -> list[Any]:
        """EVALSHA each entry in one pipeline round trip. (redis-py's Script objects in a
        pipeline would first ask SCRIPT EXISTS: a second round trip on every batch.)"""
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def publish_event(self, room: str, payload: bytes) -> None:
        await self._call("publish", self._redis.publish(self._room_channel(room), payload))

    async def send_user(self, sub: str, payload: bytes) -> None:
        message = sub.encode() + b"\n" + payload  # the shard's receivers pick by sub
        channel = self._user_channel(user_shard(sub))
        await self._call("publish", self._redis.publish(channel, message))

    async def subscribe_room(self, room: str) -> None:
        if room in self._rooms:
            return
        newest = await self._call(
            "xrevrange", self._redis.xrevrange(self._stream_key(room), count=1)
        )
        if room in self._rooms:
            return
        self._rooms[room] = parse_id(newest[0][0].decode()) if newest else (0, 0)
        self._subscription(True, self._room_channel(room))

    async def unsubscribe_room(self, room: str) -> None:
        self._epochs.pop(room, None)
        if self._rooms.pop(room, None) is not None:
            self._subscription(False, self._room_channel(room))

    async def subscribe_user(self, sub: str) -> None:
        """Returns once Redis confirmed the user's shard subscription (at once when it
        already had), so a direct message sent after the welcome is not missed."""
        if sub in self._users:
            return
        self._users.add(sub)
        shard = user_shard(sub)
        self._shards[shard] = self._shards.get(shard, 0) + 1
        ready = self._shard_ready.get(shard)
        if ready is None:
            ready = self._shard_ready[shard] = asyncio.get_running_loop().create_future()
            self._subscription(True, self._user_channel(shard))
        if not ready.done():
            try:
                await asyncio.wait_for(asyncio.shield(ready), SUBSCRIBE_TIMEOUT)
            except TimeoutError:
                await self.unsubscribe_user(sub)
                raise BrokerUnavailable("redis did not confirm the subscription") from None

    async def unsubscribe_user(self, sub: str) -> None:
        if sub not in self._users:
            return
        self._users.discard(sub)
        shard = user_shard(sub)
        self._shards[shard] -= 1
        if not self._shards[shard]:
            del self._shards[shard]
            self._shard_ready.pop(shard, None)
            self._subscription(False, self._user_channel(shard))

    def position(self, room: str) -> tuple[int, int] | None:
        return self._rooms.get(room)

    async def epoch(self, room: str) -> str:
        """Cached while subscribed; the cache is dropped whenever pub/sub reconnects, since
        that is when Redis may have lost its data (history() always reads it afresh)."""
        cached = self._epochs.get(room)
        if cached is not None:
            return cached
        fresh = uuid.uuid4().hex
        old = await self._call(
            "epoch", self._redis.set(self._epoch_key(room), fresh, nx=True, get=True)
        )
        value = old.decode() if old else fresh
        if room in self._rooms:
            self._epochs[room] = value
        return value

    async def history(self, room: str, since: str, epoch: str | None) -> Replay:
        keys = [self._stream_key(room), self._epoch_key(room)]
        args: list[str | int] = [since, self._maxlen, uuid.uuid4().hex, epoch or ""]
        current, max_deleted, entries = await self._call(
            "history", self._history(keys=keys, args=args)
        )
        current = current.decode()
        frames = [
            message_frame(eid.decode(), dict(_pairs(fields))[b"t"]) for eid, fields in entries
        ]
        complete = epoch == current and parse_id(since) >= parse_id(max_deleted.decode())
        return Replay(frames, complete, current)

    # --------------------------------------------------------------- presence

    def _member_key(self, member: Member) -> str:
        username = member.username.replace("\t", " ")
        return f"{member.sub}\t{self._instance}\t{username}"

    def _presence_keys(self, room: str) -> list[str]:
        return [self._presence_key(room), f"{self._prefix}present:{room}",
                self._room_channel(room)]

    def presence(self, room: str, member: Member, joined: bool) -> None:
        if joined:
            self._present.setdefault(room, set()).add(member)
            ttl = int(self._presence_ttl * 4)
            event = protocol.presence(room, "join", member.public())
            args = [self._member_key(member), time.time() + self._presence_ttl, member.sub, ttl,
                    self._event_limit, event]
            self._enqueue(self._presence_join, self._presence_keys(room), args, None)
        else:
            here = self._present.get(room, set())
            here.discard(member)
            if not here:
                self._present.pop(room, None)
            event = protocol.presence(room, "leave", member.public())
            args = [self._member_key(member), member.sub, self._event_limit, event]
            self._enqueue(self._presence_leave, self._presence_keys(room), args, None)

    async def members(self, room: str) -> list[Member]:
        raw = await self._call(
            "presence", self._redis.zrangebyscore(self._presence_key(room), time.time(), "+inf")
        )
        seen: dict[str, Member] = {}
        for item in raw:
            sub, _, rest = item.decode().partition("\t")
            seen.setdefault(sub, Member(sub, rest.partition("\t")[2]))
        return sorted(seen.values(), key=lambda m: m.username)

    async def _refresh_presence(self) -> None:
        """Keep this worker's members alive and sweep those of dead instances."""
        while True:
            await asyncio.sleep(self._presence_ttl / 3)
            try:
                await self._refresh_once()
            except (TimeoutError, RedisError, OSError) as exc:
                log.debug("presence refresh failed: %s", type(exc).__name__)

    async def _refresh_once(self) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for room, here in self._present.items():
                key = self._presence_key(room)
                expiry = now + self._presence_ttl
                pipe.zadd(key, {self._member_key(m): expiry for m in here}, xx=True)
                pipe.expire(key, int(self._presence_ttl * 4))
            await pipe.execute()
        for room in list(self._rooms):
            keys = self._presence_keys(room)[:2]
            gone = await self._presence_sweep(keys=keys, args=[now])
            for item in gone:
                sub, _, rest = item.decode().partition("\t")
                member = Member(sub, rest.partition("\t")[2])
                await self.publish_event(room, protocol.presence(room, "leave", member.public()))

    def _drop_local_presence(self) -> None:
        """On a clean shutdown, this worker's members leave at once (events included)."""
        for room, here in list(self._present.items()):
            for member in list(here):
                self.presence(room, member, False)


def user_shard(sub: str) -> int:
    """Per-user traffic (direct messages, sign-out) rides one of USER_SHARDS channels: a
    worker subscribes the shards of its users (all of them, soon, on a busy worker) instead
    of a channel per user, so a connect storm sends no SUBSCRIBE per connection. Stable
    across processes (crc32, not hash())."""
    return zlib.crc32(sub.encode()) % USER_SHARDS


def _pairs(fields: Any) -> list[tuple[bytes, bytes]]:
    """Lua returns stream fields as a flat list; redis-py's xrange returns a dict."""
    if isinstance(fields, dict):
        return list(fields.items())
    return list(zip(fields[::2], fields[1::2], strict=True))


def _nothing() -> None:
    return None
