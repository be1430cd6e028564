"""Redis clients from a URL: the one place that knows how we connect (Sentinel and
Cluster modes slot in here)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

POOL_SIZE = 32  # command connections per worker


def command_client(url: str) -> aioredis.Redis:
    """Commands: a bounded pool (a burst of joins queues instead of opening hundreds of
    connections), a short retry, then the caller hears `unavailable`."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        health_check_interval=15,
    )
    return aioredis.Redis(connection_pool=pool)


def pubsub_client(url: str) -> aioredis.Redis:
    """Pub/sub: no hidden retry; the listener owns reconnecting so it can replay gaps."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
