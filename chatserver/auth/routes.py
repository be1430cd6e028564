"""The /auth/* routes: sign-in (dev issuer or Cognito), refresh, sign-out, and who am I.

Cookies are HttpOnly, SameSite=Strict; the refresh cookie is scoped to /auth. Tokens,
passwords and refresh tokens never reach a log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ..config import Settings
from ..config_checks import is_loopback
from ..counters import HitCounter
from ..observability import Metrics
from ..responses import error
from .challenge import ChallengeRoutes
from .challenge_store import ChallengeStore
from .cognito import ChallengeRequired, CognitoClient, CognitoError, CognitoUnavailable, Tokens
from .cookies import AUTH, REFRESH, cookie_names
from .denylist import Denylist
from .dev import DEV_USERNAME, REFRESH_TTL, DevIssuer, parse_dev_groups
from .gate import client_ip
from .signout import Revoker
from .throttle import LoginThrottle
from .tokens import KeysUnavailable, TokenError, TokenVerifier, User

log = logging.getLogger(__name__)

MAX_CREDENTIAL_CHARS = 256
COGNITO_REFRESH_MAX_AGE = 30 * 24 * 3600  # Cognito's default refresh token lifetime
REVOKE_TIMEOUT = 2.0  # seconds a sign-out waits for Cognito to revoke the refresh token

BAD_CREDENTIALS = {"NotAuthorizedException", "UserNotFoundException", "UserNotConfirmedException"}


@dataclass(frozen=True)
class AuthService:
    """What sign-in needs: the verifier of the cookie's token, and one issuer."""

    settings: Settings
    verifier: TokenVerifier
    hits: HitCounter  # the sign-in rate limits, shared by every worker
    metrics: Metrics
    denylist: Denylist  # revoked tokens, checked by the verifiers too
    dev: DevIssuer | None = None
    refresh_verifier: TokenVerifier | None = None  # dev refresh tokens
    cognito: CognitoClient | None = None
    challenges: ChallengeStore | None = None  # Cognito's pending challenge sessions


class AuthRoutes:
    """POST /auth/login, /auth/refresh, /auth/logout and GET /auth/me."""

    def __init__(self, auth: AuthService, sign_out: Callable[[str], Awaitable[None]]) -> None:
        self.auth = auth
        self.settings = auth.settings
        self._sign_out = sign_out  # closes a user's sockets on every worker and replica
        self._throttle = LoginThrottle(auth.hits, auth.settings.login_rate_per_minute)
        self._cookies = cookie_names(auth.settings)
        self._revoker = Revoker(auth.denylist, token_use=auth.settings.token_use,
                                refresh_verifier=auth.refresh_verifier, cognito=auth.cognito)
        self._challenges = None
        if auth.cognito is not None and auth.challenges is not None:
            self._challenges = ChallengeRoutes(
                auth.settings, auth.cognito, auth.challenges, self._throttle,
                self._tokens_response, self._set_cookie, self._cognito_error)

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/auth/login", self.login)
        router.add_post("/auth/refresh", self.refresh)
        router.add_get("/auth/me", self.me)
        router.add_post("/auth/logout", self.logout)
        if self._challenges is not None:
            router.add_post("/auth/challenge", self._challenges.answer)

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
        wait = await self._throttle.wait_before_login(client_ip(request, self.settings), username)
        if wait:
            self.auth.metrics.auth_failures.labels("login_rate").inc()
            return _too_many("too many sign-in attempts; try again shortly", wait)
        if self.auth.dev is not None:
            if not self.settings.dev_auth_explicit and not _direct_and_local(request):
                return error(403, "forbidden", "the dev sign-in answers direct local requests "
                             "only (CHAT_DEV_AUTH=1 allows it through a proxy)")
            response = await self._dev_login(username, password, body.get("groups"))
        elif "groups" in body:
            return error(400, "bad_request", "groups come from Cognito, not from the sign-in")
        else:
            response = await self._cognito_login(username, password)
        if response.status == 401:
            await self._throttle.failed(username)
        elif response.status == 200:
            await self._throttle.succeeded(username)
        return response

    async def _dev_login(self, username: str, password: str, groups: object) -> web.Response:
        """Any username signs in (with CHAT_DEV_PASSWORD, if set); for local work with
        group rules it may name its groups, which a Cognito pool would assign."""
        assert self.auth.dev is not None
        expected = self.settings.dev_password
        if not DEV_USERNAME.fullmatch(username):
            return error(400, "bad_request", "username: 1-64 of A-Z a-z 0-9 _ . @ -")
        try:
            chosen = parse_dev_groups(groups)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        if expected is not None and not hmac.compare_digest(password.encode(), expected.encode()):
            self.auth.metrics.auth_failures.labels("bad_credentials").inc()
            return error(401, "invalid_credentials", "wrong username or password")
        token = self.auth.dev.mint_for(username, chosen)
        user = await self.auth.verifier.verify(token)
        response = web.json_response({"user": user.public()})
        self._set_auth_cookie(response, token, user)
        refresh = self.auth.dev.mint_refresh(username, chosen)
        self._set_cookie(response, self._cookies.refresh.name, refresh, "/auth", REFRESH_TTL)
        return response

    async def _cognito_login(self, username: str, password: str) -> web.Response:
        assert self.auth.cognito is not None
        try:
            tokens = await self.auth.cognito.login(username, password)
        except CognitoError as exc:
            return self._cognito_error(exc)
        except ChallengeRequired as exc:
            if self._challenges is None:
                return error(409, "challenge", "Cognito requires a challenge",
                             challenge=exc.challenge)
            return await self._challenges.begin(exc, username, username)
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
            self._set_cookie(response, self._cookies.refresh.name, packed, "/auth",
                             COGNITO_REFRESH_MAX_AGE)
        return response

    async def refresh(self, request: web.Request) -> web.Response:
        try:
            value = self._cookies.refresh.read(request)
        except TokenError as exc:
            return self._signed_out(error(401, "unauthenticated", str(exc)))
        if not value:
            return error(401, "unauthenticated", "no refresh token")
        if self.auth.dev is not None:
            assert self.auth.refresh_verifier is not None
            try:
                old = await self.auth.refresh_verifier.verify(value)
            except TokenError:
                return self._signed_out(error(401, "unauthenticated", "refresh token refused"))
            token = self.auth.dev.mint_for(old.username, old.groups)
            user = await self.auth.verifier.verify(token)
            response = web.json_response({"user": user.public()})
            self._set_auth_cookie(response, token, user)
            return response
        assert self.auth.cognito is not None
        refused = error(401, "unauthenticated", "refresh token refused")
        encoded_name, _, refresh_token = value.partition(".")
        if not _plausible_refresh_token(refresh_token):
            return self._signed_out(refused)  # no Cognito call for what cannot be real
        wait = await self._throttle.wait_before_call(client_ip(request, self.settings))
        if wait:
            return _too_many("too many refreshes from this address", wait)
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
            user = await self.auth.verifier.verify(self._cookies.auth.read(request))
        except KeysUnavailable:
            return error(503, "unavailable", "auth keys unavailable")
        except TokenError as exc:
            return error(401, "unauthenticated", exc.reason)
        return web.json_response({"user": user.public()})

    async def logout(self, request: web.Request) -> web.Response:
        try:
            token = self._cookies.auth.read(request) or ""
            refresh_cookie = self._cookies.refresh.read(request)
        except TokenError:
            token, refresh_cookie = "", None  # ambiguous: revoke nothing; all are cleared
        try:
            user: User | None = await self.auth.verifier.verify(token)
        except TokenError:
            user = None
        everywhere = request.query.get("everywhere") == "1"  # Cognito's GlobalSignOut too
        await self._revoker.sign_out(user, token, refresh_cookie, everywhere)
        if user is not None:
            await self._sign_out(user.sub)  # retried in the background while Redis is down
        refresh = (refresh_cookie or "").partition(".")[2]
        if self.auth.cognito is not None and _plausible_refresh_token(refresh):
            wait = await self._throttle.wait_before_call(client_ip(request, self.settings))
            if wait:  # the sockets are closed; only the Cognito call waits for a retry
                return _too_many("too many sign-outs from this address", wait)
            await self._revoke(refresh)
        return self._signed_out(web.json_response({"ok": True}))

    async def _revoke(self, refresh_token: str) -> None:
        """Revoke the Cognito refresh token, so a copy of the cookie is worth nothing after
        sign-out. Best effort, bounded: the sign-out itself never waits on it failing."""
        assert self.auth.cognito is not None
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
        self._set_cookie(response, self._cookies.auth.name, token, "/", max_age=lifetime)

    def _signed_out(self, response: web.Response) -> web.Response:
        names = {self._cookies.auth.name: "/", AUTH: "/",
                 self._cookies.refresh.name: "/auth", REFRESH: "/auth"}
        for name, path in names.items():  # the original design's names too, if set before
            self._set_cookie(response, name, "", path, max_age=0)
        return response


# Cognito refresh tokens are JWEs: five base64url segments, about 1.7 kB.
REFRESH_TOKEN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]*){4}")
MAX_REFRESH_CHARS = 8192


def _plausible_refresh_token(token: str) -> bool:
    return 20 <= len(token) <= MAX_REFRESH_CHARS and REFRESH_TOKEN.fullmatch(token) is not None


FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "X-Forwarded-Host")


def _direct_and_local(request: web.Request) -> bool:
    """From this host and not relayed: a proxy on the same host connects from 127.0.0.1
    too, but says so in a forwarding header (nginx, Caddy, Traefik, ALB all add one)."""
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    return is_loopback(request.remote or "")


def _too_many(detail: str, wait: float) -> web.Response:
    response = error(429, "rate_limited", detail)
    response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return response
