"""The Redis broker through Sentinel when the primary dies: calls fail fast while there
is no primary, the replica's promotion is followed, and the room's gap is replayed from
the stream the new primary holds, in order and without a duplicate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from chatserver import protocol
from chatserver.broker.base import BrokerUnavailable
from chatserver.broker.redis import RedisBroker
from chatserver.protocol import message_id_of
from tests.sentinel_support import SentinelDeployment
from tests.support import scaled

from .conftest import WAIT, RecordingSink

RESUME_BOUND = 15.0  # seconds from the kill until publishes are acknowledged again


def tail(n: int) -> bytes:
    return protocol.message_tail("r", "sub-alice", "alice", f"message {n}", 1_700_000_000_000)


async def publish_until_acked(broker: RedisBroker, n: int, deadline: float) -> tuple[str, int]:
    """Publish message n until acknowledged; its id and how many tries said unavailable."""
    refused = 0
    while time.monotonic() < deadline:
        try:
            return await asyncio.wait_for(broker.publish("r", tail(n)), WAIT), refused
        except BrokerUnavailable:
            refused += 1
            await asyncio.sleep(0.1)
    raise AssertionError(f"message {n} not acknowledged {RESUME_BOUND}s after the kill")


async def test_failover_is_followed_and_the_gap_replayed(
    make_sentinel: Callable[[], SentinelDeployment],
) -> None:
    """Primary SIGKILLed: publishes say unavailable (never hang), the promoted replica is
    found, and the subscriber ends holding exactly the new primary's stream."""
    deployment = make_sentinel()
    lost = asyncio.Event()
    broker = RedisBroker(deployment.url, instance="worker-a", prefix="t:",
                         on_reconnect=lost.set)
    sink = RecordingSink()
    await broker.start(sink)
    try:
        await broker.subscribe_room("r")
        before = [await broker.publish("r", tail(n)) for n in range(5)]
        await sink.until(lambda: sink.ids("r") == before)
        old = deployment.current_primary()
        killed = time.monotonic()
        old.kill()
        async with asyncio.timeout(WAIT):
            await lost.wait()
        deadline = killed + scaled(RESUME_BOUND)
        acked, refused = [], 0
        for n in range(5, 15):
            message_id, tries = await publish_until_acked(broker, n, deadline)
            acked.append(message_id)
            refused += tries
        new, _ = await asyncio.to_thread(deployment.wait_promoted, old)
        assert new is not old and refused > 0  # the switch was seen, and answered
        client = aioredis.Redis(host="127.0.0.1", port=new.port)
        try:
            stored = [i.decode() for i, _ in await client.xrange("t:history:r")]
        finally:
            await client.aclose()
        assert stored == before + acked  # nothing acknowledged is missing
        await sink.until(lambda: len(sink.ids("r")) >= len(stored))
        assert sink.ids("r") == stored
        replay = await broker.history("r", before[-1], await broker.epoch("r"))
        assert replay.complete and [message_id_of(f) for f in replay.frames] == acked
    finally:
        await broker.close()
