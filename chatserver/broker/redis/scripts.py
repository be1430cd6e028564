"""The broker's Lua scripts, and running a batch of them: EVALSHA for each in one
pipeline round trip (one per primary on a cluster), reloading the scripts on NOSCRIPT (a
new, restarted or promoted Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from .client import REDIS_FAILURES, RedisClient

# The room channel is an argument, never one of KEYS: it is no key, and a cluster whose
# slot is migrating answers TRYAGAIN to every script declaring a key it does not hold,
# so a declared channel would refuse every call of the room for the whole migration.
# (It shares the room's hash tag, so SPUBLISH stays within the script's slot.)
#
# KEYS: stream, epoch. ARGV: maxlen, message tail, a fresh epoch, the message prefix
# (protocol.MESSAGE_PREFIX: handed in, never copied here), the room TTL (0: none), the
# room channel. The payload published already carries the stream id, so receivers need
# no second lookup. Every use pushes the room's expiry out: only rooms nobody uses expire.
PUBLISH_LUA = """
redis.call('SET', KEYS[2], ARGV[3], 'NX')
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 't', ARGV[2])
redis.call('PUBLISH', ARGV[6], ARGV[4] .. id .. ARGV[2])
if ARGV[5] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return id
"""

# Epoch, the highest id ever trimmed (Redis >= 7.0, so that "history no longer reaches
# since" is exact, not guessed from the first entry), and the newest maxlen + 1 entries
# after `since` (after 0-0 when the epoch changed: the client rebuilds from what is
# kept), newest first. Newest, since trimming is approximate (MAXLEN ~) and the stream
# may hold more than maxlen: a replay must end at the room's last message; the extra
# entry says that some were left out. The last id ever given lets the caller spot a
# `since` from the future. ARGV[5]: the room TTL, refreshed here too (0: none).
HISTORY_LUA = """
redis.call('SET', KEYS[2], ARGV[3], 'NX')
local epoch = redis.call('GET', KEYS[2])
local since = ARGV[1]
if epoch ~= ARGV[4] then since = '0-0' end
local maxdel, last = '0-0', '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then maxdel = info[i + 1] end
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
  if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
end
if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
local count = tonumber(ARGV[2]) + 1
local entries = redis.call('XREVRANGE', KEYS[1], '+', '(' .. since, 'COUNT', count)
return {epoch, maxdel, entries, last}
"""

# KEYS: presence entries, present users; the room channel is the last of ARGV (as in
# PUBLISH_LUA). The event is published in the same call, so it is in order with the
# room's messages. A join is an event when the
# user is new anywhere and the room has at most the limit with them; a leave when the
# user is gone everywhere and the room had at most the limit before.
PRESENCE_JOIN_LUA = """
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) == 1 then
  local n = redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  if n == 1 and redis.call('HLEN', KEYS[2]) <= tonumber(ARGV[5]) then
    redis.call('PUBLISH', ARGV[7], ARGV[6])
  end
end
return 0
"""

PRESENCE_LEAVE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    if redis.call('HLEN', KEYS[2]) < tonumber(ARGV[3]) then
      redis.call('PUBLISH', ARGV[5], ARGV[4])
    end
  end
end
return 0
"""

# A member of a worker that shuts down stays present until ARGV[2] (the hand-off), then
# the sweep removes it like a dead instance's: a reconnect elsewhere before then is no
# leave and join for the room. ARGV: the entry, its new expiry.
PRESENCE_KEEP_LUA = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
return 0
"""

# Removes expired entries (a dead instance's members) and returns those whose user is
# present nowhere else and whose leave is an event (the rule of PRESENCE_LEAVE_LUA);
# only one sweeper gets each, so one leave event goes out. ARGV: now, event limit.
PRESENCE_SWEEP_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if #gone == 0 then return {} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
local out = {}
for _, g in ipairs(gone) do
  local sub = string.match(g, '^[^\t]*')
  if redis.call('HINCRBY', KEYS[2], sub, -1) <= 0 then
    redis.call('HDEL', KEYS[2], sub)
    if redis.call('HLEN', KEYS[2]) < tonumber(ARGV[2]) then table.insert(out, g) end
  end
end
return out
"""

# A script (not ZRANGEBYSCORE on the pool) so that it rides the outbox: a members
# request sees every presence change made before it.
MEMBERS_LUA = """
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')
"""


@dataclass(frozen=True, slots=True)
class Call:
    """One script invocation, ready for a pipeline."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]


class Scripts:
    def __init__(self, client: RedisClient, *, sharded: bool = False) -> None:
        """`sharded`: a cluster, where room channels are shard channels (SPUBLISH)."""
        self._client = client
        self.publish = client.register_script(_publishing(PUBLISH_LUA, sharded))
        self.history = client.register_script(HISTORY_LUA)
        self.presence_join = client.register_script(_publishing(PRESENCE_JOIN_LUA, sharded))
        self.presence_leave = client.register_script(_publishing(PRESENCE_LEAVE_LUA, sharded))
        self.presence_keep = client.register_script(PRESENCE_KEEP_LUA)
        self.presence_sweep = client.register_script(PRESENCE_SWEEP_LUA)
        self.members = client.register_script(MEMBERS_LUA)
        self._all = (self.publish, self.history, self.presence_join, self.presence_leave,
                     self.presence_keep, self.presence_sweep, self.members)

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        """Each call's reply (or its error, as an exception object), in order. Raises
        only when Redis cannot be reached. On a cluster, one pipeline per primary: a
        shard without a primary fails its own calls only."""
        if not isinstance(self._client, RedisCluster):
            return await self._run_on(calls)
        await self._client.initialize()  # the slot map: at first use, or after a failure
        groups: dict[str, list[int]] = {}
        results: list[Any] = [None] * len(calls)
        for i, call in enumerate(calls):
            try:
                node = self._client.get_node_from_key(call.keys[0])
            except REDIS_FAILURES as exc:
                results[i] = exc
                continue
            groups.setdefault(node.name if node else "", []).append(i)
        replies = await asyncio.gather(
            *(self._run_on([calls[i] for i in group]) for group in groups.values()),
            return_exceptions=True)
        for group, reply in zip(groups.values(), replies, strict=True):
            for n, i in enumerate(group):
                results[i] = reply if isinstance(reply, BaseException) else reply[n]
        return results

    async def _run_on(self, calls: Sequence[Call]) -> list[Any]:
        results = await self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Those entries did not run (a script is all or nothing): load, run just those.
            for script in self._all:  # on a cluster: on every primary that answers
                await self._client.script_load(script.script)
            again = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """EVALSHA each call in one round trip. (redis-py's Script objects in a pipeline
        would first ask SCRIPT EXISTS: a second round trip on every batch.)"""
        async with self._client.pipeline(transaction=False) as pipe:
            for call in calls:
                # execute_command: a cluster pipeline refuses its evalsha() helper, but
                # routes EVALSHA by its keys (every key of a call shares one slot).
                pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys,
                                     *call.args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


def _publishing(lua: str, sharded: bool) -> str:
    """The script publishing to the room channel as a cluster needs: SPUBLISH reaches the
    subscribers of the channel's shard only, where PUBLISH would be broadcast to every
    node."""
    return lua.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',") if sharded else lua
