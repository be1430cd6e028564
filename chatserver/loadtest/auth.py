"""Getting an `authToken` for each simulated user: minted from the dev key, or the dev sign-in.

Failures that would fail every client the same way (rate limit, wrong key, wrong password)
raise SignInError with advice, so the run stops at the first one instead of N times.
"""

from __future__ import annotations

import asyncio

import aiohttp

from ..auth.dev import DevIssuer
from .plan import Plan, RunError, Target

AUTH_COOKIES = ("__Host-authToken", "authToken")  # Secure or not: see auth/cookies.py
LOGIN_RATE_ADVICE = (
    "the dev sign-in allows CHAT_LOGIN_RATE sign-ins a minute per IP and per username "
    "(default 10); start the server with CHAT_LOGIN_RATE=<more than --clients>, or pass "
    "--private-key with the PEM the server reads from CHAT_DEV_KEY_FILE"
)


class SignInError(RunError):
    """Signing in cannot work for this run; the message says what to change."""


class Tokens:
    """Hands out tokens for usernames, by the plan's method."""

    def __init__(self, plan: Plan) -> None:
        self.password = plan.password
        self.issuer: DevIssuer | None = None
        if plan.private_key_pem is not None:
            # Long enough that the server does not close sockets with 4001 mid-run.
            ttl = max(900, int(plan.deadline) + 300)
            self.issuer = DevIssuer(plan.private_key_pem.encode(), ttl=ttl)

    def mint(self, username: str) -> str:
        assert self.issuer is not None
        return self.issuer.mint(username)

    async def login(self, session: aiohttp.ClientSession, target: Target, username: str,
                    timeout: float) -> str:
        try:
            async with asyncio.timeout(timeout):
                return await dev_login(session, target, username, self.password)
        except TimeoutError:
            raise SignInError(f"POST {target.login}: no answer within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SignInError(f"POST {target.login}: {exc}") from None


async def dev_login(session: aiohttp.ClientSession, target: Target, username: str,
                    password: str) -> str:
    """POST /auth/login and return the authToken cookie it sets."""
    async with session.post(target.login, json={"username": username, "password": password},
                            headers={"Origin": target.origin}) as response:
        if response.status == 200:
            cookie = next((response.cookies[n] for n in AUTH_COOKIES if n in response.cookies),
                          None)
            if cookie is None or not cookie.value:
                raise SignInError(f"POST {target.login} answered 200 without an authToken cookie")
            return cookie.value
        body = (await response.text())[:200]
    if response.status == 429:
        raise SignInError(f"POST {target.login} answered 429 rate_limited: {LOGIN_RATE_ADVICE}")
    if response.status == 401:
        raise SignInError(f"POST {target.login} answered 401: wrong --password "
                          "(the server's CHAT_DEV_PASSWORD)")
    if response.status == 403:
        raise SignInError(f"POST {target.login} answered 403 {body}: is {target.origin} in the "
                          "server's CHAT_ALLOWED_ORIGINS? (set --origin)")
    raise SignInError(f"POST {target.login} answered {response.status}: {body}")


async def check_token(session: aiohttp.ClientSession, target: Target, token: str) -> None:
    """Ask GET /auth/me whether the server accepts a minted token (one request per URL)."""
    async with session.get(target.me, headers={"Cookie": f"{target.cookie}={token}"}) as response:
        if response.status == 200:
            return
        body = (await response.text())[:200]
    raise SignInError(
        f"GET {target.me} refused a token minted with --private-key ({response.status} {body}): "
        "start the server with CHAT_DEV_KEY_FILE pointing at that same PEM"
    )
