"""A resuming test client: keeps every room's ids in order, reconnects and resumes each
room from its last id and epoch, and counts duplicates, so tests can demand exactly the
room's stored sequence.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from chatserver.protocol import parse_id
from tests.support import ServerProcess, scaled, sign_in

RETRY_CLOSES = {1001, 1006, 1011, 1012, 1013}
REPLY_WAIT = 5.0  # seconds a publish may wait for its answer before it counts as silent


class ResumingClient:
    def __init__(self, session: aiohttp.ClientSession, ws_url: Callable[[], str], origin: str,
                 rooms: list[str]) -> None:
        self.session = session
        self.ws_url = ws_url  # called per connect: tests may point it elsewhere
        self.origin = origin
        self.rooms = rooms
        self.received: dict[str, list[str]] = {room: [] for room in ["lobby", *rooms]}
        self.epochs: dict[str, str] = {}
        self.duplicates = 0
        self.anomalies: list[tuple[str, str, str, int]] = []  # (room, id, last id, connects)
        self.incomplete: list[str] = []  # rooms whose resume said complete: false
        self.instances: list[str] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready = asyncio.Event()
        self.progressed = asyncio.Event()  # set on every message and (re)join: until_all
        self._refs = itertools.count(1)
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    # ---------------------------------------------------------------- control

    async def start(self) -> None:
        await self._connect()

    async def drop(self) -> None:
        """Close this connection as a network blink would; the client resumes by itself."""
        if self.ws is not None:
            await self.ws.close()

    async def stop(self) -> None:
        self._stopping = True
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def publish(self, room: str, text: str, attempts: int = 100) -> str:
        """Publish until acked (retrying `unavailable` and reconnects); returns the id."""
        for _ in range(attempts):
            await asyncio.wait_for(self.ready.wait(), 20)
            ref = f"r{next(self._refs)}"
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._acks[ref] = future
            try:
                assert self.ws is not None
                await self.ws.send_json({"type": "publish", "room": room, "message": text,
                                         "ref": ref})
                reply = await asyncio.wait_for(future, 10)
            except (TimeoutError, ConnectionError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
                continue
            finally:
                self._acks.pop(ref, None)
            if reply["type"] == "ack":
                return str(reply["id"])
            await asyncio.sleep(0.1)  # unavailable or rate limited: try again
        raise AssertionError(f"publish to {room} never acknowledged")

    def last(self, room: str) -> str | None:
        ids = self.received[room]
        return ids[-1] if ids else None

    # --------------------------------------------------------------- internals

    async def _connect(self) -> None:
        self.ready.clear()
        query = ""
        if self.last("lobby") and "lobby" in self.epochs:
            query = f"?since={self.last('lobby')}&epoch={self.epochs['lobby']}"
        for attempt in range(100):
            try:
                self.ws = await self.session.ws_connect(self.ws_url() + query,
                                                        headers={"Origin": self.origin})
                break
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        else:
            raise AssertionError("could not reconnect")
        for room in self.rooms:
            frame: dict[str, Any] = {"type": "join", "room": room}
            if self.last(room) and room in self.epochs:
                frame.update(since=self.last(room), epoch=self.epochs[room])
            await self.ws.send_json(frame)
        self._reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        pending_rooms = {"lobby", *self.rooms}
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "welcome":
                self.instances.append(frame["instance"])
            elif kind == "message":
                self._on_message(frame)
            elif kind in ("joined", "recovered"):
                self.epochs[frame["room"]] = frame["epoch"]
                if kind == "recovered" and not frame["complete"]:
                    self.incomplete.append(frame["room"])
                pending_rooms.discard(frame["room"])
                if not pending_rooms:
                    self.ready.set()
                    self.progressed.set()
            elif kind in ("ack", "error") and frame.get("ref") in self._acks:
                future = self._acks[frame["ref"]]
                if not future.done():
                    future.set_result(frame)
        self.ready.clear()
        if not self._stopping:
            await asyncio.sleep(0.05)
            await self._connect()

    def _on_message(self, frame: dict[str, Any]) -> None:
        ids = self.received[frame["room"]]
        if ids and parse_id(frame["id"]) <= parse_id(ids[-1]):
            self.duplicates += 1  # an id at or below the last one: seen, or out of order
            self.anomalies.append((frame["room"], frame["id"], ids[-1], len(self.instances)))
            return
        ids.append(frame["id"])
        self.progressed.set()


async def until_all(clients: list[ResumingClient], done: Callable[[], bool],
                    timeout: float = 20) -> None:
    """Until done() holds, checked again whenever any of the clients received a message
    or rejoined its rooms."""
    async with asyncio.timeout(scaled(timeout)):
        while not done():
            for client in clients:
                client.progressed.clear()
            waits = [asyncio.create_task(c.progressed.wait()) for c in clients]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()


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


async def readers_on_both_workers(server: ServerProcess, sessions: list[aiohttp.ClientSession],
                                  rooms: list[str], *, at_least: int = 6
                                  ) -> list[ResumingClient]:
    """Signed-in readers of `rooms`, at least `at_least`, and more until both workers of a
    `--workers 2` server have some: the kernel picks each socket's worker (six all landed
    on one about once in 30 runs)."""
    readers: list[ResumingClient] = []
    while len(readers) < at_least or len({c.instances[-1] for c in readers}) < 2:
        assert len(readers) < 30, "30 readers all on one worker"
        session = await sign_in(server, f"reader{len(readers)}")
        sessions.append(session)
        reader = ResumingClient(session, lambda: server.ws_url, server.origin, rooms)
        readers.append(reader)
        await reader.start()
        await asyncio.wait_for(reader.ready.wait(), scaled(20))
    return readers
