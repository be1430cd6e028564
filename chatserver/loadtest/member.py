"""A storm client: a member of one room that behaves like the browser client.

When its socket ends it reconnects with full-jitter backoff (a longer floor after 1013,
never sooner than a 503's Retry-After), to the next URL of the list, and resumes its room
with the last message id and epoch it saw; the server owes it exactly the messages it
missed. It counts each message once (a second copy is a duplicate), and one member of
each room publishes at a steady rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp

from .client import ConnectFailed, message_text, os_reason
from .plan import MAX_SEQ, Target
from .stats import Histogram, Tally
from .storm_book import Book

# The browser client's policy (static/socket.js): seconds.
BASE, CAP, TRY_AGAIN_BASE, STABLE_AFTER = 1.0, 30.0, 5.0, 10.0
TRY_AGAIN = 1013


def backoff(attempt: int, code: int | None, retry_after: float) -> float:
    """Full jitter, random(0, min(cap, base * 2^attempt)); 1013 asks for a longer floor,
    and a 503's Retry-After is waited first (the jitter on top spreads those retries)."""
    base = TRY_AGAIN_BASE if code == TRY_AGAIN else BASE
    floor = base if code == TRY_AGAIN else 0.0
    delay = min(CAP, floor + random.uniform(0, min(CAP, base * 2 ** min(attempt, 16))))
    return retry_after + delay


class Unreachable(ConnectFailed):
    """No TCP connection at all: nobody listens there now."""


class Member:
    __slots__ = (
        "acked", "attempt", "book", "dropped", "epoch", "index", "last_id", "marker", "online",
        "outstanding", "pending", "publisher", "ready", "resuming", "room", "seen", "sent",
        "stopping", "tally", "targets", "token", "turn", "username", "ws",
    )

    def __init__(self, index: int, username: str, targets: Sequence[Target], room: str,
                 publisher: int, run_id: str, tally: Tally, book: Book) -> None:
        self.index = index
        self.username = username
        self.targets = targets
        self.turn = index % len(targets)  # the URL it uses now; the next one after a drop
        self.room = room
        self.publisher = publisher  # the client number of the room's publisher
        self.token = ""
        self.tally = tally
        self.book = book
        self.marker = "LT" + run_id + ":"
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready = asyncio.Event()  # the room is joined (or resumed) on the current socket
        self.online = False
        self.stopping = False
        self.dropped = False  # ever lost its socket: its deliveries are no survivor's
        self.pending = False  # dropped and not resumed yet
        self.resuming = False  # between a join with since and its `recovered`: replays
        self.attempt = 0
        self.last_id: str | None = None
        self.epoch: str | None = None
        self.seen: dict[int, bytearray] = {}  # publisher -> one byte per seq received
        # as the room's publisher
        self.sent = 0
        self.acked: set[int] = set()
        self.outstanding: set[int] = set()

    @property
    def target(self) -> Target:
        return self.targets[self.turn]

    # -------------------------------------------------------------- sockets

    async def connect(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Open a socket and have the room (resumed when we saw any of it); ConnectFailed."""
        started = time.monotonic_ns()
        self.ready.clear()
        try:
            await self._open(session, timeout)
        except BaseException:
            await self._discard()
            raise
        self.online = True
        self.tally.connect.record_ns(time.monotonic_ns() - started)

    async def _open(self, session: aiohttp.ClientSession, timeout: float) -> None:
        target = self.target
        headers = {"Origin": target.origin, "Cookie": f"{target.cookie}={self.token}"}
        try:
            async with asyncio.timeout(timeout):
                self.ws = await session.ws_connect(target.ws, headers=headers, heartbeat=None,
                                                   timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
                await self._join(self.ws)
        except TimeoutError:
            raise ConnectFailed(f"no joined frame within {timeout:g} s") from None
        except aiohttp.WSServerHandshakeError as exc:
            retry = exc.headers.get("Retry-After", "") if exc.headers else ""
            raise ConnectFailed(f"HTTP {exc.status} on upgrade",
                                float(retry) if retry.isdigit() else 0.0) from None
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(f"cannot connect: {os_reason(exc.os_error)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}"[:120]) from None

    async def _join(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Join (or resume) the room and read until the server says it is ours again."""
        join = {"type": "join", "room": self.room, "ref": "join"}
        if self.last_id is not None and self.epoch is not None:
            join.update(since=self.last_id, epoch=self.epoch)
            self.resuming = True
        await ws.send_str(json.dumps(join))
        while not self.ready.is_set():
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectFailed(f"closed before joining: {ws.close_code} {msg.extra or ''}"
                                    .strip())
            self.on_text(msg.data)

    async def _discard(self) -> None:
        ws, self.ws = self.ws, None
        self.resuming = False
        if ws is not None and not ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await ws.close()

    async def keep(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Read until the socket ends, then reconnect and resume, until stop()."""
        while not self.stopping:
            ws = self.ws
            assert ws is not None
            stable = asyncio.get_running_loop().call_later(STABLE_AFTER, self._stable)
            code = await self._read(ws)
            stable.cancel()
            if self.stopping:
                return
            self._drop(code)
            retry_after, at_once = 0.0, False
            while not self.stopping:
                if not at_once:
                    await asyncio.sleep(backoff(self.attempt, code, retry_after))
                    self.attempt += 1
                try:
                    await self.connect(session, timeout)
                except ConnectFailed as exc:
                    self.book.attempts[str(exc)] += 1
                    code, retry_after = None, exc.retry_after
                    self.turn = (self.turn + 1) % len(self.targets)
                    # A server that refused the TCP connection is down: the next URL is
                    # tried at once, as a proxy tries its next upstream.
                    at_once = isinstance(exc, Unreachable) and not at_once
                    continue
                self.book.attempts["resumed"] += 1
                break

    def _stable(self) -> None:
        self.attempt = 0  # as the browser client: a connection that lasted resets the backoff

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.on_text(msg.data)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code

    def _drop(self, code: int | None) -> None:
        self.online = False
        if not self.dropped:
            self.book.dropped_from[self.index % len(self.targets)] += 1
        self.dropped = self.pending = True
        self.book.drops[str(code)] += 1
        self.book.dropped_ns.append(time.monotonic_ns())
        self.outstanding.clear()  # what was in flight shows up in the replay, or was not kept
        self.turn = (self.turn + 1) % len(self.targets)

    async def stop(self) -> None:
        self.stopping = True
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.ws.close()

    # --------------------------------------------------------------- frames

    def on_text(self, data: str) -> None:
        if data.startswith('{"type":"presence"'):
            if self.book.storming:
                self.book.presence_events += 1
            return
        try:
            frame = json.loads(data)
        except ValueError:
            return
        kind = frame.get("type")
        if kind == "message" and frame.get("room") == self.room:
            self._on_message(frame)
        elif kind == "joined" and frame.get("room") == self.room:
            self.epoch = frame.get("epoch")
            self._on_ready()
        elif kind == "recovered" and frame.get("room") == self.room:
            self.epoch = frame.get("epoch")
            self.resuming = False
            if not frame.get("complete"):
                self.book.incomplete += 1
            self._on_ready()
        elif kind == "ack":
            self._settle(frame.get("ref"), acked=True)
        elif kind == "error":
            self.tally.errors[str(frame.get("code"))] += 1
            if frame.get("ref") == "join":
                raise ConnectFailed(f"join refused: {frame.get('code')}")
            self._settle(frame.get("ref"), acked=False)

    def _on_ready(self) -> None:
        if self.pending:
            self.pending = False
            self.book.resumed_ns.append(time.monotonic_ns())
        self.ready.set()

    def _on_message(self, frame: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        self.last_id = frame.get("id")
        text = frame.get("message")
        if not isinstance(text, str) or not text.startswith(self.marker):
            return
        try:
            sender, seq, sent_ns = (int(f) for f in text[len(self.marker):].split(":", 3)[:3])
        except ValueError:
            return
        if not 0 <= seq < MAX_SEQ:
            return
        if sender == self.index:
            self.acked.add(seq)  # our own message came back: it is stored
        bits = self.seen.setdefault(sender, bytearray())
        if seq >= len(bits):
            bits.extend(bytes(max(64, seq + 1 - len(bits), len(bits))))
        if bits[seq]:
            self.tally.duplicates += 1
            return
        bits[seq] = 1
        self.tally.deliveries += 1
        self.tally.last_receive_ns = max(self.tally.last_receive_ns, now)
        if self.resuming:
            return  # a replay: its age is how long we were away, not the server's latency
        self.tally.latency.record_ns(now - sent_ns)
        if self.book.storming and not self.dropped:
            url = sender % len(self.targets)  # where the publisher first connected
            self.book.storm_latency.setdefault(url, Histogram()).record_ns(now - sent_ns)

    # ------------------------------------------------------------ publishing

    async def publish(self, run_id: str, size: int) -> None:
        """One message to the room, unless offline (then it is skipped, as a user would wait)."""
        ws = self.ws
        if not self.online or ws is None or ws.closed or not self.ready.is_set():
            self.book.skipped += 1
            return
        seq = self.sent
        self.sent += 1
        self.tally.sent_one(time.monotonic_ns())
        self.outstanding.add(seq)
        text = message_text(run_id, self.index, seq, size)
        frame = {"type": "publish", "room": self.room, "message": text, "ref": f"p{seq}"}
        try:
            await ws.send_str(json.dumps(frame))
        except (aiohttp.ClientError, ConnectionError):
            self.outstanding.discard(seq)

    def _settle(self, ref: object, *, acked: bool) -> None:
        if not isinstance(ref, str) or not ref.startswith("p") or not ref[1:].isdigit():
            return
        seq = int(ref[1:])
        self.outstanding.discard(seq)
        if acked:
            self.acked.add(seq)
        else:
            self.tally.refused += 1

    def missing(self, stored: Iterable[int]) -> int:
        """How many of the room's stored messages (the publisher's seqs) never reached us."""
        bits = self.seen.get(self.publisher, bytearray())
        return sum(1 for seq in stored if seq >= len(bits) or not bits[seq])
