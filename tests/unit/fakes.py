"""Process-free stand-ins for the unit layer: a transport that records what is written,
connections on it, and a decoder for the RFC 6455 frames the server writes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from chatserver.auth.tokens import User
from chatserver.connection import Connection


class FakeTransport(asyncio.Transport):
    def __init__(self, backlog: int = 0) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.backlog = backlog

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def is_closing(self) -> bool:
        return False


def make_conn(name: str, kicked: list[Connection], backlog: int = 0, *, rate: float = 0,
              burst: int = 1, exp: float = 0) -> Connection:
    return Connection(
        ws=None,  # type: ignore[arg-type]  # only the /ws handler touches it
        transport=FakeTransport(backlog),
        user=User(sub=name, username=name, exp=exp),
        backlog_limit=1024,
        rate=rate,
        burst=burst,
        on_kick=kicked.append,
    )


def payloads(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames in `data`, in order."""
    out, i = [], 0
    while i < len(data):
        assert data[i] == 0x81, f"not a final text frame at byte {i}"
        n, i = data[i + 1], i + 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        out.append(data[i : i + n])
        i += n
    return out


def sent(conn: Connection) -> list[dict[str, Any]]:
    """Every frame written to conn so far, as JSON, and forget them."""
    transport: FakeTransport = conn.transport  # type: ignore[assignment]
    data, transport.writes = b"".join(transport.writes), []
    return [json.loads(p) for p in payloads(data)]
