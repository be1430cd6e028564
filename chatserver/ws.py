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
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from .auth.tokens import User
from .auth.web import AUTH_FAILURE, USER
from .broker.base import BrokerUnavailable
from .chat import ChatService
from .config import Settings
from .connection import Connection
from .observability import Metrics
from .protocol import (
    BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_LATER,
    LOBBY,
    STREAM_ID,
    error_event,
)

log = logging.getLogger(__name__)

CLOSE_HANDSHAKE_TIMEOUT = 5.0  # seconds a kicked peer has to drain and answer our close


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Closer:
    """What happens when a connection is kicked: count it, wake its handler if it is
    waiting for a frame (the handler then runs the close handshake itself), and make
    sure a peer that never drains cannot pin the socket past the handshake timeout."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, conn: Connection) -> None:
        self._metrics.closes.labels(str(conn.close_code)).inc()
        if conn.close_code == CLOSE_TRY_LATER:
            self._metrics.slow_consumers.inc()
        if conn.reader is not None:
            conn.reader.cancel()  # interrupts only its receive(): see _read_loop
        asyncio.get_running_loop().call_later(
            CLOSE_HANDSHAKE_TIMEOUT + 1, _abort_if_stuck, conn.transport
        )


def _abort_if_stuck(transport: asyncio.Transport) -> None:
    if not transport.is_closing() or transport.get_write_buffer_size():
        transport.abort()


@dataclass
class WsContext:
    settings: Settings
    chat: ChatService
    metrics: Metrics
    closer: Closer
    instance: str
    draining: asyncio.Event


class WsEndpoint:
    """The /ws route. Built with the app; its context arrives at start-up. (A bound
    method, not a wrapper function: every frame on an idle socket's stack is memory.)"""

    def __init__(self) -> None:
        self.ctx: WsContext | None = None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ctx = self.ctx
        assert ctx is not None
        settings = ctx.settings
        ws = web.WebSocketResponse(
            heartbeat=settings.heartbeat or None,
            max_msg_size=settings.max_message_bytes,
            compress=settings.compress,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
        )
        await ws.prepare(request)
        user: User | None = request.get(USER)
        if user is None:
            code, reason = request.get(AUTH_FAILURE, (CLOSE_POLICY, "not signed in"))
            log.info("refused upgrade from %s: %s", request.remote, reason)
            await ws.close(code=code, message=reason.encode())
            return ws
        refusal = _refusal(ctx, user)
        if refusal:
            await ws.close(code=CLOSE_TRY_LATER, message=refusal.encode())
            return ws
        transport = request.transport
        assert transport is not None
        conn = Connection(
            ws,
            transport,
            user,
            backlog_limit=settings.backlog_bytes,
            rate=settings.rate_per_second,
            burst=settings.rate_burst,
            on_kick=ctx.closer,
        )
        try:
            await _serve(request, ctx, conn)
        finally:
            ctx.metrics.connections.dec()
        return ws


def _refusal(ctx: WsContext, user: User) -> str | None:
    if ctx.draining.is_set():
        return "server shutting down"
    hub = ctx.chat.hub
    if len(hub.connections) >= ctx.settings.max_connections:
        return "server full"
    if hub.user_connections(user.sub) >= ctx.settings.max_connections_per_user:
        return "too many connections for this user"
    return None


async def _serve(request: web.Request, ctx: WsContext, conn: Connection) -> None:
    ctx.metrics.connections.inc()
    since, epoch = request.query.get("since"), request.query.get("epoch")
    bad_resume = since is not None and not STREAM_ID.fullmatch(since)
    if bad_resume:
        since = epoch = None
    greeting = {
        "type": "welcome",
        "user": conn.user.public(),
        "rooms": [LOBBY],
        "instance": ctx.instance,
    }
    try:
        await ctx.chat.connect(conn, greeting, since, epoch)
    except BrokerUnavailable:
        await conn.ws.close(code=CLOSE_TRY_LATER, message=b"broker unavailable")
        return
    if bad_resume:
        conn.send(error_event(BAD_REQUEST, "since must be a message id; joined without resume"))
    log.info("connect %s user=%s instance=%s", conn.id, conn.user.sub, ctx.instance)
    task = asyncio.current_task()
    assert task is not None
    try:
        # The read loop (inline: one coroutine frame less per idle socket). A kick
        # cancels the pending receive(), and only that: conn.reader is set around it.
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
            if msg.type == WSMsgType.TEXT:
                ctx.metrics.messages_in.inc()
                await ctx.chat.handle_text(conn, msg.data)
            elif msg.type == WSMsgType.BINARY:
                conn.send(error_event(BAD_REQUEST, "binary frames are not supported"))
            else:
                break  # close, closing, closed or error: the socket is done
        if conn.closed:
            # Our close handshake: send the code, wait (bounded) for the peer's answer.
            await conn.ws.close(
                code=conn.close_code or CLOSE_GOING_AWAY,
                message=conn.close_reason.encode(),
                drain=False,
            )
    finally:
        await ctx.chat.disconnect(conn)
        code = conn.close_code or conn.ws.close_code
        reason = conn.close_reason or ("client closed" if conn.close_code is None else "")
        log.info(
            "disconnect %s user=%s instance=%s code=%s reason=%s",
            conn.id, conn.user.sub, ctx.instance, code, reason,
        )


async def watch_expiry(ctx: WsContext, every: float = 1.0) -> None:
    """Close sockets whose token expired (4001), sweeping once a second: one task per
    worker instead of a timer per connection (memory per idle socket is what counts)."""
    leeway = ctx.settings.token_leeway
    while True:
        await asyncio.sleep(every)
        now = time.time()
        for conn in [c for c in ctx.chat.hub.connections if c.user.exp + leeway <= now]:
            conn.kick(CLOSE_TOKEN_EXPIRED, "token expired")


async def close_all(ctx: WsContext, code: int, reason: str, grace: float) -> None:
    """Kick every connection and wait (bounded) until their handlers are done."""
    for conn in list(ctx.chat.hub.connections):
        conn.kick(code, reason)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ctx.chat.hub.emptied.wait(), grace)
