"""Room traffic for bench/cluster_share.py: rooms with a few subscribers and one publisher
each, the publishers at a fixed rate; counts acknowledgements and deliveries, and checks
that every subscriber got every acknowledged message once.

chatserver-loadtest puts every client in the lobby, one room and so one hash slot: on a
cluster that is one primary doing all the work, which is the opposite of what this
measures. Hence this small driver of rooms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

MESSAGE_HEAD = '{"type":"message",'
INFLIGHT = 100  # publishes a publisher may have unanswered; past it, it waits
SETTLE = 10.0  # seconds after the last publish for answers and deliveries to arrive


@dataclass
class Load:
    rooms: list[str]
    subscribers: int  # per room, besides its publisher
    rate: float  # publishes a second per room
    duration: float  # seconds of publishing


@dataclass
class Result:
    acked: dict[str, int] = field(default_factory=dict)  # room -> publishes acknowledged
    refused: int = 0  # publishes answered with an error
    deliveries: int = 0  # message frames received by the rooms' members, publishers too
    lost: int = 0  # acknowledged messages a subscriber never received
    duplicates: int = 0
    seconds: float = 0.0  # from the first publish to the last


class Member:
    """One socket in one room: records which of the room's messages it received."""

    def __init__(self, room: str, result: Result, arrived: asyncio.Event) -> None:
        self.room, self.result, self.arrived = room, result, arrived
        self.seen: set[int] = set()
        self.answers: dict[int, asyncio.Future[bool]] = {}  # publisher: ref -> acked?
        self.joined = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None

    async def open(self, session: aiohttp.ClientSession, ws_url: str, origin: str,
                   token: str) -> None:
        async with asyncio.timeout(20):
            self.ws = await session.ws_connect(ws_url, headers={
                "Origin": origin, "Cookie": f"authToken={token}"}, heartbeat=None)
            self.reader = asyncio.create_task(self._read(self.ws))
            await self.ws.send_json({"type": "join", "room": self.room})
            await self.joined.wait()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await self._frames(ws)
        finally:  # a closed socket answers nothing more: its pending publishes are refused
            for answer in self.answers.values():
                if not answer.done():
                    answer.set_result(False)

    async def _frames(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "message" and frame.get("room") == self.room:
                self.result.deliveries += 1
                seq = int(frame["message"].rpartition(":")[2])
                if seq in self.seen:
                    self.result.duplicates += 1
                self.seen.add(seq)
                self.arrived.set()
            elif kind == "joined" and frame.get("room") == self.room:
                self.joined.set()
            elif kind in ("ack", "error") and frame.get("ref") is not None:
                answer = self.answers.pop(int(frame["ref"]), None)
                if answer is not None and not answer.done():
                    answer.set_result(kind == "ack")

    async def publish(self, load: Load, window: asyncio.Semaphore) -> list[int]:
        """At load.rate for load.duration; the sequence numbers acknowledged."""
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        pending: dict[int, asyncio.Future[bool]] = {}
        started, n = time.monotonic(), 0
        while time.monotonic() - started < load.duration:
            await window.acquire()
            answer = self.answers[n] = pending[n] = loop.create_future()
            answer.add_done_callback(lambda _: window.release())
            await self.ws.send_json({"type": "publish", "room": self.room,
                                     "message": f"{self.room}:{n}", "ref": str(n)})
            n += 1
            await asyncio.sleep(max(0.0, started + n / load.rate - time.monotonic()))
        done, _ = await asyncio.wait(pending.values(), timeout=SETTLE)
        acked = [seq for seq, answer in pending.items() if answer in done and answer.result()]
        self.result.refused += sum(1 for a in done if not a.result())
        return acked

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


async def run_load(ws_url: str, origin: str, token: Callable[[str], str], load: Load,
                   on_ready: Callable[[], Awaitable[None]],
                   on_done: Callable[[], Awaitable[None]]) -> Result:
    """Open every room's members, await on_ready (the caller's CPU sample), publish, wait
    (bounded) for every acknowledged message to reach every subscriber, await on_done
    (before the sockets close: their leaves are no part of the load)."""
    result = Result()
    # limit=0: the default pool of 100 connections would hold the 101st socket forever
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        arrived = asyncio.Event()  # any member received a message
        publishers = {room: Member(room, result, arrived) for room in load.rooms}
        subscribers = {room: [Member(room, result, arrived) for _ in range(load.subscribers)]
                       for room in load.rooms}
        members = [*publishers.values(), *(m for ms in subscribers.values() for m in ms)]
        for i, member in enumerate(members):
            await member.open(session, ws_url, origin, token(f"bench-{i}"))
        await on_ready()
        started = time.monotonic()
        acked = await asyncio.gather(*(p.publish(load, asyncio.Semaphore(INFLIGHT))
                                       for p in publishers.values()))
        result.seconds = time.monotonic() - started
        result.acked = {room: len(seqs) for room, seqs in zip(load.rooms, acked, strict=True)}
        wanted = {room: set(seqs) for room, seqs in zip(load.rooms, acked, strict=True)}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE):
                while any(wanted[room] - m.seen for room, ms in subscribers.items()
                          for m in ms):
                    arrived.clear()
                    await arrived.wait()
        result.lost = sum(len(wanted[room] - m.seen)
                          for room, ms in subscribers.items() for m in ms)
        await on_done()
        for member in members:
            await member.close()
    return result
