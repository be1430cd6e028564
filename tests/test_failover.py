"""`chatserver --workers 2` on Sentinel, and on a Redis Cluster, while a primary is
SIGKILLed under load: the replica's promotion is followed, every publish is answered (ack
or `unavailable`, never silence), and every subscriber ends holding exactly the room's
stream on the new primary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.chat_client import Publisher, readers_on_both_workers
from tests.cluster_support import ClusterDeployment, start_cluster_deployment
from tests.sentinel_support import SentinelDeployment
from tests.support import RedisServer, ServerProcess, scaled, sign_in, wait_for

ROOMS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
RATE = 20.0  # publishes a second, per room
RESUME_BOUND = 15.0  # seconds from the kill until every room's publishes are acked again


class SentinelTarget:
    """The Sentinel deployment as the test drives it: kill the primary, await the new."""

    def __init__(self, deployment: SentinelDeployment) -> None:
        self.deployment, self.url = deployment, deployment.url

    async def victim(self) -> RedisServer:
        return self.deployment.current_primary()

    def wait_promoted(self, old: RedisServer) -> float:
        return self.deployment.wait_promoted(old)[1]

    async def stream_ids(self, room: str) -> list[str]:
        client = aioredis.Redis(host="127.0.0.1", port=self.deployment.current_primary().port)
        try:
            return [i.decode() for i, _ in await client.xrange(f"chat:history:{room}")]
        finally:
            await client.aclose()


class ClusterTarget:
    """The cluster as the test drives it: kill the primary owning the first room."""

    def __init__(self, deployment: ClusterDeployment) -> None:
        self.deployment, self.url = deployment, deployment.url
        self.seed = deployment.nodes[0]

    async def _client(self, node: RedisServer) -> RedisCluster:
        client = RedisCluster(host="127.0.0.1", port=node.port)
        await client.initialize()
        return client

    async def victim(self) -> RedisServer:
        client = await self._client(self.seed)
        try:
            owner = client.get_node_from_key(f"chat:{{{ROOMS[0]}}}:history")
        finally:
            await client.aclose()
        assert owner is not None
        victim = next(n for n in self.deployment.nodes if n.port == int(owner.port))
        self.seed = next(n for n in self.deployment.nodes if n is not victim)
        return victim

    def wait_promoted(self, old: RedisServer) -> float:
        started = time.monotonic()
        live = [n for n in self.deployment.nodes if n is not old]

        def promoted() -> bool:
            for node in live:
                lines = node.command("CLUSTER", "NODES").split(b"\n")
                dead = [line for line in lines if f"127.0.0.1:{old.port}@".encode() in line]
                if not dead or b"fail" not in dead[0] or b"fail?" in dead[0]:
                    return False  # not yet agreed dead
                if b"cluster_state:ok" not in node.command("CLUSTER", "INFO"):
                    return False  # its slots not yet served by the promoted replica
            return True

        wait_for(promoted, 20, "the cluster to promote a replica")
        return time.monotonic() - started

    async def stream_ids(self, room: str) -> list[str]:
        client = await self._client(self.seed)
        try:
            return [i.decode() for i, _ in await client.xrange(f"chat:{{{room}}}:history")]
        finally:
            await client.aclose()


Target = SentinelTarget | ClusterTarget


@pytest.fixture(params=["sentinel", "cluster"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A deployment of this test's own (it loses a primary): Sentinel or a cluster."""
    if request.param == "sentinel":
        sentinel: SentinelDeployment = request.getfixturevalue("make_sentinel")()
        yield SentinelTarget(sentinel)
        return
    cluster = start_cluster_deployment(tmp_path / "cluster")
    try:
        yield ClusterTarget(cluster)
    finally:
        cluster.stop()


async def readiness(server: ServerProcess, seen: Counter[int], stop: asyncio.Event) -> None:
    """Samples /readyz (whichever worker answers) until stopped."""
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.get(f"{server.url}/readyz") as response:
                    seen[response.status] += 1
            except aiohttp.ClientError:
                seen[0] += 1
            await asyncio.sleep(0.1)


async def test_primary_killed_under_load_loses_and_duplicates_nothing(
    target: Target, make_server: Callable[..., ServerProcess],
    sessions: list[aiohttp.ClientSession],
) -> None:
    """Publishers at 20 msg/s in 6 rooms; a primary is SIGKILLed; publishes resume within
    15 s, every one was answered, every subscriber holds exactly XRANGE, no duplicate."""
    # 20 msg/s per publisher is past the default per-connection rate (10/s), and 12
    # sign-ins from one address past the default sign-in rate.
    server = make_server(workers=2, redis_url=target.url,
                         env={"CHAT_RATE": "50", "CHAT_BURST": "100", "CHAT_LOGIN_RATE": "100"})
    pool = await readers_on_both_workers(server, sessions, ROOMS)
    publishers: list[Publisher] = []
    for room in ROOMS:
        session = await sign_in(server, f"writer-{room}")
        sessions.append(session)
        publishers.append(Publisher(session, lambda: server.ws_url, server.origin, [room]))
    for client in publishers:
        await client.start()
    await asyncio.gather(*(asyncio.wait_for(c.ready.wait(), scaled(20)) for c in publishers))

    outcomes: Counter[str] = Counter()
    acked: dict[str, list[str]] = {room: [] for room in ROOMS}
    first_ack_after: dict[str, float] = {}  # room -> seconds from the kill to its first
    refused: set[str] = set()  # ack after a refusal (rooms refused since the kill)
    refusals: Counter[str] = Counter()
    killed, resumed = asyncio.Event(), asyncio.Event()  # resumed: another room acked again
    kill_time = 0.0
    stop = asyncio.Event()

    async def publish_one(publisher: Publisher, room: str, n: int) -> None:
        outcome, message_id = await publisher.publish_once(room, f"{room}-{n}")
        outcomes[outcome] += 1
        if message_id is None:
            if killed.is_set():
                refused.add(room)
                refusals[room] += 1
        else:
            acked[room].append(message_id)
            if room in refused and room not in first_ack_after:
                first_ack_after[room] = time.monotonic() - kill_time
                resumed.set()

    async def publish_loop(publisher: Publisher, room: str) -> None:
        """RATE a second on a fixed beat, each publish awaiting its own answer."""
        sent: list[asyncio.Task[None]] = []
        started = time.monotonic()
        while not stop.is_set():
            sent.append(asyncio.create_task(publish_one(publisher, room, len(sent))))
            await asyncio.sleep(max(0.0, started + len(sent) / RATE - time.monotonic()))
        await asyncio.gather(*sent)

    ready_seen: Counter[int] = Counter()
    loops = [asyncio.create_task(publish_loop(p, room)) for p, room in zip(publishers, ROOMS,
                                                                          strict=True)]
    watcher = asyncio.create_task(readiness(server, ready_seen, stop))
    try:
        await asyncio.sleep(2)  # traffic before the kill (pacing, not waiting for an event)
        old = await target.victim()
        before = {room: len(ids) for room, ids in acked.items()}
        kill_time = time.monotonic()
        old.kill()
        killed.set()
        promoted_after = await asyncio.to_thread(target.wait_promoted, old)
        async with asyncio.timeout(scaled(RESUME_BOUND)):  # every refused room acked again
            while not (refused and refused <= first_ack_after.keys()):
                resumed.clear()
                await resumed.wait()
        await asyncio.sleep(2)  # traffic after the switch
    finally:
        stop.set()
        await asyncio.gather(*loops, watcher)
    resume = max(first_ack_after.values())
    assert resume < scaled(RESUME_BOUND)
    assert outcomes["silent"] == 0, outcomes  # every publish was answered
    assert outcomes["unavailable"] > 0, outcomes  # the switch was seen, and said so
    assert all(len(acked[r]) > before[r] for r in ROOMS)

    stored = {room: await target.stream_ids(room) for room in ROOMS}
    lost = {room: sorted(set(acked[room]) - set(stored[room])) for room in ROOMS}
    assert not any(lost.values()), f"acknowledged but not on the new primary: {lost}"
    async with asyncio.timeout(scaled(30)):  # every reader caught up with the stream
        while True:
            if all(c.ready.is_set() and c.last(r) == stored[r][-1] for c in pool for r in ROOMS):
                break
            await asyncio.sleep(0.1)
    for client in pool:
        for room in ROOMS:
            assert client.received[room] == stored[room], f"{room}: differs from XRANGE"
    assert sum(c.duplicates for c in pool) == 0, [c.anomalies for c in pool if c.anomalies]
    assert not any(c.incomplete for c in pool)
    assert ready_seen[503] > 0 and ready_seen[200] > 0, ready_seen  # /readyz saw the switch
    for client in [*pool, *publishers]:
        await client.stop()
    print(f"\n{type(target).__name__} failover: {len(refused)} rooms refused, promoted after {promoted_after:.2f}s, publishes resumed "
          f"after {resume:.2f}s (per room {first_ack_after}), outcomes {dict(outcomes)}, "
          f"acked-but-lost {sum(len(v) for v in lost.values())}, readyz {dict(ready_seen)}, "
          f"refusals per room {dict(refusals)}")
