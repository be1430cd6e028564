"""Every Redis key and channel name the broker uses, all under one prefix."""

from __future__ import annotations


class Keys:
    """Names for one deployment's prefix (e.g. "chat:"); nothing else spells a key."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # Received channel names are matched as bytes, without decoding every message.
        self.room_channel_prefix = f"{prefix}room:".encode()
        self.user_channel_prefix = f"{prefix}users:".encode()

    def stream(self, room: str) -> str:
        """The room's history (a stream); its ids are the message ids."""
        return f"{self.prefix}history:{room}"

    def epoch(self, room: str) -> str:
        """The room's history epoch: a new one means the history was lost."""
        return f"{self.prefix}epoch:{room}"

    def presence(self, room: str) -> str:
        """Sorted set of "sub\\tinstance\\tusername" scored by expiry."""
        return f"{self.prefix}presence:{room}"

    def present(self, room: str) -> str:
        """Hash sub -> number of instances that have the user in the room."""
        return f"{self.prefix}present:{room}"

    def room_channel(self, room: str) -> str:
        return f"{self.prefix}room:{room}"

    def user_channel(self, shard: int) -> str:
        return f"{self.prefix}users:{shard}"

    def instance_channel(self, instance: str) -> str:
        """Always subscribed, so the pub/sub connection exists (and is pinged) even while
        this worker has no room or user."""
        return f"{self.prefix}instance:{instance}"

    def room_of(self, channel: bytes) -> str | None:
        """The room of a room channel, or None for any other channel."""
        if channel.startswith(self.room_channel_prefix):
            return channel[len(self.room_channel_prefix) :].decode()
        return None

    def shard_of(self, channel: bytes) -> int | None:
        """The shard of a user channel, or None for any other channel."""
        if channel.startswith(self.user_channel_prefix):
            return int(channel[len(self.user_channel_prefix) :])
        return None
