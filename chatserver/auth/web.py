"""HTTP side of auth: the middleware (Origin, CSRF, cookie -> user) and /auth/* routes.

/ws requests get `request[USER]` or `request[AUTH_FAILURE]` before the handler runs;
the handler upgrades and closes refused ones with the code, so the browser learns why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..broker.base import Broker, BrokerUnavailable
from ..config import Settings
from ..observability import Metrics
from ..protocol import CLOSE_INTERNAL, CLOSE_POLICY
from .cognito import ChallengeRequired, CognitoClient, CognitoError, CognitoUnavailable, Tokens
from .dev import DEV_USERNAME, REFRESH_TTL, DevIssuer
from .tokens import KeysUnavailable, TokenError, TokenVerifier, User

log = logging.getLogger(__name__)

AUTH_COOKIE = "authToken"
REFRESH_COOKIE = "refreshToken"
USER = "chatserver.user"
AUTH_FAILURE = "chatserver.auth_failure"
LOGIN_WINDOW = 60
MAX_CREDENTIAL_CHARS = 256
COGNITO_REFRESH_MAX_AGE = 30 * 24 * 3600  # Cognito's default refresh token lifetime
REVOKE_TIMEOUT = 2.0  # seconds a sign-out waits for Cognito to revoke the refresh token

BAD_CREDENTIALS = {"NotAuthorizedException", "UserNotFoundException", "UserNotConfirmedException"}


@dataclass
class AuthService:
    settings: Settings
    verifier: TokenVerifier
    broker: Broker
    metrics: Metrics
    dev: DevIssuer | None = None
    refresh_verifier: TokenVerifier | None = None  # dev refresh tokens
    cognito: CognitoClient | None = None


def error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "detail": detail, **extra}, status=status)


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
    """The auth middleware. Built with the app; its AuthService arrives at start-up."""

    def __init__(self) -> None:
        self.auth: AuthService | None = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = self.auth
        if auth is None:  # still starting up: nothing is routed yet
            return await handler(request)  # type: ignore[no-any-return]
        if request.path == "/ws":
            if not origin_allowed(request, auth.settings):
                auth.metrics.auth_failures.labels("origin").inc()
                return error(403, "forbidden", "origin not allowed")
            try:
                request[USER] = await auth.verifier.verify(request.cookies.get(AUTH_COOKIE))
            except KeysUnavailable:
                auth.metrics.auth_failures.labels("jwks_unavailable").inc()
                request[AUTH_FAILURE] = (CLOSE_INTERNAL, "auth keys unavailable, retry")
            except TokenError as exc:
                auth.metrics.auth_failures.labels(exc.reason).inc()
                request[AUTH_FAILURE] = _refusal(exc)
        elif request.method == "POST" and request.path.startswith("/auth/"):
            # CSRF: a cookie-authenticated POST must come from our page, as JSON.
            if not origin_allowed(request, auth.settings):
                return error(403, "forbidden", "origin not allowed")
            if request.content_type != "application/json":
                return error(403, "forbidden", "Content-Type must be application/json")
        return await handler(request)  # type: ignore[no-any-return]


def _refusal(exc: TokenError) -> tuple[int, str]:
    """Close code and reason for a refused upgrade: 1008 for every refused token, an
    expired one included (the client asks /auth/me and refreshes before it gives up);
    4001 is for a token that expires while its socket is open."""
    if exc.reason == "missing":
        return CLOSE_POLICY, "missing token"
    return CLOSE_POLICY, f"invalid token: {exc.reason}"


class AuthRoutes:
    def __init__(self, auth: AuthService, sign_out: Any) -> None:
        self.auth = auth
        self.settings = auth.settings
        self._sign_out = sign_out

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/auth/login", self.login)
        app.router.add_post("/auth/refresh", self.refresh)
        app.router.add_get("/auth/me", self.me)
        app.router.add_post("/auth/logout", self.logout)

    async def login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", "body must be JSON")
        except web.HTTPRequestEntityTooLarge:
            return error(413, "too_large", "body too large")
        username = body.get("username") if isinstance(body, dict) else None
        password = body.get("password", "") if isinstance(body, dict) else None
        if not isinstance(username, str) or not username.strip() or not isinstance(password, str):
            return error(400, "bad_request", "username and password must be strings")
        username = username.strip()
        if len(username) > MAX_CREDENTIAL_CHARS or len(password) > MAX_CREDENTIAL_CHARS:
            return error(400, "bad_request", "username or password too long")
        if await self._too_many(client_ip(request, self.settings), username):
            self.auth.metrics.auth_failures.labels("login_rate").inc()
            response = error(429, "rate_limited", "too many sign-in attempts; wait a minute")
            response.headers["Retry-After"] = str(LOGIN_WINDOW - int(time.time()) % LOGIN_WINDOW)
            return response
        if self.auth.dev is not None:
            return await self._dev_login(username, password)
        return await self._cognito_login(username, password)

    async def _too_many(self, ip: str, username: str) -> bool:
        limit = self.settings.login_rate_per_minute
        try:
            by_ip = await self.auth.broker.hit(f"login-ip:{ip}", LOGIN_WINDOW)
            by_name = await self.auth.broker.hit(f"login-user:{username.lower()}", LOGIN_WINDOW)
        except BrokerUnavailable:
            return False  # fail open: Cognito keeps its own limits
        return by_ip > limit or by_name > limit

    async def _dev_login(self, username: str, password: str) -> web.Response:
        assert self.auth.dev is not None
        expected = self.settings.dev_password
        if not DEV_USERNAME.fullmatch(username):
            return error(400, "bad_request", "username: 1-64 of A-Z a-z 0-9 _ . @ -")
        if expected is not None and not hmac.compare_digest(password.encode(), expected.encode()):
            self.auth.metrics.auth_failures.labels("bad_credentials").inc()
            return error(401, "invalid_credentials", "wrong username or password")
        token = self.auth.dev.mint(username)
        user = await self.auth.verifier.verify(token)
        response = web.json_response({"user": user.public()})
        self._set_auth_cookie(response, token, user)
        self._set_cookie(
            response, REFRESH_COOKIE, self.auth.dev.mint_refresh(username), "/auth", REFRESH_TTL
        )
        return response

    async def _cognito_login(self, username: str, password: str) -> web.Response:
        assert self.auth.cognito is not None
        try:
            tokens = await self.auth.cognito.login(username, password)
        except CognitoError as exc:
            return self._cognito_error(exc)
        except ChallengeRequired as exc:
            return error(409, "challenge", "Cognito requires a challenge", challenge=exc.challenge)
        except CognitoUnavailable as exc:
            log.warning("cognito login failed: %s", exc)
            return error(503, "unavailable", "sign-in service unavailable; try again")
        return await self._tokens_response(tokens, tokens.refresh_token)

    def _cognito_error(self, exc: CognitoError) -> web.Response:
        if exc.kind in BAD_CREDENTIALS:
            self.auth.metrics.auth_failures.labels("bad_credentials").inc()
            return error(401, "invalid_credentials", "wrong username or password")
        if exc.kind == "PasswordResetRequiredException":
            return error(403, "password_reset_required", "the password must be reset")
        if exc.kind in ("TooManyRequestsException", "LimitExceededException"):
            return error(429, "rate_limited", "too many requests; try again later")
        if exc.kind == "InvalidParameterException":
            return error(400, "bad_request", "Cognito refused the request parameters")
        log.warning("cognito refused sign-in: %s (HTTP %s)", exc.kind, exc.status)
        return error(503, "unavailable", "sign-in service refused the request")

    async def _tokens_response(self, tokens: Tokens, refresh_token: str | None) -> web.Response:
        token = tokens.id_token if self.settings.token_use == "id" else tokens.access_token
        try:
            user = await self.auth.verifier.verify(token)
        except TokenError as exc:
            log.warning("Cognito issued a token we refuse: %s", exc.reason)
            return error(503, "unavailable", "sign-in service misconfigured")
        response = web.json_response({"user": user.public()})
        self._set_auth_cookie(response, token, user)
        if refresh_token:
            # user.username is Cognito's own name for the user (the token's username or
            # cognito:username), which the refresh SECRET_HASH needs; not what was typed.
            packed = base64.urlsafe_b64encode(user.username.encode()).decode() + "." + refresh_token
            self._set_cookie(response, REFRESH_COOKIE, packed, "/auth", COGNITO_REFRESH_MAX_AGE)
        return response

    async def refresh(self, request: web.Request) -> web.Response:
        value = request.cookies.get(REFRESH_COOKIE)
        if not value:
            return error(401, "unauthenticated", "no refresh token")
        if self.auth.dev is not None:
            assert self.auth.refresh_verifier is not None
            try:
                old = await self.auth.refresh_verifier.verify(value)
            except TokenError:
                return self._signed_out(error(401, "unauthenticated", "refresh token refused"))
            token = self.auth.dev.mint(old.username)
            user = await self.auth.verifier.verify(token)
            response = web.json_response({"user": user.public()})
            self._set_auth_cookie(response, token, user)
            return response
        assert self.auth.cognito is not None
        refused = error(401, "unauthenticated", "refresh token refused")
        encoded_name, _, refresh_token = value.partition(".")
        try:
            cognito_name = base64.urlsafe_b64decode(encoded_name.encode()).decode()
        except (binascii.Error, UnicodeDecodeError):
            return self._signed_out(refused)
        if not cognito_name or not refresh_token:
            return self._signed_out(refused)
        try:
            tokens = await self.auth.cognito.refresh(refresh_token, cognito_name)
        except CognitoError as exc:
            if exc.kind in BAD_CREDENTIALS or exc.kind == "InvalidParameterException":
                return self._signed_out(refused)
            return self._cognito_error(exc)
        except (CognitoUnavailable, ChallengeRequired):
            return error(503, "unavailable", "sign-in service unavailable; try again")
        return await self._tokens_response(tokens, None)

    async def me(self, request: web.Request) -> web.Response:
        try:
            user = await self.auth.verifier.verify(request.cookies.get(AUTH_COOKIE))
        except KeysUnavailable:
            return error(503, "unavailable", "auth keys unavailable")
        except TokenError as exc:
            return error(401, "unauthenticated", exc.reason)
        return web.json_response({"user": user.public()})

    async def logout(self, request: web.Request) -> web.Response:
        try:
            user = await self.auth.verifier.verify(request.cookies.get(AUTH_COOKIE))
        except TokenError:
            user = None
        if user is not None:
            try:
                await self._sign_out(user.sub)
            except BrokerUnavailable:
                log.warning("sign-out of %s not broadcast: broker unavailable", user.sub)
        await self._revoke(request.cookies.get(REFRESH_COOKIE))
        return self._signed_out(web.json_response({"ok": True}))

    async def _revoke(self, cookie: str | None) -> None:
        """Revoke the Cognito refresh token, so a copy of the cookie is worth nothing after
        sign-out. Best effort, bounded: the sign-out itself never waits on it failing."""
        if self.auth.cognito is None or not cookie:
            return
        refresh_token = cookie.partition(".")[2]
        if not refresh_token:
            return
        try:
            await asyncio.wait_for(self.auth.cognito.revoke(refresh_token), REVOKE_TIMEOUT)
        except (CognitoError, CognitoUnavailable, TimeoutError) as exc:
            log.info("refresh token not revoked at sign-out: %s", type(exc).__name__)

    # ------------------------------------------------------------- cookies

    def _set_cookie(self, response: web.Response, name: str, value: str, path: str,
                    max_age: int | None = None) -> None:
        response.set_cookie(
            name, value, path=path, max_age=max_age, httponly=True,
            secure=self.settings.cookie_secure, samesite="Strict",
        )

    def _set_auth_cookie(self, response: web.Response, token: str, user: User) -> None:
        # Max-Age is the token's lifetime: after it the browser sends no cookie and the
        # client's "/auth/me says 401" path refreshes before it gives up.
        lifetime = max(0, round(user.exp - time.time()))
        self._set_cookie(response, AUTH_COOKIE, token, "/", max_age=lifetime)

    def _signed_out(self, response: web.Response) -> web.Response:
        for name, path in ((AUTH_COOKIE, "/"), (REFRESH_COOKIE, "/auth")):
            self._set_cookie(response, name, "", path, max_age=0)
        return response
