"""Redis clients from a URL: the one place that knows how we connect (Sentinel and
Cluster modes slot in here), and how to stop a task that is inside redis-py."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

POOL_SIZE = 32  # command connections per worker
CANCEL_RETRY = 0.1  # seconds between cancellations of a task that has not stopped


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
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def pubsub_client(url: str) -> aioredis.Redis:
    """Pub/sub: no hidden retry; the listener owns reconnecting so it can replay gaps."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))


async def stop(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait for it. redis-py can swallow a cancellation (one that lands
    in a pooled command's connect or retry), so cancel again until the task is done."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_RETRY)
    with contextlib.suppress(asyncio.CancelledError):
        await task
