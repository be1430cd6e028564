"""One simulated user: its socket, the reader that times and deduplicates deliveries, and
the send side (counting its own echoes, so a publisher knows what is still in flight).

Message texts are `LT<run>:<sender>:<seq>:<monotonic ns>[:padding]`. Message frames are
recognised by the prefix the server writes (protocol.MESSAGE_PREFIX) and the text found
by its key, so most frames are never JSON-parsed; a JSON string cannot hold an unescaped
`"message":"`, so the key search cannot match inside another field. Frames that do not
take the fast path are parsed, so a change of key order costs speed, not correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time

import aiohttp

from .plan import MAX_SEQ, Target
from .stats import Tally

MESSAGE_HEAD = '{"type":"message",'
SKIPPED_HEADS = ('{"type":"presence",', '{"type":"welcome",')
TEXT_KEY = '"message":"'


def message_text(run_id: str, sender: int, seq: int, size: int) -> str:
    text = f"LT{run_id}:{sender}:{seq}:{time.monotonic_ns()}"
    if len(text) < size:
        text += ":" + "x" * (size - len(text) - 1)
    return text


def publish_frame(text: str) -> str:
    """`{"message": text}` for the lobby; texts are ASCII without quotes, no escaping."""
    return '{"message":"' + text + '"}'


def os_reason(error: OSError) -> str:
    """"Connection refused", not "Connect call failed ('127.0.0.1', 1)"."""
    if error.errno and error.errno > 0:  # resolver errors are negative: strerror knows them
        return os.strerror(error.errno)
    return error.strerror or str(error)


class ConnectFailed(Exception):
    """A socket did not open; str() is a short reason that failures are counted by, and
    retry_after the seconds a 503's Retry-After asked for (0 when it said nothing)."""

    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Client:
    __slots__ = (
        "closed_by_server", "closing", "counted", "distinct", "drained", "echoed", "index",
        "joined", "marker", "outstanding", "reader", "refused", "seen", "sent", "tally",
        "target", "token", "username", "window", "ws",
    )

    def __init__(self, index: int, username: str, target: Target, run_id: str, tally: Tally,
                 *, counted: bool = True) -> None:
        self.index = index
        self.username = username
        self.target = target
        self.token = ""
        self.tally = tally
        self.counted = counted  # deliveries to this client count in the results
        self.marker = TEXT_KEY + "LT" + run_id + ":"
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.joined = asyncio.Event()
        self.closed_by_server: str | None = None
        self.closing = False
        self.seen: dict[int, bytearray] = {}  # sender -> one byte per seq received
        self.distinct = 0  # messages of this run received, duplicates not counted
        # send side
        self.sent = 0
        self.echoed = 0
        self.refused = 0
        self.outstanding = 0
        self.window: asyncio.Semaphore | None = None
        self.drained = asyncio.Event()
        self.drained.set()

    # ------------------------------------------------------------ connecting

    async def connect(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Open the socket and wait for the lobby's `joined`; raise ConnectFailed."""
        started = time.monotonic_ns()
        headers = {"Origin": self.target.origin, "Cookie": f"{self.target.cookie}={self.token}"}
        try:
            async with asyncio.timeout(timeout):
                self.ws = await session.ws_connect(
                    self.target.ws, headers=headers, heartbeat=None, autoping=True,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
                self.reader = asyncio.create_task(self._read(self.ws))
                joined = asyncio.create_task(self.joined.wait())
                await asyncio.wait((joined, self.reader), return_when=asyncio.FIRST_COMPLETED)
                joined.cancel()
        except TimeoutError:
            raise ConnectFailed(f"no joined frame within {timeout:g} s") from None
        except aiohttp.WSServerHandshakeError as exc:
            raise ConnectFailed(f"HTTP {exc.status} on upgrade") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(f"cannot connect: {os_reason(exc.os_error)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}"[:120]) from None
        if not self.joined.is_set():
            raise ConnectFailed(f"closed before joining: {self.closed_by_server or 'no reason'}")
        self.tally.connect.record_ns(time.monotonic_ns() - started)

    async def close(self) -> None:
        """Close from our side; the reader then ends without counting a server close."""
        self.closing = True
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()

    # --------------------------------------------------------------- reading

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        text = aiohttp.WSMsgType.TEXT
        ended = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                 aiohttp.WSMsgType.ERROR)
        while True:
            msg = await ws.receive()
            if msg.type is text:
                self.on_text(msg.data)
            elif msg.type in ended:
                if not self.closing:
                    self._on_close(ws.close_code, str(msg.extra or ""))
                return

    def _on_close(self, code: int | None, reason: str) -> None:
        self.closed_by_server = f"{code} {reason}".strip()
        if self.joined.is_set():  # a refused upgrade is a connect failure, not a drop
            self.tally.closes[str(code)] += 1
        # Nothing more comes back: what is still out may or may not have been published.
        self.tally.unconfirmed += self.outstanding
        while self.outstanding > 0:
            self._settle()  # frees a sender waiting on the window

    def on_text(self, data: str) -> None:
        """One text frame from the server (the reader calls this; tests may too)."""
        if data.startswith(MESSAGE_HEAD):
            start = data.find(self.marker)
            if start >= 0:
                start += len(self.marker)
                self._on_ours(data[start : data.find('"', start)])
            return
        if data.startswith(SKIPPED_HEADS):
            return
        self._on_other(data)

    def _on_other(self, data: str) -> None:
        try:
            frame = json.loads(data)
        except ValueError:
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "message":
            text = frame.get("message")
            prefix = self.marker[len(TEXT_KEY) :]
            if isinstance(text, str) and text.startswith(prefix):
                self._on_ours(text[len(prefix) :])
        elif kind == "joined" and frame.get("room") == "lobby":
            self.joined.set()
        elif kind == "error":
            self.tally.errors[str(frame.get("code"))] += 1
            if self.outstanding > 0:  # a publish the server refused: it will not echo
                self._refuse()

    def _on_ours(self, body: str) -> None:
        now = time.monotonic_ns()
        fields = body.split(":", 3)
        try:
            sender, seq, sent = int(fields[0]), int(fields[1]), int(fields[2])
        except (ValueError, IndexError):
            return
        if not 0 <= seq < MAX_SEQ:
            return
        if sender == self.index and self.outstanding > 0:
            self.echoed += 1
            self._settle()
        if not self.counted:
            return
        bits = self.seen.get(sender)
        if bits is None:
            bits = self.seen[sender] = bytearray(max(64, seq + 1))
        elif seq >= len(bits):
            bits.extend(bytes(max(seq + 1 - len(bits), len(bits))))
        tally = self.tally
        if bits[seq]:
            tally.duplicates += 1
            return
        bits[seq] = 1
        self.distinct += 1
        tally.deliveries += 1
        tally.latency.record_ns(now - sent)
        if now > tally.last_receive_ns:
            tally.last_receive_ns = now

    # --------------------------------------------------------------- sending

    async def send(self, run_id: str, seq: int, size: int) -> None:
        """Send one lobby message; with a window, wait for a free slot first."""
        if self.window is not None:
            await self.window.acquire()
        ws = self.ws
        if ws is None or ws.closed or self.closed_by_server is not None:
            if self.window is not None:
                self.window.release()
            return
        text = message_text(run_id, self.index, seq, size)
        self.outstanding += 1
        self.drained.clear()
        self.sent += 1
        self.tally.sent_one(time.monotonic_ns())
        try:
            await ws.send_str(publish_frame(text))
        except (aiohttp.ClientError, ConnectionError):
            self.tally.errors["send_failed"] += 1
            self._refuse()

    def _refuse(self) -> None:
        self.refused += 1
        self.tally.refused += 1
        self._settle()

    def _settle(self) -> None:
        """One of our publishes came back (or was refused): free its slot."""
        if self.outstanding <= 0:
            return
        self.outstanding -= 1
        if self.window is not None:
            self.window.release()
        if self.outstanding == 0:
            self.drained.set()
