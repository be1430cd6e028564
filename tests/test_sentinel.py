"""`chatserver --workers 2` on Sentinel while the primary is SIGKILLed under load: the
replica's promotion is followed, every publish is answered (ack or `unavailable`, never
silence), and every subscriber ends holding exactly the room's stream on the new primary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from tests.chat_client import ResumingClient
from tests.sentinel_support import SentinelDeployment
from tests.support import RedisServer, ServerProcess, scaled, sign_in

ROOMS = ["alpha", "beta", "gamma"]
RATE = 20.0  # publishes a second, per room
RESUME_BOUND = 15.0  # seconds from the kill until every room's publishes are acked again
REPLY_WAIT = 5.0  # seconds a publish may wait for its answer before it counts as silent


class Publisher(ResumingClient):
    """A resuming client that publishes once per call and says how it was answered."""

    async def publish_once(self, room: str, text: str) -> tuple[str, str | None]:
        """("ack", id), ("unavailable", None), ("closed", None) when the socket went away
        before an answer, ("silent", None) when an open socket never answered."""
        if not self.ready.is_set():
            return "closed", None
        ws, ref = self.ws, f"p{next(self._refs)}"
        assert ws is not None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._acks[ref] = future
        try:
            await ws.send_json({"type": "publish", "room": room, "message": text, "ref": ref})
            reply = await asyncio.wait_for(future, scaled(REPLY_WAIT))
        except (ConnectionError, aiohttp.ClientError):
            return "closed", None
        except TimeoutError:
            return ("closed" if ws.closed else "silent"), None
        finally:
            self._acks.pop(ref, None)
        if reply["type"] == "ack":
            return "ack", str(reply["id"])
        return str(reply.get("code")), None


async def stream_ids(port: int, room: str) -> list[str]:
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        return [i.decode() for i, _ in await client.xrange(f"chat:history:{room}")]
    finally:
        await client.aclose()


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
    make_sentinel: Callable[[], SentinelDeployment],
    make_server: Callable[..., ServerProcess], sessions: list[aiohttp.ClientSession],
) -> None:
    """Publishers at 20 msg/s in 3 rooms; the primary is SIGKILLed; publishes resume within
    15 s, every one was answered, every subscriber holds exactly XRANGE, no duplicate."""
    deployment = make_sentinel()
    # 20 msg/s per publisher is past the default per-connection rate (10/s).
    server = make_server(workers=2, redis_url=deployment.url,
                         env={"CHAT_RATE": "50", "CHAT_BURST": "100"})
    pool: list[ResumingClient] = []
    for i in range(6):
        session = await sign_in(server, f"reader{i}")
        sessions.append(session)
        pool.append(ResumingClient(session, lambda: server.ws_url, server.origin, ROOMS))
    publishers: list[Publisher] = []
    for room in ROOMS:
        session = await sign_in(server, f"writer-{room}")
        sessions.append(session)
        publishers.append(Publisher(session, lambda: server.ws_url, server.origin, [room]))
    for client in [*pool, *publishers]:
        await client.start()
    await asyncio.gather(*(asyncio.wait_for(c.ready.wait(), scaled(20))
                           for c in [*pool, *publishers]))
    assert len({i for c in pool for i in c.instances}) == 2, "readers should span both workers"

    outcomes: Counter[str] = Counter()
    acked: dict[str, list[str]] = {room: [] for room in ROOMS}
    first_ack_after: dict[str, float] = {}  # room -> seconds from the kill to its first
    refused: set[str] = set()  # ack after a refusal (rooms refused since the kill)
    killed, resumed = asyncio.Event(), asyncio.Event()
    kill_time = 0.0
    stop = asyncio.Event()

    async def publish_one(publisher: Publisher, room: str, n: int) -> None:
        outcome, message_id = await publisher.publish_once(room, f"{room}-{n}")
        outcomes[outcome] += 1
        if message_id is None:
            if killed.is_set():
                refused.add(room)
        else:
            acked[room].append(message_id)
            if room in refused and room not in first_ack_after:
                first_ack_after[room] = time.monotonic() - kill_time
                if len(first_ack_after) == len(ROOMS):
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
        old: RedisServer = deployment.current_primary()
        before = {room: len(ids) for room, ids in acked.items()}
        kill_time = time.monotonic()
        old.kill()
        killed.set()
        new, promoted_after = await asyncio.to_thread(deployment.wait_promoted, old)
        async with asyncio.timeout(scaled(RESUME_BOUND)):
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

    stored = {room: await stream_ids(new.port, room) for room in ROOMS}
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
    print(f"\nsentinel failover: promoted after {promoted_after:.2f}s, publishes resumed "
          f"after {resume:.2f}s (per room {first_ack_after}), outcomes {dict(outcomes)}, "
          f"acked-but-lost {sum(len(v) for v in lost.values())}, readyz {dict(ready_seen)}")
