"""Every Redis key and channel name the broker uses, all under one prefix. On a Redis
Cluster a room's keys and channel share a hash tag, `{prefix}{room}:...`, so each script
touches one slot and rooms spread over the shards."""

from __future__ import annotations


class Keys:
    """Names for one deployment's prefix (e.g. "chat:"); nothing else spells a key."""

    def __init__(self, prefix: str, *, sharded: bool = False) -> None:
        if sharded and ("{" in prefix or "}" in prefix):
            raise ValueError("a cluster's key prefix may not hold { or }: they pick the slot")
        self.prefix = prefix
        self.sharded = sharded  # a cluster: hash-tagged room names, SPUBLISH for rooms
        # Received channel names are matched as bytes, without decoding every message.
        room_prefix = f"{prefix}{{" if sharded else f"{prefix}room:"
        self.room_channel_prefix = room_prefix.encode()
        self._room_channel_suffix = b"}:room" if sharded else b""
        self.user_channel_prefix = f"{prefix}users:".encode()

    def _room(self, kind: str, room: str) -> str:
        return f"{self.prefix}{{{room}}}:{kind}" if self.sharded else f"{self.prefix}{kind}:{room}"

    def stream(self, room: str) -> str:
        """The room's history (a stream); its ids are the message ids."""
        return self._room("history", room)

    def epoch(self, room: str) -> str:
        """The room's history epoch: a new one means the history was lost."""
        return self._room("epoch", room)

    def presence(self, room: str) -> str:
        """Sorted set of "sub\\tinstance\\tusername" scored by expiry."""
        return self._room("presence", room)

    def present(self, room: str) -> str:
        """Hash sub -> number of instances that have the user in the room."""
        return self._room("present", room)

    def room_channel(self, room: str) -> str:
        return self._room("room", room)

    def user_channel(self, shard: int) -> str:
        return f"{self.prefix}users:{shard}"

    def instance_channel(self, instance: str) -> str:
        """Always subscribed, so the pub/sub connection exists (and is pinged) even while
        this worker has no room or user."""
        return f"{self.prefix}instance:{instance}"

    def room_of(self, channel: bytes) -> str | None:
        """The room of a room channel, or None for any other channel."""
        if channel.startswith(self.room_channel_prefix) and channel.endswith(
                self._room_channel_suffix):
            end = len(channel) - len(self._room_channel_suffix)
            return channel[len(self.room_channel_prefix) : end].decode()
        return None

    def shard_of(self, channel: bytes) -> int | None:
        """The shard of a user channel, or None for any other channel."""
        if channel.startswith(self.user_channel_prefix):
            return int(channel[len(self.user_channel_prefix) :])
        return None
