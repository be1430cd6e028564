"""A room's hash slot moved to another primary while `chatserver --workers 2` has members
in it and publishes continue (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE,
the steps of `redis-cli --cluster reshard`): the room keeps working, its keys and its
shard subscriptions end up on the new primary, and every member holds the room's stream
exactly once. Real processes over real sockets, on a cluster of this test's own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.chat_client import Publisher, readers_on_both_workers, until_all
from tests.cluster_support import (
    ClusterDeployment,
    assign_slot,
    begin_migration,
    cluster_command,
    move_keys,
    start_cluster_deployment,
)
from tests.support import RedisServer, ServerProcess, scaled, sign_in

MOVED, STAYS = "alpha", "beta"  # the room whose slot moves, and one whose slot does not
ROOMS = [MOVED, STAYS]
RATE = 20.0  # publishes a second, per room
DURING = 10  # publishes acked in each phase of the migration (0.5 s at RATE)
AFTER = 40  # publishes acked after the move (2 s at RATE)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterDeployment]:
    """A cluster of this test's own: its slot map is changed."""
    deployment = start_cluster_deployment(tmp_path / "cluster")
    try:
        yield deployment
    finally:
        deployment.stop()


class Traffic:
    """Publishers at RATE a second per room; every publish's answer is counted, and the
    test awaits acknowledgements instead of sleeping."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.acked: dict[str, list[str]] = {room: [] for room in ROOMS}
        self.stop = asyncio.Event()
        self._progress = asyncio.Condition()

    async def run(self, publisher: Publisher, room: str) -> None:
        sent: list[asyncio.Task[None]] = []
        started = time.monotonic()
        while not self.stop.is_set():
            sent.append(asyncio.create_task(self._one(publisher, room, len(sent))))
            await asyncio.sleep(max(0.0, started + len(sent) / RATE - time.monotonic()))
        await asyncio.gather(*sent)

    async def _one(self, publisher: Publisher, room: str, n: int) -> None:
        outcome, message_id = await publisher.publish_once(room, f"{room}-{n}")
        self.outcomes[outcome] += 1
        if message_id is not None:
            self.acked[room].append(message_id)
        async with self._progress:
            self._progress.notify_all()

    async def acks(self, room: str, count: int, timeout: float = 10) -> None:
        """Until `room` has `count` acknowledged publishes."""
        try:
            async with asyncio.timeout(scaled(timeout)), self._progress:
                await self._progress.wait_for(lambda: len(self.acked[room]) >= count)
        except TimeoutError:
            raise AssertionError(f"{room}: {len(self.acked[room])} of {count} acked in "
                                 f"{timeout} s; answers {dict(self.outcomes)}") from None


def shard_subscribers(node: RedisServer, channel: str) -> int:
    _, count = cluster_command(node, "PUBSUB", "SHARDNUMSUB", channel)
    return int(count)


async def until_subscribers(node: RedisServer, channel: str, count: int) -> None:
    """Until `node` counts `count` shard subscriptions to `channel` (another process's
    state: nothing to await but the next answer)."""
    async with asyncio.timeout(scaled(10)):
        while shard_subscribers(node, channel) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_room_slot_moved_while_members_connected_loses_nothing(
    cluster: ClusterDeployment, make_server: Callable[..., ServerProcess],
    sessions: list[aiohttp.ClientSession],
) -> None:
    """Members on both workers, 20 publishes/s per room; the moved room's slot migrates
    to another primary (with publishes acked in each phase, some by ASK while nobody
    listens there): every publish is acknowledged, the room's keys and both workers'
    shard subscriptions move to the new primary, every member holds XRANGE once."""
    server = make_server(workers=2, redis_url=cluster.url,
                         env={"CHAT_RATE": "50", "CHAT_BURST": "100", "CHAT_LOGIN_RATE": "100"})
    publishers: list[Publisher] = []
    for room in ROOMS:
        session = await sign_in(server, f"writer-{room}")
        sessions.append(session)
        publishers.append(Publisher(session, lambda: server.ws_url, server.origin, [room]))
    readers = await readers_on_both_workers(server, sessions, ROOMS)
    for client in publishers:
        await client.start()
    await asyncio.gather(*(asyncio.wait_for(c.ready.wait(), scaled(20)) for c in publishers))

    key, channel = f"chat:{{{MOVED}}}:history", f"chat:{{{MOVED}}}:room"
    slot, source = cluster.keyslot(key), cluster.owner(key)
    target = next(n for n in cluster.primaries() if n is not source)
    stays_on = cluster.owner(f"chat:{{{STAYS}}}:history")
    await until_subscribers(source, channel, 2)  # one subscription per worker

    traffic = Traffic()
    loops = [asyncio.create_task(traffic.run(p, room))
             for p, room in zip(publishers, ROOMS, strict=True)]
    try:
        await traffic.acks(MOVED, 20)
        await asyncio.to_thread(begin_migration, slot, source, target)
        # The source keeps serving the room's keys while the slot is migrating.
        await traffic.acks(MOVED, len(traffic.acked[MOVED]) + DURING)
        moved_keys = await asyncio.to_thread(move_keys, slot, source, target)
        # Keys moved, slot not yet handed over: publishes reach the new primary by ASK and
        # its SPUBLISH finds no subscriber there; members get these only by the replay
        # after their workers resubscribe.
        await traffic.acks(MOVED, len(traffic.acked[MOVED]) + DURING)
        await asyncio.to_thread(assign_slot, slot, target, cluster.primaries())
        moved_at = len(traffic.acked[MOVED])
        await traffic.acks(MOVED, moved_at + AFTER)  # MOVED followed to the new primary
        await traffic.acks(STAYS, len(traffic.acked[STAYS]) + AFTER // 2)
    finally:
        traffic.stop.set()
        await asyncio.gather(*loops)

    assert set(traffic.outcomes) == {"ack"}, traffic.outcomes  # nothing refused or silent
    assert moved_keys >= 2  # the stream and its epoch at least, presence too
    assert int(cluster_command(source, "CLUSTER", "COUNTKEYSINSLOT", slot)) == 0
    assert int(cluster_command(target, "CLUSTER", "COUNTKEYSINSLOT", slot)) == moved_keys
    room_keys = [f"chat:{{{MOVED}}}:{kind}" for kind in ("history", "epoch", "presence", "present")]
    assert cluster_command(target, "EXISTS", *room_keys) == len(room_keys)
    assert cluster.owner(key) is target and cluster.owner(f"chat:{{{STAYS}}}:history") is stays_on

    stored = {room: [i for i, _ in cluster_command(cluster.owner(f"chat:{{{room}}}:history"),
                                                   "XRANGE", f"chat:{{{room}}}:history", "-", "+")]
              for room in ROOMS}
    for room in ROOMS:
        assert set(traffic.acked[room]) <= set(stored[room]), f"{room}: acked but not stored"
    await until_all(readers, lambda: all(c.ready.is_set() and c.last(r) == stored[r][-1]
                                         for c in readers for r in ROOMS))
    for client in readers:
        for room in ROOMS:
            assert client.received[room] == stored[room], f"{room}: differs from XRANGE"
    assert sum(c.duplicates for c in readers) == 0, [c.anomalies for c in readers]
    assert not any(c.incomplete for c in readers)
    # Both workers' listeners resubscribed the room on its new primary, none stayed behind.
    await until_subscribers(target, channel, 2)
    assert shard_subscribers(source, channel) == 0
    for client in [*readers, *publishers]:
        await client.stop()
    print(f"\nresharding: slot {slot} of {MOVED!r} moved {source.port} -> {target.port} "
          f"({moved_keys} keys) after {moved_at} acks; outcomes {dict(traffic.outcomes)}")
