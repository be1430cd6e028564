"""Several workers through a real Redis: cross-worker broadcast, Redis outages, slow
consumers, worker restarts and graceful shutdown. Real processes over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
from yarl import URL

from tests.support import (
    RedisServer,
    ServerProcess,
    close_frame,
    of_type,
    open_ws,
    receive_until,
    scaled,
    sign_in,
)


class Placed(NamedTuple):
    ws: aiohttp.ClientWebSocketResponse
    instance: str
    sub: str
    session: aiohttp.ClientSession


async def connect_on_distinct_instances(
    server: ServerProcess, sessions: list[aiohttp.ClientSession], count: int = 2
) -> list[Placed]:
    """Open sockets, one user each, until `count` sit on different workers (kernel hashing)."""
    found: dict[str, Placed] = {}
    for attempt in range(60):
        session = await sign_in(server, f"user{attempt}")
        sessions.append(session)
        ws = await open_ws(session, server)
        welcome = await receive_until(ws, of_type("welcome"))
        await receive_until(ws, of_type("joined"))
        if welcome["instance"] in found:
            await ws.close()
            continue
        found[welcome["instance"]] = Placed(ws, welcome["instance"], welcome["user"]["sub"],
                                            session)
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"only {len(found)} distinct workers after 60 connections")


async def test_cross_worker_broadcast(make_server: Callable[..., ServerProcess], redis_url: str,
                                      sessions: list[aiohttp.ClientSession]) -> None:
    """Clients on two different workers each receive each other's messages."""
    server = make_server(workers=2, redis_url=redis_url)
    (a, inst_a, *_), (b, inst_b, *_) = await connect_on_distinct_instances(server, sessions)
    assert inst_a != inst_b
    await a.send_json({"message": "from a"})
    await b.send_json({"message": "from b"})
    for ws in (a, b):
        seen = set()
        while len(seen) < 2:
            seen.add((await receive_until(ws, of_type("message")))["message"])
        assert seen == {"from a", "from b"}


async def test_redis_outage_then_recovery(make_server: Callable[..., ServerProcess],
                                          make_redis: Callable[[], RedisServer],
                                          sessions: list[aiohttp.ClientSession]) -> None:
    """Redis SIGKILLed: sockets stay, /readyz 503, publishes get `unavailable`; after a
    restart on the same port /readyz is 200 and broadcasts resume, nothing restarted."""
    redis = make_redis()
    server = make_server(workers=1, redis_url=redis.url)
    a_session, b_session = await sign_in(server, "alice"), await sign_in(server, "bob")
    sessions += [a_session, b_session]
    a, b = await open_ws(a_session, server), await open_ws(b_session, server)
    for ws in (a, b):
        await receive_until(ws, of_type("joined"))

    redis.kill()
    await wait_ready(a_session, server, 503)
    await a.send_json({"type": "publish", "room": "lobby", "message": "lost?", "ref": "out1"})
    error = await receive_until(a, of_type("error"))
    assert error["code"] == "unavailable" and error["ref"] == "out1"

    redis.start()
    await wait_ready(a_session, server, 200)
    await a.send_json({"type": "publish", "room": "lobby", "message": "back", "ref": "in1"})
    assert (await receive_until(a, of_type("ack")))["ref"] == "in1"
    got = await receive_until(b, of_type("message"))
    assert got["message"] == "back"
    assert server.proc is not None and server.proc.poll() is None


async def wait_ready(session: aiohttp.ClientSession, server: ServerProcess, status: int) -> None:
    async with asyncio.timeout(scaled(20)):
        while True:
            async with session.get(f"{server.url}/readyz") as response:
                if response.status == status:
                    return
            await asyncio.sleep(0.1)


async def test_sigterm_closes_every_socket_1001(make_server: Callable[..., ServerProcess],
                                               redis_url: str,
                                               sessions: list[aiohttp.ClientSession]) -> None:
    """SIGTERM: every client on every worker gets 1001 and the command exits in the grace period."""
    server = make_server(workers=2, redis_url=redis_url, env={"CHAT_GRACE": "5"})
    sockets = [placed.ws for placed in await connect_on_distinct_instances(server, sessions)]
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    codes = await asyncio.gather(*(close_frame(ws) for ws in sockets))
    assert [code for code, _ in codes] == [1001] * len(sockets)
    assert server.proc is not None
    await asyncio.to_thread(server.proc.wait, scaled(10))
    assert time.monotonic() - started < 5 + 2
    assert server.proc.returncode == 0


async def test_killed_worker_is_restarted(make_server: Callable[..., ServerProcess],
                                          redis_url: str,
                                          sessions: list[aiohttp.ClientSession]) -> None:
    """A worker that dies is replaced; the others keep their clients meanwhile."""
    server = make_server(workers=2, redis_url=redis_url)
    (a, inst_a, *_), (b, inst_b, *_) = await connect_on_distinct_instances(server, sessions)
    os.kill(int(inst_a.rsplit(":", 1)[1]), signal.SIGKILL)
    code, _ = await close_frame(a)
    assert code != 1000
    await b.send_json({"message": "still here"})
    assert (await receive_until(b, of_type("message")))["message"] == "still here"
    await asyncio.to_thread(server.wait_ready)
    pids = set()
    for _ in range(40):
        instance = await asyncio.to_thread(server.instance_answering)
        if instance:
            pids.add(instance)
    assert inst_a not in pids and inst_b in pids


async def test_stalled_reader_is_closed_1013_others_get_everything(
    make_server: Callable[..., ServerProcess], sessions: list[aiohttp.ClientSession]
) -> None:
    """One client never reads, 50 do: all 50 get every message; the stalled one gets 1013."""
    server = make_server(env={"CHAT_RATE": "0", "CHAT_BACKLOG_BYTES": "262144",
                              "CHAT_MAX_TEXT_CHARS": "20000",
                              "CHAT_MAX_CONNECTIONS_PER_USER": "100"})
    publisher_session = await sign_in(server, "publisher")
    sessions.append(publisher_session)
    token = publisher_session.cookie_jar.filter_cookies(URL(server.url))["authToken"].value
    stalled = await asyncio.to_thread(raw_stalled_client, server, token)
    readers = [await open_ws(publisher_session, server) for _ in range(50)]
    for ws in readers:
        await receive_until(ws, of_type("joined"))
    publisher = await open_ws(publisher_session, server)
    await receive_until(publisher, of_type("joined"))
    readers.append(publisher)  # it hears its own messages too, and must keep up

    # 5.6 MB: more than the kernel buffers (tcp_wmem max 4 MB) and the 256 KiB bound hold
    # for a reader that stalls; readers that keep up never come near the bound
    count, text = 350, "y" * 16000

    progress = [0] * len(readers)
    advanced = asyncio.Condition()

    async def read_all(index: int, ws: aiohttp.ClientWebSocketResponse) -> int:
        while progress[index] < count:
            frame = await receive_until(ws, of_type("message"), timeout=30)
            assert int(frame["message"].split(":")[0]) == progress[index]
            progress[index] += 1
            async with advanced:
                advanced.notify_all()
        return progress[index]

    async def stalled_close_code() -> int | None:
        """Once the server reports the kick, drain the stalled socket up to its close frame
        (within the server's close-handshake bound, before it aborts the socket)."""
        async with asyncio.timeout(scaled(30)):
            # another process's counter: nothing to await but the next scrape
            while "chatserver_slow_consumer_closes_total 1.0" not in await metrics(  # noqa: ASYNC110
                server
            ):
                await asyncio.sleep(0.05)
        return await asyncio.to_thread(read_close_code, stalled)

    reading = [asyncio.create_task(read_all(i, ws)) for i, ws in enumerate(readers)]
    stalled_result = asyncio.create_task(stalled_close_code())
    for i in range(count):
        await publisher.send_json({"message": f"{i}:{text}"})
        # The readers share this one test process: keep them within 10 messages, so
        # only the stalled client can come near the bound.
        async with asyncio.timeout(scaled(30)), advanced:
            await advanced.wait_for(lambda sent=i: min(progress) >= sent - 10)
    results = await asyncio.gather(*reading)
    assert results == [count] * 51
    assert await stalled_result == 1013


async def metrics(server: ServerProcess) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as got:
        return await got.text()


def raw_stalled_client(server: ServerProcess, token: str) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that does not read after the handshake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
         f"Sec-WebSocket-Version: 13\r\nOrigin: {server.origin}\r\n"
         f"Cookie: authToken={token}\r\n\r\n").encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


def read_close_code(sock: socket.socket) -> int | None:
    """Drain frames until a close frame; its code (None if the socket just ended)."""
    sock.settimeout(scaled(15))
    buf = b""
    with sock:
        while True:
            while len(buf) < 2 or len(buf) < frame_length(buf):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            size = frame_length(buf)
            frame, buf = buf[:size], buf[size:]
            if frame[0] & 0x0F == 8:
                header = size - payload_length(frame)
                return int.from_bytes(frame[header:header + 2], "big")


def payload_length(buf: bytes) -> int:
    n = buf[1] & 0x7F
    if n == 126:
        return int.from_bytes(buf[2:4], "big")
    if n == 127:
        return int.from_bytes(buf[2:10], "big")
    return n


def frame_length(buf: bytes) -> int:
    n = buf[1] & 0x7F
    header = 2 if n < 126 else 4 if n == 126 else 10
    if len(buf) < header:
        return header
    return header + payload_length(buf)


async def test_metrics_sum_over_workers(make_server: Callable[..., ServerProcess], redis_url: str,
                                        sessions: list[aiohttp.ClientSession]) -> None:
    """/metrics on any worker counts the connections and messages of all workers."""
    # no presence events: every frame delivered here is a chat message
    server = make_server(workers=2, redis_url=redis_url, env={"CHAT_PRESENCE_EVENT_LIMIT": "0"})
    a, b = await connect_on_distinct_instances(server, sessions)
    await a.ws.send_json({"message": "first"})
    for placed in (a, b):
        await receive_until(placed.ws, of_type("message"))
    before = sample(await metrics(server))
    await b.ws.send_json({"message": "counted"})
    for placed in (a, b):
        await receive_until(placed.ws, of_type("message"))
    for _ in range(4):  # each scrape lands on either worker; every answer is the total
        after = sample(await metrics(server))
        assert after["chatserver_connections"] == 2
        assert after["chatserver_messages_in_total"] - before["chatserver_messages_in_total"] == 1
        assert after["chatserver_messages_out_total"] - before["chatserver_messages_out_total"] == 2


def sample(text: str) -> dict[str, float]:
    """The unlabelled series of a Prometheus text page."""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            values[name] = float(value)
    return values
