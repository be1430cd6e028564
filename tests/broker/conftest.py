"""The backends of the broker contract suite, and a recording sink in place of the Hub.

A new backend is one entry in BACKENDS (and in OUTAGES when it has a server to lose).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from chatserver import protocol
from chatserver.broker.base import Broker
from chatserver.broker.memory import MemoryBroker
from chatserver.broker.redis import RedisBroker
from tests.support import SCALE, RedisServer

WAIT = 5.0 * SCALE  # seconds any one expected delivery may take


class RecordingSink:
    """Records what a broker delivers; tests await what they expect, never sleep."""

    def __init__(self) -> None:
        self.rooms: list[tuple[str, bytes]] = []
        self.users: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()

    def deliver_room(self, room: str, payload: bytes) -> None:
        self.rooms.append((room, payload))
        self._changed.set()

    def deliver_user(self, sub: str, payload: bytes) -> None:
        self.users.append((sub, payload))
        self._changed.set()

    async def until(self, done: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    def payloads(self, room: str) -> list[bytes]:
        return [payload for name, payload in self.rooms if name == room]

    def ids(self, room: str) -> list[str]:
        return [i for p in self.payloads(room) if (i := protocol.message_id_of(p)) is not None]

    def events(self, room: str) -> list[dict[str, Any]]:
        """The presence frames of a room, decoded."""
        decoded = [json.loads(p) for p in self.payloads(room)]
        return [frame for frame in decoded if frame["type"] == "presence"]


@dataclass
class Backend:
    """Makes brokers of one kind. `shared`: brokers made by one Backend are workers of one
    deployment (they see each other's traffic); the memory broker is one worker alone."""

    name: str
    make: Callable[..., Broker]
    shared: bool


def memory_backend(request: pytest.FixtureRequest) -> Backend:
    return Backend("memory", lambda **options: MemoryBroker(**options), shared=False)


def redis_at(url: str) -> Callable[..., Broker]:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"  # one deployment per test

    def make(**options: Any) -> Broker:
        return RedisBroker(url, instance=f"worker-{uuid.uuid4().hex[:8]}", prefix=prefix,
                           **options)

    return make


def redis_backend(request: pytest.FixtureRequest) -> Backend:
    return Backend("redis", redis_at(request.getfixturevalue("redis_url")), shared=True)


def sentinel_backend(request: pytest.FixtureRequest) -> Backend:
    """The primary of a Sentinel deployment (primary, replica, three sentinels)."""
    return Backend("sentinel", redis_at(request.getfixturevalue("sentinel_url")), shared=True)


def cluster_backend(request: pytest.FixtureRequest) -> Backend:
    """A Redis Cluster of three primaries, three replicas: rooms on shard channels."""
    return Backend("cluster", redis_at(request.getfixturevalue("cluster_url")), shared=True)


BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "memory": memory_backend,
    "redis": redis_backend,
    "sentinel": sentinel_backend,
    "cluster": cluster_backend,
}


@dataclass
class Outage:
    """A backend whose server a test can kill and start again (same address)."""

    backend: Backend
    kill: Callable[[], None]
    restart: Callable[[], None]


def redis_outage(request: pytest.FixtureRequest) -> Outage:
    server: RedisServer = request.getfixturevalue("make_redis")()
    backend = Backend("redis", redis_at(server.url), shared=True)
    return Outage(backend, server.kill, server.start)


OUTAGES: dict[str, Callable[[pytest.FixtureRequest], Outage]] = {
    "redis": redis_outage,
}

Started = tuple[Broker, RecordingSink]


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param](request)


@pytest.fixture(params=list(OUTAGES))
def outage(request: pytest.FixtureRequest) -> Outage:
    return OUTAGES[request.param](request)


async def _brokers(backend: Backend) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    started: list[Broker] = []

    async def make(**options: Any) -> Started:
        broker, sink = backend.make(**options), RecordingSink()
        await broker.start(sink)
        started.append(broker)
        return broker, sink

    yield make
    for broker in started:
        await broker.close()


@pytest.fixture
async def make_broker(backend: Backend) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """Factory: make_broker(**options) -> (started broker, its sink); closed at teardown."""
    async for make in _brokers(backend):
        yield make


@pytest.fixture
async def make_outage_broker(
    outage: Outage,
) -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    """make_broker for a backend whose server the test kills (outage.kill/restart)."""
    async for make in _brokers(outage.backend):
        yield make
