"""The auth middleware: Origin allowlist, CSRF rules, and the cookie's token -> user.

/ws requests get `request[USER]` or `request[AUTH_FAILURE]` before the handler runs;
the handler upgrades and closes refused ones with that close, so the browser learns why.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler

from ..admission import Admission
from ..config import Settings
from ..observability import Metrics
from ..protocol import INVALID_TOKEN, KEYS_UNAVAILABLE, NOT_SIGNED_IN, REVOKED, Close
from ..responses import error
from .cookies import cookie_names
from .tokens import KeysUnavailable, TokenError, TokenVerifier, User

USER = web.RequestKey("chatserver.user", User)
AUTH_FAILURE = web.RequestKey("chatserver.auth_failure", Close)


def origin_allowed(request: web.Request, settings: Settings) -> bool:
    return request.headers.get("Origin") in settings.allowed_origins


def client_ip(request: web.Request, settings: Settings) -> str:
    """The peer address, or X-Forwarded-For's nearest untrusted hop behind trusted proxies."""
    peer = request.remote or ""
    if not settings.trusted_proxies or not _trusted(peer, settings):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, settings):
            return hop
    return hops[0] if hops else peer


def _trusted(address: str, settings: Settings) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in settings.trusted_proxies)


class AuthGate:
    """The middleware, a bound method (no closure frame per request or per socket)."""

    def __init__(self, settings: Settings, verifier: TokenVerifier, metrics: Metrics,
                 admission: Admission) -> None:
        self._settings = settings
        self._verifier = verifier
        self._metrics = metrics
        self._admission = admission
        self._cookie = cookie_names(settings).auth

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/ws":
            if not origin_allowed(request, self._settings):
                self._metrics.auth_failures.labels("origin").inc()
                return error(403, "forbidden", "origin not allowed")
            shed = self._admission.enter(request)
            if shed is not None:
                return shed
            try:
                await self._authenticate(request)
                return await handler(request)
            finally:
                self._admission.leave(request)  # if the handler has not already
        if request.method == "POST" and request.path.startswith("/auth/"):
            # CSRF: a cookie-authenticated POST must come from our page, as JSON.
            if not origin_allowed(request, self._settings):
                return error(403, "forbidden", "origin not allowed")
            if request.content_type != "application/json":
                return error(403, "forbidden", "Content-Type must be application/json")
        return await handler(request)

    async def _authenticate(self, request: web.Request) -> None:
        try:
            request[USER] = await self._verifier.verify(self._cookie.read(request))
        except KeysUnavailable:
            self._metrics.auth_failures.labels("jwks_unavailable").inc()
            request[AUTH_FAILURE] = KEYS_UNAVAILABLE
        except TokenError as exc:
            self._metrics.auth_failures.labels(exc.reason).inc()
            request[AUTH_FAILURE] = _refusal(exc)


def _refusal(exc: TokenError) -> Close:
    """The close for a refused upgrade: 1008 for every refused token, an expired one
    included (the client asks /auth/me and refreshes before it gives up); 4001 is for a
    token that expires while its socket is open."""
    if exc.reason == "missing":
        return NOT_SIGNED_IN
    if exc.reason == "revoked":  # the verifier asked the denylist (auth/denylist.py)
        return REVOKED
    return INVALID_TOKEN.because(exc.reason)
