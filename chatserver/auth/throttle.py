"""How often a client may try to sign in, shared by every worker and replica.

Per client address, every attempt counts (CHAT_LOGIN_RATE a minute), and so do the
unauthenticated calls that would cost a Cognito request (refresh, sign-out). Per
username, only *failed* attempts that passed the address limit count: past
CHAT_LOGIN_RATE failures in 15 minutes, each further failure imposes a wait on that
name that doubles (1 s, 2 s, 4 s ... 60 s). A slow-down a user can sit out, never a lock
that anyone could put on anyone's account by typing their name.
"""

from __future__ import annotations

import time

from ..counters import CounterUnavailable, HitCounter

LOGIN_WINDOW = 60  # seconds of the per-address window
FAIL_WINDOW = 15 * 60  # seconds over which a username's failures add up
MAX_WAIT = 60.0  # seconds, the longest wait a username's failures impose
CALLS_PER_LOGIN = 3  # refresh/sign-out calls an address may make per sign-in attempt


def canonical(username: str) -> str:
    """Cognito usernames are case-insensitive (the default since 2020): Alice is alice."""
    return username.strip().lower()


class LoginThrottle:
    def __init__(self, hits: HitCounter, per_minute: int) -> None:
        self._hits = hits
        self._per_minute = per_minute

    async def wait_before_login(self, ip: str, username: str) -> float:
        """Seconds this attempt must wait (answer 429 with them), or 0 to go ahead.
        Fails open when the shared store is down: Cognito keeps its own limits."""
        try:
            if await self._hits.hit(f"login-ip:{ip}", LOGIN_WINDOW) > self._per_minute:
                return float(LOGIN_WINDOW - int(time.time()) % LOGIN_WINDOW)
            return await self._hits.held(f"login-wait:{canonical(username)}")
        except CounterUnavailable:
            return 0.0

    async def wait_before_call(self, ip: str) -> float:
        """For refresh and sign-out, which cost a Cognito call before anything is known."""
        limit = self._per_minute * CALLS_PER_LOGIN
        try:
            if await self._hits.hit(f"auth-call-ip:{ip}", LOGIN_WINDOW) > limit:
                return float(LOGIN_WINDOW - int(time.time()) % LOGIN_WINDOW)
        except CounterUnavailable:
            pass
        return 0.0

    async def failed(self, username: str) -> None:
        name = canonical(username)
        try:
            failures = await self._hits.hit(f"login-fail:{name}", FAIL_WINDOW)
            if failures >= self._per_minute:
                wait = min(2.0 ** (failures - self._per_minute), MAX_WAIT)
                await self._hits.hold(f"login-wait:{name}", wait)
        except CounterUnavailable:
            pass

    async def succeeded(self, *usernames: str) -> None:
        """A good password clears the failures of the name typed and the canonical one."""
        try:
            for name in {canonical(u) for u in usernames}:
                await self._hits.clear(f"login-fail:{name}", FAIL_WINDOW)
        except CounterUnavailable:
            pass
