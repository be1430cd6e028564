"""Control messages on a user's channel, acted on by every worker that has the user:
sign-out (close their sockets) and a membership change (re-decide one room).

A sign-out that cannot reach Redis is not lost: this worker's sockets close at once and
the broadcast is retried in the background until Redis takes it; since pub/sub only
reaches workers already resubscribed, it is sent a few more times after the first
success. Each carries its time, and closes only sockets whose token was issued before
it, so the repeats never touch a session signed in afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from . import protocol
from .broker.base import Broker, BrokerUnavailable
from .connection import Connection
from .hub import Hub
from .permissions import Access, Gatekeeper
from .protocol import SIGNED_OUT

log = logging.getLogger(__name__)

SIGNOUT = b"!signout "  # + the sign-out's unix time: close sockets of tokens issued before
RECHECK = b"!recheck "  # + a room: re-decide the user's access to it
RETRY_FOR = 600.0  # seconds a sign-out is retried while Redis is down
RESEND_AFTER = (1.0, 3.0, 6.0, 12.0)  # seconds after the first success: for late resubscribers


class UserControl:
    def __init__(self, hub: Hub, broker: Broker, gate: Gatekeeper,
                 leave: Callable[[Connection, str], Awaitable[None]]) -> None:
        self._hub = hub
        self._broker = broker
        self._gate = gate
        self._leave = leave  # ChatService's: hub, presence, unsubscribe
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver_user(self, sub: str, payload: bytes) -> None:
        """The broker's per-user payloads: control messages here, the rest to the Hub."""
        if payload.startswith(SIGNOUT):
            self._close_sessions(sub, float(payload[len(SIGNOUT):] or 0))
        elif payload.startswith(RECHECK):
            self._spawn(self._recheck(sub, payload[len(RECHECK):].decode()))
        else:
            self._hub.deliver_user(sub, payload)

    async def sign_out(self, sub: str) -> None:
        """Close every socket of this user on every worker and replica."""
        now = time.time()
        self._close_sessions(sub, now)
        message = SIGNOUT + repr(now).encode()
        try:
            await self._broker.send_user(sub, message)
        except BrokerUnavailable:
            log.warning("sign-out of %s not broadcast (broker unavailable); retrying", sub)
            self._spawn(self._retry(sub, message))

    async def grant(self, room: str, sub: str, role: str) -> None:
        await self._gate.memberships.grant(room, sub, role)
        await self._broker.send_user(sub, RECHECK + room.encode())

    async def revoke(self, room: str, sub: str) -> bool:
        found = await self._gate.memberships.revoke(room, sub)
        await self._broker.send_user(sub, RECHECK + room.encode())
        return found

    def _close_sessions(self, sub: str, before: float) -> None:
        for conn in list(self._hub.users.get(sub, ())):
            if conn.user.iat <= before:
                conn.kick(SIGNED_OUT)

    async def _retry(self, sub: str, message: bytes) -> None:
        deadline, pause, tries = time.monotonic() + RETRY_FOR, 0.5, 1
        while time.monotonic() < deadline:
            await asyncio.sleep(pause)
            tries += 1
            try:
                await self._broker.send_user(sub, message)
            except BrokerUnavailable:
                pause = min(pause * 2, 5.0)
                continue
            log.info("sign-out of %s broadcast after %d tries", sub, tries)
            for wait in RESEND_AFTER:  # idempotent: it names its time
                await asyncio.sleep(wait)
                with contextlib.suppress(BrokerUnavailable):
                    await self._broker.send_user(sub, message)
            return
        log.error("sign-out of %s never reached the broker in %.0f s", sub, RETRY_FOR)

    async def _recheck(self, sub: str, room: str) -> None:
        for conn in list(self._hub.users.get(sub, ())):
            if room not in conn.rooms or conn.closed:
                continue
            try:
                access = await self._gate.access(room, conn.user)
            except BrokerUnavailable:
                access = Access(False, False)  # cannot tell: closed, as by default
            if not access.read:
                await self._leave(conn, room)
                conn.send(protocol.left(room, reason="revoked"))
            elif access.write and conn.readonly:
                conn.readonly = conn.readonly - {room} or None
            elif not access.write:
                conn.readonly = (conn.readonly or set()) | {room}

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel what is still retrying (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
