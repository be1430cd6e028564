"""The Redis broker's layout on a real cluster (three primaries, three replicas): a
room's keys and its shard channel live together on the primary owning its slot, and
rooms spread over every primary."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from chatserver import protocol
from chatserver.broker.redis import RedisBroker
from tests.cluster_support import ClusterDeployment

from .conftest import WAIT, RecordingSink

ROOMS = [f"room-{n}" for n in range(30)]


async def test_rooms_live_whole_on_their_primary_and_spread(
    cluster_deployment: ClusterDeployment, cluster_url: str
) -> None:
    """Each room's history, epoch and shard subscription are on one primary; every primary
    holds some rooms; every message reaches the subscriber once."""
    broker = RedisBroker(cluster_url, instance="worker-a", prefix="layout:")
    sink = RecordingSink()
    await broker.start(sink)
    try:
        for room in ROOMS:
            await broker.subscribe_room(room)
        tail = protocol.message_tail("x", "sub-a", "alice", "hi", 1_700_000_000_000)
        async with asyncio.timeout(WAIT):
            ids = await asyncio.gather(*(broker.publish(room, tail) for room in ROOMS))
        await sink.until(lambda: all(len(sink.ids(room)) == 1 for room in ROOMS))
        assert [sink.ids(room)[0] for room in ROOMS] == list(ids)
        holders: dict[int, set[str]] = {}
        for node in cluster_deployment.primaries():
            client = aioredis.Redis(host="127.0.0.1", port=node.port)
            try:
                keys = {k.decode() for k in await client.keys("layout:*")}
                channels = {c.decode() for c in await client.pubsub_shardchannels("layout:*")}
            finally:
                await client.aclose()
            rooms = {room for room in ROOMS if f"layout:{{{room}}}:history" in keys}
            for room in rooms:
                assert f"layout:{{{room}}}:epoch" in keys
                assert f"layout:{{{room}}}:room" in channels  # subscribed where it lives
            assert channels <= {f"layout:{{{room}}}:room" for room in rooms}
            holders[node.port] = rooms
        assert len(holders) == 3 and all(holders.values()), holders  # spread over all three
        assert sorted(r for rooms in holders.values() for r in rooms) == sorted(ROOMS)
    finally:
        await broker.close()
