"""The guard before the first request head, in process: the app served through HeadGuard
on a real loopback socket (the same listener `chatserver` runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chatserver.app import create_app
from chatserver.config import load_settings
from chatserver.guard import HeadGuard
from chatserver.observability import Metrics


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., object]]:
    runners: list[web.AppRunner] = []
    servers: list[asyncio.Server] = []

    async def start(*, timeout: float = 5.0, per_ip: int = 100) -> tuple[int, HeadGuard, Metrics]:
        metrics = Metrics()
        settings = load_settings({"CHAT_COOKIE_SECURE": "0"}, env_file=None)
        runner = web.AppRunner(await create_app(settings, metrics=metrics))
        await runner.setup()
        runners.append(runner)
        assert runner.server is not None
        guard = HeadGuard(runner.server, timeout=timeout, per_ip=per_ip,
                          half_open=metrics.half_open, dropped=metrics.half_open_dropped)
        server = await asyncio.get_running_loop().create_server(guard, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1], guard, metrics

    yield start
    for server in servers:
        server.close()
    for runner in runners:
        await runner.cleanup()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await reader.read(100) == b""
    except ConnectionResetError:
        return True


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_silent_connection_is_dropped_at_the_head_deadline(serve: Callable[..., Any]) -> None:
    """A connection that sends no complete head is closed when its deadline passes."""
    port, guard, metrics = await serve(timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    async with asyncio.timeout(5):
        assert await closed_by_server(reader)
    assert guard.waiting == {}
    assert sample(metrics, "chatserver_half_open_dropped_total", reason="head_timeout") == 1
    writer.close()


async def test_half_open_connections_are_capped_per_address(serve: Callable[..., Any]) -> None:
    """Past the per-address cap, a new headless connection is closed at once; a complete
    request from the same address is served once a slot is free."""
    port, _, metrics = await serve(per_ip=2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    async with asyncio.timeout(5):
        # One listener accepts in order: by the third, the first two are counted.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_by_server(reader)
    assert sample(metrics, "chatserver_half_open_dropped_total", reason="per_ip_cap") == 1
    assert sample(metrics, "chatserver_half_open_connections") == 2
    held[0][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await held[0][0].read()).startswith(b"HTTP/1.1 200")
    for _, w in held:
        w.close()
    writer.close()


async def test_requests_and_websockets_work_through_the_guard(serve: Callable[..., Any]) -> None:
    """A head split over two writes is served; a WebSocket after the hand-over works."""
    port, guard, _ = await serve(timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"Connection: close\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    origin = "http://127.0.0.1:3020"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        login = await session.post(f"http://127.0.0.1:{port}/auth/login",
                                   json={"username": "alice"}, headers={"Origin": origin})
        assert login.status == 200
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws", headers={"Origin": origin})
        await asyncio.sleep(0.7)  # past the head deadline: the socket must live on
        await ws.send_json({"message": "still here"})
        async with asyncio.timeout(5):
            while (await ws.receive_json()).get("message") != "still here":
                pass
        await ws.close()
    assert guard.waiting == {}
