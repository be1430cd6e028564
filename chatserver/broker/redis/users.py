"""Per-user traffic (direct messages, sign-out): the shard channel a user rides, the
envelope that names the user inside it, and which shards this worker needs."""

from __future__ import annotations

import asyncio
import zlib

USER_SHARDS = 256
MAX_SUB_BYTES = 255  # the envelope gives the sub's length one byte


def user_shard(sub: str) -> int:
    """A worker subscribes the shards of its users (all of them, soon, on a busy worker)
    instead of a channel per user, so a connect storm sends no SUBSCRIBE per connection.
    Stable across processes (crc32, not hash())."""
    return zlib.crc32(sub.encode()) % USER_SHARDS


def envelope(sub: str, payload: bytes) -> bytes:
    """`len(sub)` as one byte, the sub, the payload: no sub or payload can forge another
    user's envelope (a separator could be smuggled into either)."""
    name = sub.encode()
    if len(name) > MAX_SUB_BYTES:
        raise ValueError(f"sub longer than {MAX_SUB_BYTES} bytes")
    return bytes((len(name),)) + name + payload


def open_envelope(data: bytes) -> tuple[str, bytes] | None:
    """(sub, payload) of an envelope, or None when it is not one (truncated, not UTF-8)."""
    if not data:
        return None
    end = 1 + data[0]
    if len(data) < end:
        return None
    try:
        return data[1:end].decode(), data[end:]
    except UnicodeDecodeError:
        return None


class UserShards:
    """This worker's users and the shards they need; a shard's first user waits until
    Redis confirmed its subscription, so nothing sent after the welcome is missed."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self._count: dict[int, int] = {}  # shard -> local users in it
        self._ready: dict[int, asyncio.Future[None]] = {}  # resolved on confirmation

    def __contains__(self, sub: str) -> bool:
        return sub in self.users

    @property
    def shards(self) -> list[int]:
        return list(self._count)

    def add(self, sub: str) -> tuple[asyncio.Future[None], bool]:
        """Count a new local user: its shard's confirmation, and whether the shard is new
        (then the caller subscribes it)."""
        self.users.add(sub)
        shard = user_shard(sub)
        self._count[shard] = self._count.get(shard, 0) + 1
        ready = self._ready.get(shard)
        if ready is not None:
            return ready, False
        ready = self._ready[shard] = asyncio.get_running_loop().create_future()
        return ready, True

    def remove(self, sub: str) -> int | None:
        """Forget a local user; the shard to unsubscribe when it was the shard's last."""
        if sub not in self.users:
            return None
        self.users.discard(sub)
        shard = user_shard(sub)
        self._count[shard] -= 1
        if self._count[shard]:
            return None
        del self._count[shard]
        self._ready.pop(shard, None)
        return shard

    def confirmed(self, shard: int) -> None:
        ready = self._ready.get(shard)
        if ready is not None and not ready.done():
            ready.set_result(None)
