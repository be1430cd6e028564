"""What anyone can make the server log: no request bytes (tokens, cookies), no traceback
flood. The app through aiohttp's test client, with the filter setup_logging installs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from chatserver.app import ENDPOINT, create_app
from chatserver.config import load_settings
from chatserver.observability import QuietAiohttp

SECRET = b"eyJhbGciOiJSUzI1NiJ9.s3cretpayload.sig"


@pytest.fixture
def quiet() -> Iterator[QuietAiohttp]:
    installed = QuietAiohttp(every=3600)
    loggers = [logging.getLogger(n) for n in ("aiohttp.server", "aiohttp.websocket")]
    for logger in loggers:
        logger.addFilter(installed)
    yield installed
    for logger in loggers:
        logger.removeFilter(installed)


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read(200)
    writer.close()
    return answer


async def test_malformed_requests_log_one_counted_line_without_their_bytes(
    aiohttp_client: Any, quiet: QuietAiohttp, caplog: pytest.LogCaptureFixture
) -> None:
    """A garbage request line and an oversized cookie answer 400 and log one WARNING line
    that quotes neither; a JWT offered as a subprotocol is not written out either."""
    caplog.set_level(logging.DEBUG)
    app = await create_app(load_settings({"CHAT_COOKIE_SECURE": "0"}, env_file=None))
    client = await aiohttp_client(app)
    bad = [b"GARBAGE\x00 / HTTP/1.1\r\n" + SECRET + b"\r\n\r\n",
           b"GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: authToken=" + SECRET * 300 + b"\r\n\r\n"]
    for request in bad:
        assert (await raw(client.port, request)).startswith(b"HTTP/1.0 400")
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: http://127.0.0.1:3020\r\n"
               b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Protocol: " + SECRET + b"\r\n\r\n")
    assert (await raw(client.port, upgrade)).startswith(b"HTTP/1.1 101")
    aiohttp_records = [r for r in caplog.records if r.name.startswith("aiohttp.")]
    assert all(SECRET.decode()[:20] not in r.getMessage() for r in caplog.records)
    assert all(r.exc_info is None for r in aiohttp_records)
    malformed = [r for r in aiohttp_records if "malformed" in r.getMessage()]
    assert len(malformed) == 1 and malformed[0].levelname == "WARNING"


def test_a_later_window_reports_the_count() -> None:
    """After the window, the next malformed request's line carries how many there were."""
    now = [0.0]
    quiet = QuietAiohttp(every=10, clock=lambda: now[0])
    from aiohttp.http_exceptions import BadHttpMessage

    def record() -> logging.LogRecord:
        error = BadHttpMessage("bad")
        return logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling "
                                 "request", (), (type(error), error, None))

    assert quiet.filter(record())
    assert [quiet.filter(record()) for _ in range(4)] == [False] * 4
    now[0] = 11.0
    last = record()
    assert quiet.filter(last) and last.getMessage().startswith("5 malformed HTTP requests")


def test_our_own_handler_errors_keep_their_traceback() -> None:
    """An exception in chatserver's code is not hidden: it passes with its traceback."""
    error = RuntimeError("bug")
    record = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request",
                               (), (type(error), error, None))
    assert QuietAiohttp().filter(record) and record.exc_info is not None


async def test_connects_are_one_counted_info_line_not_a_line_each(
    aiohttp_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Five connects log no INFO line each; the once-a-second tally line says +5."""
    caplog.set_level(logging.INFO, logger="chatserver")
    app = await create_app(load_settings({"CHAT_COOKIE_SECURE": "0"}, env_file=None))
    client = await aiohttp_client(app)
    origin = {"Origin": "http://127.0.0.1:3020"}
    sockets = []
    for n in range(5):
        await client.post("/auth/login", json={"username": f"u{n}"}, headers=origin)
        sockets.append(await client.ws_connect("/ws", headers=origin))
        await sockets[-1].receive_json()
    lines = [r.getMessage() for r in caplog.records if r.name == "chatserver.ws"]
    assert lines == []  # nothing per connection at INFO
    app[ENDPOINT].tally.log(5)  # what the once-a-second beat does
    lines = [r.getMessage() for r in caplog.records if r.name == "chatserver.ws"]
    assert lines == ["connections: +5 -0 refused 0 abandoned 0, 5 open"]
    for ws in sockets:
        await ws.close()
