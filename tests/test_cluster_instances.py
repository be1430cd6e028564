"""Two `chatserver --workers 2` instances on one Redis Cluster: 30 rooms with members on
both, each room's keys and shard subscriptions on the primary owning its slot, rooms
spread over all three primaries, and every message reaching every member once. Real
processes over real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from chatserver.protocol import parse_id
from tests.chat_client import ResumingClient, until_all
from tests.cluster_support import ClusterDeployment, cluster_command
from tests.support import ServerProcess, scaled, sign_in

ROOMS = [f"room-{n}" for n in range(30)]
READERS = 3  # per instance
MESSAGES = 3  # per room and publisher (one publisher per instance)
ROOM_KEYS = ("history", "epoch", "presence", "present")


async def test_rooms_live_on_their_slot_owner_and_every_member_gets_each_message_once(
    cluster_deployment: ClusterDeployment, cluster_url: str,
    make_server: Callable[..., ServerProcess], sessions: list[aiohttp.ClientSession],
) -> None:
    """30 rooms, members on both instances: each room's keys are on its slot's primary
    and nowhere else, every worker with a member in a room is subscribed there once,
    all three primaries hold rooms, every member holds exactly XRANGE."""
    env = {"CHAT_RATE": "100", "CHAT_BURST": "200", "CHAT_LOGIN_RATE": "100"}
    servers = [make_server(workers=2, redis_url=cluster_url, env=env) for _ in range(2)]
    readers: list[ResumingClient] = []
    publishers: list[ResumingClient] = []
    for s, server in enumerate(servers):
        for i in range(READERS + 1):
            session = await sign_in(server, f"user{s}-{i}")
            sessions.append(session)
            client = ResumingClient(session, lambda url=server.ws_url: url, server.origin,
                                    ROOMS)
            (readers if i < READERS else publishers).append(client)
    clients = [*readers, *publishers]
    for client in clients:
        await client.start()
    await asyncio.gather(*(asyncio.wait_for(c.ready.wait(), scaled(20)) for c in clients))
    workers = {c.instances[-1] for c in clients}
    # at least one worker of each instance (the kernel picks which worker a socket gets)
    assert len(workers) >= 2, workers

    async def publish_all(publisher: ResumingClient, name: str) -> list[tuple[str, str]]:
        return [(room, await publisher.publish(room, f"{name}-{room}-{n}"))
                for n in range(MESSAGES) for room in ROOMS]

    sent = await asyncio.wait_for(asyncio.gather(
        *(publish_all(p, f"p{i}") for i, p in enumerate(publishers))), scaled(60))
    acked = {room: sorted((i for r, i in [*sent[0], *sent[1]] if r == room), key=parse_id)
             for room in ROOMS}

    primaries = cluster_deployment.primaries()
    keys_on = {node.port: set(cluster_command(node, "KEYS", "chat:*")) for node in primaries}
    holders: dict[int, list[str]] = {node.port: [] for node in primaries}
    for room in ROOMS:
        owner = cluster_deployment.owner(f"chat:{{{room}}}:history")
        holders[owner.port].append(room)
        for kind in ROOM_KEYS:
            key = f"chat:{{{room}}}:{kind}"
            assert [p for p, keys in keys_on.items() if key in keys] == [owner.port], key
        channel = f"chat:{{{room}}}:room"
        for node in primaries:  # one subscription per worker, on the owner only
            _, count = cluster_command(node, "PUBSUB", "SHARDNUMSUB", channel)
            assert int(count) == (len(workers) if node is owner else 0), (room, node.port)
        stored = [i for i, _ in cluster_command(owner, "XRANGE", f"chat:{{{room}}}:history",
                                                "-", "+")]
        assert stored == acked[room], f"{room}: the stream is not what was acknowledged"
    assert all(holders.values()), holders  # rooms spread over every primary

    await until_all(clients, lambda: all(c.received[r] == acked[r]  # every member, all
                                         for c in clients for r in ROOMS))
    assert sum(c.duplicates for c in clients) == 0, [c.anomalies for c in clients]
    for client in clients:
        await client.stop()
    print(f"\ntwo instances: {len(workers)} workers, rooms per primary "
          f"{ {port: len(rooms) for port, rooms in holders.items()} }")
