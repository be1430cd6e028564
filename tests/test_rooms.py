"""Rooms, history and loss-free resume, presence, direct messages and the publish API,
on `chatserver --workers 2` with a real Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.chat_client import ResumingClient
from tests.support import (
    RedisServer,
    ServerProcess,
    of_type,
    open_ws,
    receive_until,
    scaled,
    sign_in,
)
from tests.test_cluster import connect_on_distinct_instances

ROOMS = ["alpha", "beta", "gamma"]


async def stored_ids(redis_url: str, room: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange(f"chat:history:{room}")
    finally:
        await client.aclose()
    return [entry_id.decode() for entry_id, _ in entries]


async def run_churn(server: ServerProcess, redis_url: str, sessions: list[aiohttp.ClientSession],
                    disruption: Callable[[], object] | None = None, *, clients: int = 10,
                    messages: int = 120, seed: int = 7) -> list[ResumingClient]:
    """K clients in R rooms; M messages flow; clients drop and resume at random moments;
    `disruption` runs mid-way. Returns the clients after traffic has settled."""
    rng = random.Random(seed)
    pool: list[ResumingClient] = []
    for i in range(clients):
        session = await sign_in(server, f"churn{i}")
        sessions.append(session)
        client = ResumingClient(session, lambda: server.ws_url, server.origin, ROOMS)
        await client.start()
        pool.append(client)
    await asyncio.gather(*(asyncio.wait_for(c.ready.wait(), scaled(20)) for c in pool))

    async def publisher(client: ResumingClient, count: int, offset: int) -> None:
        for n in range(count):
            await client.publish(rng.choice(["lobby", *ROOMS]), f"m{offset + n}")
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def churner() -> None:
        for step in range(12):
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            await rng.choice(pool).drop()
            if step == 5 and disruption is not None:
                result = disruption()
                if asyncio.iscoroutine(result):
                    await result

    per = messages // 4
    await asyncio.gather(*(publisher(pool[i], per, i * per) for i in range(4)), churner())
    await settle(pool, redis_url)
    return pool


async def settle(pool: list[ResumingClient], redis_url: str) -> None:
    """Wait until every client's last id in every room is the stream's last id."""
    async with asyncio.timeout(scaled(30)):
        while True:
            wanted = {room: await stored_ids(redis_url, room) for room in ["lobby", *ROOMS]}
            if all(c.ready.is_set() and all(c.last(r) == (ids[-1] if ids else None)
                                            for r, ids in wanted.items()) for c in pool):
                return
            await asyncio.sleep(0.1)


async def assert_exact(pool: list[ResumingClient], redis_url: str) -> None:
    for room in ["lobby", *ROOMS]:
        stored = await stored_ids(redis_url, room)
        assert stored, f"no traffic in {room}"
        for client in pool:
            assert client.received[room] == stored, f"{room}: client sequence differs from XRANGE"
    assert sum(c.duplicates for c in pool) == 0, [c.anomalies for c in pool if c.anomalies]
    assert not any(c.incomplete for c in pool)
    for client in pool:
        await client.stop()


async def test_churn_loses_and_duplicates_nothing(
    make_server: Callable[..., ServerProcess], redis_url: str, sessions: list[aiohttp.ClientSession]
) -> None:
    """Clients drop and resume at random while messages flow: each holds exactly XRANGE."""
    server = make_server(workers=2, redis_url=redis_url)
    pool = await run_churn(server, redis_url, sessions)
    assert len({i for c in pool for i in c.instances}) == 2, "clients should span both workers"
    await assert_exact(pool, redis_url)


async def test_churn_with_pubsub_connections_killed(
    make_server: Callable[..., ServerProcess], redis_server: RedisServer, redis_url: str,
    sessions: list[aiohttp.ClientSession]
) -> None:
    """CLIENT KILL TYPE pubsub mid-run: workers resubscribe and replay; nothing lost."""
    server = make_server(workers=2, redis_url=redis_url)
    pool = await run_churn(server, redis_url, sessions,
                           lambda: redis_server.command("CLIENT", "KILL", "TYPE", "pubsub"))
    await assert_exact(pool, redis_url)


async def test_churn_with_redis_restarted(
    make_server: Callable[..., ServerProcess], tmp_path: Path, sessions: list[aiohttp.ClientSession]
) -> None:
    """Redis restarted (with its data) mid-run: publishes retry, workers catch up; exact."""
    redis = PersistentRedis(tmp_path)
    redis.start()
    try:
        server = make_server(workers=2, redis_url=redis.url)

        async def restart() -> None:
            await asyncio.to_thread(redis.restart)

        pool = await run_churn(server, redis.url, sessions, restart)
        await assert_exact(pool, redis.url)
    finally:
        redis.stop()


class PersistentRedis(RedisServer):
    """A redis-server with an append-only file, so a restart keeps the streams."""

    def start(self) -> None:
        self.extra = ["--appendonly", "yes", "--appendfsync", "always"]
        super().start()

    def restart(self) -> None:
        self.command("SHUTDOWN")  # saves and exits
        assert self.proc is not None
        self.proc.wait(timeout=10)
        self.start()


async def test_resume_after_flushall_is_incomplete(
    make_server: Callable[..., ServerProcess], redis_server: RedisServer, redis_url: str,
    sessions: list[aiohttp.ClientSession]
) -> None:
    """A resume whose epoch Redis no longer has answers complete: false."""
    server = make_server(workers=1, redis_url=redis_url)
    session = await sign_in(server, "alice")
    sessions.append(session)
    ws = await open_ws(session, server)
    joined = await receive_until(ws, of_type("joined", room="lobby"))
    await ws.send_json({"type": "publish", "room": "lobby", "message": "before", "ref": "a"})
    ack = await receive_until(ws, of_type("ack"))
    await ws.close()
    redis_server.command("FLUSHALL")
    ws = await open_ws(session, server, f"?since={ack['id']}&epoch={joined['epoch']}")
    recovered = await receive_until(ws, of_type("recovered", room="lobby"))
    assert recovered["complete"] is False and recovered["epoch"] != joined["epoch"]
    # and an intact history resumes complete, with exactly the missed messages
    await ws.send_json({"type": "publish", "room": "lobby", "message": "one", "ref": "b"})
    first = await receive_until(ws, of_type("ack"))
    await ws.send_json({"type": "publish", "room": "lobby", "message": "two", "ref": "c"})
    await receive_until(ws, of_type("ack"))
    await ws.close()
    ws = await open_ws(session, server, f"?since={first['id']}&epoch={recovered['epoch']}")
    replayed = await receive_until(ws, of_type("message"))
    assert replayed["message"] == "two"
    assert (await receive_until(ws, of_type("recovered")))["complete"] is True


async def test_presence_across_workers_and_expiry(
    make_server: Callable[..., ServerProcess], redis_url: str, sessions: list[aiohttp.ClientSession]
) -> None:
    """Join/leave presence crosses workers; a SIGKILLed worker's members expire."""
    server = make_server(workers=2, redis_url=redis_url, env={"CHAT_PRESENCE_TTL": "3"})
    placed_a, placed_b = await connect_on_distinct_instances(server, sessions)
    a, b, b_sub = placed_a.ws, placed_b.ws, placed_b.sub
    await a.send_json({"type": "join", "room": "p"})
    await receive_until(a, of_type("joined", room="p"))
    await b.send_json({"type": "join", "room": "p"})
    await receive_until(b, of_type("joined", room="p"))
    event = await receive_until(a, lambda f: of_type("presence", room="p", event="join")(f)
                                and f["user"]["sub"] == b_sub)
    assert event["user"]["username"]
    await a.send_json({"type": "members", "room": "p"})
    members = await receive_until(a, of_type("members", room="p"))
    assert len(members["members"]) == 2 and b_sub in {m["sub"] for m in members["members"]}

    await b.send_json({"type": "leave", "room": "p"})
    await receive_until(b, of_type("left", room="p"))
    assert (await receive_until(a, of_type("presence", event="leave")))["user"]["sub"] == b_sub
    await b.send_json({"type": "join", "room": "p"})
    await receive_until(a, of_type("presence", event="join"))

    os.kill(int(placed_b.instance.rsplit(":", 1)[1]), signal.SIGKILL)
    gone = await receive_until(a, of_type("presence", event="leave"), timeout=30)
    assert gone["user"]["sub"] == b_sub
    await a.send_json({"type": "members", "room": "p"})
    members = await receive_until(a, of_type("members", room="p"))
    assert b_sub not in {m["sub"] for m in members["members"]}


async def test_direct_messages_across_workers(
    make_server: Callable[..., ServerProcess], redis_url: str, sessions: list[aiohttp.ClientSession]
) -> None:
    """A direct message reaches the recipient on another worker and the sender's other socket."""
    server = make_server(workers=2, redis_url=redis_url)
    a, b = await connect_on_distinct_instances(server, sessions)
    a_other = await open_ws(a.session, server)
    await receive_until(a_other, of_type("joined"))
    await a.ws.send_json({"type": "direct", "to": b.sub, "message": "psst", "ref": "d1"})
    got = await receive_until(b.ws, of_type("direct", message="psst"))
    assert got["from"] == a.sub and got["to"] == b.sub and got["username"]
    echo = await receive_until(a_other, of_type("direct", message="psst"))
    assert echo["id"] == got["id"]
    assert (await receive_until(a.ws, of_type("ack")))["ref"] == "d1"


async def test_publish_api_keys(
    make_server: Callable[..., ServerProcess], redis_url: str, sessions: list[aiohttp.ClientSession]
) -> None:
    """POST /api/rooms/{room}/messages: a good key delivers as the service; bad or none: 401."""
    key = "k" * 32
    server = make_server(workers=2, redis_url=redis_url, env={"CHAT_API_KEYS": f"billing:{key}"})
    session = await sign_in(server, "alice")
    sessions.append(session)
    ws = await open_ws(session, server)
    await receive_until(ws, of_type("joined"))
    url = f"{server.url}/api/rooms/lobby/messages"
    async with aiohttp.ClientSession() as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            async with api.post(url, json={"message": "x"}, headers=headers) as response:
                assert response.status == 401
        async with api.post(url, json={"message": "invoice paid"},
                            headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200
            message_id = (await response.json())["id"]
    got = await receive_until(ws, of_type("message"))
    assert got == {**got, "id": message_id, "user": "billing", "message": "invoice paid"}


@pytest.mark.parametrize("room", ["", "x" * 65, "bad/room"])
async def test_room_names_are_validated(make_server: Callable[..., ServerProcess], room: str,
                                        sessions: list[aiohttp.ClientSession]) -> None:
    """Room names outside 1-64 of [A-Za-z0-9_.-] get bad_request."""
    server = make_server()
    session = await sign_in(server, "alice")
    sessions.append(session)
    ws = await open_ws(session, server)
    await receive_until(ws, of_type("joined"))
    await ws.send_json({"type": "join", "room": room})
    assert (await receive_until(ws, of_type("error")))["code"] == "bad_request"
