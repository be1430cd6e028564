"""The /ws handler: upgrade, refuse or register, read loop, and every way a socket closes.

Only this handler task reads from its socket. Other tasks that want a socket closed call
Connection.kick(); the Closer sends the close frame and, if the peer never drains its
backlog, aborts the transport after a bound so a stalled client cannot pin memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from aiohttp import WSMsgType, web

from . import protocol
from .admission import Admission
from .auth.gate import AUTH_FAILURE, USER
from .auth.tokens import User
from .broker.base import BrokerUnavailable
from .chat import ChatService
from .config import Settings
from .connection import Connection
from .observability import Metrics
from .protocol import (
    BAD_REQUEST,
    BROKER_DOWN,
    DRAINING,
    NOT_SIGNED_IN,
    SERVER_FULL,
    SHUTTING_DOWN,
    TOKEN_EXPIRED,
    USER_FULL,
    Close,
    is_message_id,
)

log = logging.getLogger(__name__)

CLOSE_HANDSHAKE_TIMEOUT = 5.0  # seconds a kicked peer has to drain and answer our close
PING_FRAME = b"\x89\x00"  # FIN + ping, no payload (server frames are not masked)
PINGS_PER_PASS = 500  # pings written per event-loop pass by the heartbeat sweep


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Closer:
    """What happens when a connection is kicked: count it, wake its handler if it is
    waiting for a frame (the handler then runs the close handshake itself), and make
    sure a peer that never drains cannot pin the socket past the handshake timeout."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, conn: Connection) -> None:
        assert conn.close is not None
        self._metrics.closes.labels(str(conn.close.code)).inc()
        if conn.close == protocol.SLOW_CONSUMER:
            self._metrics.slow_consumers.inc()
        if conn.reader is not None:
            conn.reader.cancel()  # interrupts only its receive(): see _serve
        asyncio.get_running_loop().call_later(
            CLOSE_HANDSHAKE_TIMEOUT + 1, _abort_if_stuck, conn.transport
        )


def _abort_if_stuck(transport: asyncio.Transport) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


class Tally:
    """Connects, disconnects and refused upgrades since the last line."""

    __slots__ = ("abandoned", "connected", "disconnected", "refused")

    def __init__(self) -> None:
        self.connected = self.disconnected = self.refused = self.abandoned = 0

    def log(self, open_now: int) -> None:
        if self.connected or self.disconnected or self.refused or self.abandoned:
            log.info("connections: +%d -%d refused %d abandoned %d, %d open",
                     self.connected, self.disconnected, self.refused, self.abandoned, open_now)
            self.connected = self.disconnected = self.refused = self.abandoned = 0


class WsEndpoint:
    """The /ws route and the lifecycle of its sockets. The route is the bound method
    `handle` and the read loop is inline in `_serve`, not wrappers or closures: every
    frame on an idle socket's stack is memory, times every connection."""

    def __init__(
        self, *, settings: Settings, chat: ChatService, metrics: Metrics, instance: str,
        admission: Admission,
    ) -> None:
        self.settings = settings
        self.admission = admission  # entered by the auth middleware; left once greeted
        self.chat = chat
        self.metrics = metrics
        self.instance = instance
        self.draining = asyncio.Event()  # set at shutdown: /readyz 503, new sockets 1013
        self._closer = Closer(metrics)
        self.tally = Tally()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.draining.is_set():
            # Before the upgrade, so a proxy retries the handshake on another replica
            # (nginx: proxy_next_upstream http_503) instead of the client backing off.
            return web.json_response(
                {"error": "unavailable", "detail": DRAINING.reason}, status=503,
                headers={"Retry-After": "1"})
        settings = self.settings
        ws = web.WebSocketResponse(
            # No per-socket heartbeat: one sweep per worker pings them all (keep_alive),
            # and the read loop answers pings itself (autoping off) so it sees pongs.
            heartbeat=None,
            autoping=False,
            max_msg_size=settings.max_message_bytes,
            compress=settings.compress,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
        )
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The client gave up before its 101 was written (its own timeout, in a storm):
            # nothing to serve, and no traceback for an everyday event.
            self.tally.abandoned += 1
            return web.Response(status=503)  # aiohttp's own write of it fails quietly
        user = request.get(USER)
        refusal = request.get(AUTH_FAILURE, NOT_SIGNED_IN) if user is None else self._refusal(user)
        if refusal is not None:
            self.admission.leave(request)  # a refusal is a finished handshake
            if user is None:
                self.tally.refused += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("refused upgrade from %s: %s", request.remote, refusal.reason)
            await ws.close(code=refusal.code, message=refusal.reason.encode())
            return ws
        assert user is not None
        transport = request.transport
        assert transport is not None
        conn = Connection(
            ws,
            transport,
            user,
            backlog_limit=settings.backlog_bytes,
            rate=settings.rate_per_second,
            burst=settings.rate_burst,
            on_kick=self._closer,
        )
        self.metrics.connections.inc()
        try:
            await self._serve(request, conn)
        finally:
            self.metrics.connections.dec()
        return ws

    def _refusal(self, user: User) -> Close | None:
        if self.draining.is_set():
            return DRAINING  # began draining during this upgrade
        hub = self.chat.hub
        if len(hub.connections) >= self.settings.max_connections:
            return SERVER_FULL
        if hub.user_connections(user.sub) >= self.settings.max_connections_per_user:
            return USER_FULL
        return None

    async def _serve(self, request: web.Request, conn: Connection) -> None:
        since, epoch = request.query.get("since"), request.query.get("epoch")
        bad_resume = since is not None and not is_message_id(since)
        if bad_resume:
            since = epoch = None
        try:
            await self.chat.connect(conn, self.instance, since, epoch)
        except BrokerUnavailable:
            self.admission.leave(request)
            await conn.ws.close(code=BROKER_DOWN.code, message=BROKER_DOWN.reason.encode())
            return
        self.admission.leave(request)
        if bad_resume:
            detail = "since must be a message id; joined without resume"
            conn.send(protocol.error(BAD_REQUEST, detail))
        self.tally.connected += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect %s user=%s", conn.id, conn.user.sub)
        task = asyncio.current_task()
        assert task is not None
        try:
            # A kick cancels the pending receive(), and only that: conn.reader is set
            # around it.
            while not conn.closed:
                conn.reader = task
                try:
                    msg = await conn.ws.receive()
                except asyncio.CancelledError:
                    conn.reader = None
                    if conn.closed and task.uncancel() == 0:
                        break  # kicked: our close handshake follows
                    raise
                conn.reader = None
                conn.heard = True
                if msg.type == WSMsgType.TEXT:
                    self.metrics.messages_in.inc()
                    await self.chat.handle_text(conn, msg.data)
                elif msg.type == WSMsgType.PONG:
                    pass  # heard: alive
                elif msg.type == WSMsgType.PING:
                    await conn.ws.pong(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.send(protocol.error(BAD_REQUEST, "binary frames are not supported"))
                else:
                    break  # close, closing, closed or error: the socket is done
            if conn.close is not None:
                # Our close handshake: send the code, wait (bounded) for the peer's answer.
                close = conn.close
                await conn.ws.close(code=close.code, message=close.reason.encode(), drain=False)
        finally:
            await self.chat.disconnect(conn)
            code = conn.close.code if conn.close else conn.ws.close_code
            reason = conn.close.reason if conn.close else "client closed"
            self.tally.disconnected += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("disconnect %s user=%s code=%s reason=%s",
                          conn.id, conn.user.sub, code, reason)

    async def keep_alive(self) -> None:
        """Ping every socket each CHAT_HEARTBEAT seconds; one that has sent nothing, not
        even the pong, by the next beat is dead and aborted. One task per worker writing
        a 2-byte frame to each transport, where aiohttp's own heartbeat keeps two timers
        per socket and starts a task per ping: that was half of an idle worker's CPU."""
        every = self.settings.heartbeat
        if not every:
            return
        while True:
            await asyncio.sleep(every)
            for n, conn in enumerate(list(self.chat.hub.connections)):
                if conn.pinged and not conn.heard:
                    conn.transport.abort()  # the read loop ends; the peer sees 1006
                else:
                    conn.heard, conn.pinged = False, True
                    conn.write(PING_FRAME)
                if n % PINGS_PER_PASS == PINGS_PER_PASS - 1:
                    await asyncio.sleep(0)  # let traffic through between slices

    async def watch_expiry(self, every: float = 1.0) -> None:
        """Close sockets whose token expired (4001), sweeping once a second: one task per
        worker instead of a timer per connection (memory per idle socket is what counts).
        The same beat writes the connection tally: at INFO a line a second at most, not a
        line per connect (a reconnect storm would be a log storm)."""
        leeway = self.settings.token_leeway
        while True:
            await asyncio.sleep(every)
            self.tally.log(len(self.chat.hub.connections))
            now = time.time()
            for conn in [c for c in self.chat.hub.connections if c.user.exp + leeway <= now]:
                conn.kick(TOKEN_EXPIRED)

    async def drain(self) -> None:
        """Shutdown: refuse new sockets, close every open one 1001, and wait (bounded by
        CHAT_GRACE) until their handlers are done."""
        if not self.draining.is_set():
            self.chat.broker.hand_off(self.settings.presence_handoff)
        self.draining.set()
        for conn in list(self.chat.hub.connections):
            conn.kick(SHUTTING_DOWN)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.chat.hub.emptied.wait(), self.settings.grace)
