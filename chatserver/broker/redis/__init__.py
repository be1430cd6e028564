"""The Redis broker: history streams, pub/sub fan-out and presence, one concept per module
(keys, scripts, client, listener, outbox, users, presence), tied together in broker.py."""

from .broker import RedisBroker
from .users import user_shard

__all__ = ["RedisBroker", "user_shard"]
