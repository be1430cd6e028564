"""Redis clients from a URL: the one place that knows how we connect (one node, the
primary Sentinel names, found again after a failover, or a Redis Cluster), and how to
stop a task that is inside redis-py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import redis.asyncio as aioredis
from redis import Redis as SyncRedis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from ...redis_urls import RedisTarget, parse_target

POOL_SIZE = 32  # command connections per worker
OUTBOX_POOL_SIZE = 2  # the outbox's own: one batch in flight, one to reload scripts
CANCEL_RETRY = 0.1  # seconds between cancellations of a task that has not stopped
SENTINEL_TIMEOUT = 1.0  # seconds a sentinel may take to answer; the next one is asked then

RedisClient = aioredis.Redis | RedisCluster  # what command_client returns
# What a call may raise when Redis is unreachable or, on a cluster, a slot has no primary
# while a replica is promoted (redis-py raises that outside RedisError).
REDIS_FAILURES = (TimeoutError, RedisError, OSError, RedisClusterException)


def command_client(url: str, pool_size: int = POOL_SIZE) -> RedisClient:
    """Commands: a bounded pool (a burst of joins queues instead of opening hundreds of
    connections), a short retry, then the caller hears `unavailable`."""
    options: dict[str, Any] = {
        "max_connections": pool_size, "timeout": 5, "socket_connect_timeout": 2,
        "socket_timeout": 5, "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        "health_check_interval": 15,
    }
    target = parse_target(url)
    if target.mode == "cluster":
        return cluster_client(target)
    if target.mode == "sentinel":
        client: aioredis.Redis = _sentinel(target).master_for(
            target.master, redis_class=SentinelClient,
            connection_pool_class=BlockingSentinelPool, **options)
        return client
    pool = BlockingConnectionPool.from_url(url, **options)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def cluster_client(target: RedisTarget) -> RedisCluster:
    """Commands on a cluster: the slot map is read from the seed nodes and refreshed on
    MOVED or a failed node; a command is retried a few times while a replica is promoted,
    then the caller hears `unavailable`. (redis-py's cluster has no blocking pool: past
    POOL_SIZE connections to one node a command fails instead of queueing.)"""
    return FailoverCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username, password=target.password, max_connections=POOL_SIZE,
        socket_connect_timeout=2, socket_timeout=5, require_full_coverage=True,
        retry=AsyncRetry(ExponentialBackoff(cap=0.2, base=0.02), 3),
    )


class FailoverCluster(RedisCluster):
    """RedisCluster that survives losing its default node. redis-py 8.1 re-reads its
    command table from the default node on every re-initialization; when that node is
    the primary that died, re-initializing fails until the dead node leaves the slot map,
    which it does not while it is the default, so the client never recovers. The table
    does not change with the topology: after the first read only the slot map is
    re-read."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        if not (self._initialize and self.commands_parser.commands):
            return await super().initialize(*args, **kwargs)
        if not self._lock:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._initialize:
                await self.nodes_manager.initialize(*args, **kwargs)
                self._initialize = False
        return self


def cluster_mode_refused(target: RedisTarget) -> str | None:
    """At start-up, before any worker: why a cluster URL names no cluster (a seed node
    answering with cluster mode off), or None. Unreachable seeds are no verdict: Redis
    may come up after us, and the workers wait for it."""
    for host, port in target.nodes:
        client = SyncRedis(host=host, port=port, username=target.username,
                           password=target.password, socket_timeout=1,
                           socket_connect_timeout=1)
        try:
            enabled = client.info("cluster").get("cluster_enabled")
        except RedisError:
            continue
        finally:
            client.close()
        if not enabled:
            return f"{host}:{port} has cluster mode off: use redis:// for one node"
    return None


def node_pubsub_client(target: RedisTarget, host: str, port: int) -> aioredis.Redis:
    """Pub/sub on one cluster node (sharded channels live on the node owning their
    slot); like pubsub_client, no hidden retry."""
    return aioredis.Redis(host=host, port=port, username=target.username,
                          password=target.password, socket_connect_timeout=2,
                          retry=AsyncRetry(NoBackoff(), 0))


def pubsub_client(url: str) -> aioredis.Redis:
    """Pub/sub: no hidden retry; the listener owns reconnecting so it can replay gaps."""
    options: dict[str, Any] = {"socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 0)}
    target = parse_target(url)
    if target.mode == "sentinel":
        sub: aioredis.Redis = _sentinel(target).master_for(
            target.master, redis_class=SentinelClient, **options)
        return sub
    if target.mode == "cluster":
        # Classic PUBLISH on a cluster reaches every node, so one node serves a listener
        # of broadcasts (the denylist's; rooms use shard channels, cluster_listener.py).
        # Each call takes the next seed: a listener that reconnects moves off a dead one.
        host, port = target.nodes[next(_seeds) % len(target.nodes)]
        return aioredis.Redis(host=host, port=port, username=target.username,
                              password=target.password, **options)
    return aioredis.Redis.from_url(url, **options)


_seeds = itertools.count()


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's connections through Sentinel, bounded like the one-node pool: a
    caller past the bound waits for a connection instead of failing at once."""


class SentinelClient(aioredis.Redis):
    """A client of the primary that also closes the sentinel connections it asked."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        pool = self.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def _sentinel(target: RedisTarget) -> Sentinel:
    """Sentinels are asked in turn (a dead one costs SENTINEL_TIMEOUT); every new
    connection asks for the primary's address, so a failover is followed on reconnect,
    and a connection to a demoted primary (READONLY) is dropped by redis-py."""
    return Sentinel(  # type: ignore[no-untyped-call]
        list(target.nodes),
        sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT,
                         "socket_connect_timeout": SENTINEL_TIMEOUT},
        db=target.db, username=target.username, password=target.password,
    )


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
