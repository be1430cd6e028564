"""Hub fan-out, with fake transports: the structural guards of the fan-out levers
(encode once per broadcast, one write per client per loop pass, never wait on a client)."""

from __future__ import annotations

import asyncio

import pytest

from chatserver import hub as hub_module
from chatserver.connection import Connection
from chatserver.hub import Hub
from chatserver.protocol import message_frame, message_tail
from tests.unit.fakes import make_conn


def payload(n: int) -> bytes:
    return message_frame(f"{1000 + n}-0", message_tail("lobby", "u", "u", f"m{n}", 0))


async def test_one_encode_per_message_and_one_write_per_client_per_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10 broadcasts in one loop pass to 100 members: 10 frame encodings, 1 write each."""
    encoded: list[bytes] = []
    real = hub_module.text_frame
    monkeypatch.setattr(hub_module, "text_frame", lambda p: encoded.append(p) or real(p))
    kicked: list[Connection] = []
    hub = Hub()
    hub.reserve("lobby")
    conns = [make_conn(f"u{i}", kicked) for i in range(100)]
    for conn in conns:
        hub.add(conn, "lobby")
    for n in range(10):
        hub.deliver_room("lobby", payload(n))
    assert all(not conn.transport.writes for conn in conns)  # type: ignore[attr-defined]
    await asyncio.sleep(0)  # the end of this loop pass
    assert len(encoded) == 10
    expected = b"".join(real(payload(n)) for n in range(10))
    for conn in conns:
        assert conn.transport.writes == [expected]  # type: ignore[attr-defined]
    assert not kicked


async def test_full_backlog_kicks_only_that_client() -> None:
    """A client over its backlog bound is kicked with 1013; the others are written to."""
    kicked: list[Connection] = []
    hub = Hub()
    hub.reserve("lobby")
    slow = make_conn("slow", kicked, backlog=4096)
    fast = [make_conn(f"f{i}", kicked) for i in range(3)]
    for conn in [slow, *fast]:
        hub.add(conn, "lobby")
    hub.deliver_room("lobby", payload(1))
    await asyncio.sleep(0)
    hub.deliver_room("lobby", payload(2))
    await asyncio.sleep(0)
    assert kicked == [slow] and slow.close is not None and slow.close.code == 1013
    assert len(slow.transport.writes) == 1  # type: ignore[attr-defined]
    assert all(len(c.transport.writes) == 2 for c in fast)  # type: ignore[attr-defined]


async def test_resumed_client_waits_for_live_stream_to_catch_up() -> None:
    """A replay that read past the worker's live position is held, then deduplicated."""
    kicked: list[Connection] = []
    live = {"lobby": (1002, 0)}
    hub = Hub(position=live.get)
    hub.reserve("lobby")
    conn = make_conn("u", kicked)
    hub.add(conn, "lobby", replaying=True)
    hub.finish_replay(conn, "lobby", "1004-0")  # the replay reached 1004; live is at 1002
    for n in (3, 4, 5):  # the live stream catches up: 1003 and 1004 are duplicates
        live["lobby"] = (1000 + n, 0)
        hub.deliver_room("lobby", payload(n))
        await asyncio.sleep(0)
    written = b"".join(conn.transport.writes)  # type: ignore[attr-defined]
    assert b'"m5"' in written and b'"m3"' not in written and b'"m4"' not in written
