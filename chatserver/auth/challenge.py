"""Cognito sign-in challenges: the 409 a sign-in answers when Cognito asks for more, and
POST /auth/challenge, which answers it (RespondToAuthChallenge; MFA_SETUP through
Associate/VerifySoftwareToken). Cognito's Session stays in the ChallengeStore; the
browser holds an opaque, single-use id in an HttpOnly cookie scoped to /auth.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import segno
from aiohttp import web

from ..config import Settings
from ..responses import error
from .challenge_store import ChallengeStore, ChallengeStoreUnavailable, Pending
from .cognito import ChallengeRequired, CognitoClient, CognitoError, CognitoUnavailable, Tokens
from .cookies import cookie_names
from .gate import client_ip
from .throttle import LoginThrottle
from .tokens import TokenError

log = logging.getLogger(__name__)

SESSION_TTL = 180  # seconds: Cognito's challenge session lasts 3 minutes
NEW_PASSWORD, TOTP, SMS, MFA_SETUP = (
    "NEW_PASSWORD_REQUIRED", "SOFTWARE_TOKEN_MFA", "SMS_MFA", "MFA_SETUP")
SUPPORTED = frozenset({NEW_PASSWORD, TOTP, SMS, MFA_SETUP})
CODE = re.compile(r"[0-9]{6,8}")
MAX_FIELD_CHARS = 256
WRONG_CODE = frozenset({"CodeMismatchException", "EnableSoftwareTokenMFAException"})
SESSION_GONE = frozenset({"NotAuthorizedException", "ExpiredCodeException"})

Issue = Callable[[Tokens, str | None], Awaitable[web.Response]]  # AuthRoutes: the cookies
CookieSetter = Callable[[web.Response, str, str, str, int], None]


def required_attributes(parameters: dict[str, str]) -> tuple[str, ...]:
    """NEW_PASSWORD_REQUIRED's `requiredAttributes` (a JSON list of "userAttributes.x")."""
    try:
        names = json.loads(parameters.get("requiredAttributes") or "[]")
    except ValueError:
        return ()
    if not isinstance(names, list):
        return ()
    return tuple(str(n).removeprefix("userAttributes.") for n in names if isinstance(n, str))


def challenge_fields(challenge: str, parameters: dict[str, str],
                     settings: Settings) -> dict[str, Any]:
    """What the 409 tells the browser: the fields to ask for, and what to show with them.
    Never the Session."""
    if challenge == NEW_PASSWORD:
        return {"fields": ["new_password", *required_attributes(parameters)],
                "password_rules": settings.password_rules}
    if challenge == SMS:
        return {"fields": ["code"], "destination": parameters.get("CODE_DELIVERY_DESTINATION")}
    return {"fields": ["code"]}


def challenge_responses(pending: Pending, body: dict[str, Any]) -> dict[str, str]:
    """RespondToAuthChallenge's ChallengeResponses (without SECRET_HASH) for the
    browser's answer; ValueError says what is missing or malformed."""
    out = {"USERNAME": pending.username}
    if pending.challenge == NEW_PASSWORD:
        password = body.get("new_password")
        if not isinstance(password, str) or not 0 < len(password) <= MAX_FIELD_CHARS:
            raise ValueError("new_password: a string of 1-256 characters")
        out["NEW_PASSWORD"] = password
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ValueError("attributes: an object of name -> value")
        for name in pending.required:
            value = attributes.get(name)
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_FIELD_CHARS:
                raise ValueError(f"attributes.{name} is required")
            out[f"userAttributes.{name}"] = value.strip()
        return out
    key = {TOTP: "SOFTWARE_TOKEN_MFA_CODE", SMS: "SMS_MFA_CODE"}.get(pending.challenge)
    if key is None:
        raise ValueError(f"{pending.challenge} is not answered with responses")
    out[key] = answer_code(body)
    return out


def answer_code(body: dict[str, Any]) -> str:
    code = body.get("code")
    if not isinstance(code, str) or not CODE.fullmatch(code.strip()):
        raise ValueError("code: 6 to 8 digits")
    return code.strip()


def otpauth_uri(issuer: str, username: str, secret: str) -> str:
    """The key URI authenticator apps read (Google Authenticator's format)."""
    label = quote(f"{issuer}:{username}", safe=":@")
    return f"otpauth://totp/{label}?secret={secret}&issuer={quote(issuer)}"


class ChallengeRoutes:
    """POST /auth/challenge; begin() builds the 409 of a sign-in that met a challenge."""

    def __init__(self, settings: Settings, cognito: CognitoClient, store: ChallengeStore,
                 throttle: LoginThrottle, issue: Issue, set_cookie: CookieSetter,
                 cognito_error: Callable[[CognitoError], web.Response]) -> None:
        self._settings = settings
        self._cognito = cognito
        self._store = store
        self._throttle = throttle
        self._issue = issue
        self._set_cookie = set_cookie
        self._cognito_error = cognito_error
        self._cookie = cookie_names(settings).challenge

    async def begin(self, exc: ChallengeRequired, username: str, typed: str) -> web.Response:
        name, parameters = exc.challenge, exc.parameters
        if name not in SUPPORTED or not exc.session:
            return error(409, "challenge", f"Cognito requires {name}, which is not supported",
                         challenge=name)
        extra = challenge_fields(name, parameters, self._settings)
        session = exc.session
        cognito_name = parameters.get("USER_ID_FOR_SRP") or username
        try:
            if name == MFA_SETUP:
                secret, session = await self._cognito.associate_software_token(session)
                uri = otpauth_uri(self._settings.totp_issuer, typed, secret)
                extra.update(secret=secret, otpauth=uri,
                             qr=segno.make(uri, error="m").svg_data_uri(scale=4))
            pending = Pending(name, session, cognito_name, typed, time.time() + SESSION_TTL,
                              required_attributes(parameters))
            pending_id = await self._store.put(pending)
        except CognitoError as err:
            return self._cognito_error(err)
        except (CognitoUnavailable, ChallengeStoreUnavailable) as err:
            log.warning("sign-in challenge not started: %s", type(err).__name__)
            return error(503, "unavailable", "sign-in service unavailable; try again")
        response = error(409, "challenge", "Cognito requires a challenge", challenge=name, **extra)
        self._set_cookie(response, self._cookie.name, pending_id, "/auth", SESSION_TTL)
        return response

    async def answer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", "body must be JSON")
        if not isinstance(body, dict):
            return error(400, "bad_request", "body must be a JSON object")
        try:
            pending_id = self._cookie.read(request) or ""
        except TokenError:
            pending_id = ""  # sent twice: which one is ours cannot be known
        try:
            pending = await self._store.take(pending_id) if pending_id else None
        except ChallengeStoreUnavailable:
            return error(503, "unavailable", "sign-in service unavailable; try again")
        if pending is None:
            return self._gone(error(401, "challenge_expired",
                                    "the sign-in expired or was already used; sign in again"))
        ip = client_ip(request, self._settings)
        wait = await self._throttle.wait_before_login(ip, pending.typed)
        if wait:
            answer = error(429, "rate_limited", "too many attempts; try again shortly")
            answer.headers["Retry-After"] = str(max(1, round(wait)))
            return await self._again(pending, answer)
        return await self._respond(pending, body)

    async def _respond(self, pending: Pending, body: dict[str, Any]) -> web.Response:
        hashed = self._cognito.secret_hash(pending.username)
        try:
            if pending.challenge == MFA_SETUP:
                session = await self._cognito.verify_software_token(
                    pending.session, answer_code(body))
                responses = {"USERNAME": pending.username, **hashed}
                tokens = await self._cognito.respond(MFA_SETUP, session, responses)
            else:
                responses = {**challenge_responses(pending, body), **hashed}
                tokens = await self._cognito.respond(pending.challenge, pending.session,
                                                     responses)
        except ValueError as exc:
            return await self._again(pending, error(400, "bad_request", str(exc)))
        except ChallengeRequired as exc:  # the next one (a new password, then MFA set-up)
            return await self.begin(exc, pending.username, pending.typed)
        except CognitoError as exc:
            return await self._refused(pending, exc)
        except CognitoUnavailable as exc:
            log.warning("cognito challenge answer failed: %s", exc)
            return await self._again(
                pending, error(503, "unavailable", "sign-in service unavailable; try again"))
        await self._throttle.succeeded(pending.typed)
        return self._gone(await self._issue(tokens, tokens.refresh_token))

    async def _refused(self, pending: Pending, exc: CognitoError) -> web.Response:
        if exc.kind in WRONG_CODE:
            await self._throttle.failed(pending.typed)
            return await self._again(pending, error(401, "invalid_code", "wrong code; try again"))
        if exc.kind in SESSION_GONE:
            return self._gone(error(401, "challenge_expired",
                                    "the sign-in expired; sign in again"))
        if exc.kind == "InvalidPasswordException":
            detail = exc.message or "the password does not meet the pool's rules"
            return await self._again(pending, error(400, "invalid_password", detail,
                                                    password_rules=self._settings.password_rules))
        if exc.kind == "InvalidParameterException":
            return await self._again(pending, error(400, "bad_request",
                                                    "Cognito refused the answer's parameters"))
        return self._gone(self._cognito_error(exc))

    async def _again(self, pending: Pending, response: web.Response) -> web.Response:
        """The answer can be retried: the same Cognito session under a new id (the old
        one is spent), until Cognito's deadline."""
        left = int(pending.deadline - time.time())
        if left <= 0:
            return self._gone(error(401, "challenge_expired", "the sign-in expired; sign in again"))
        try:
            pending_id = await self._store.put(pending)
        except ChallengeStoreUnavailable:
            return self._gone(response)
        self._set_cookie(response, self._cookie.name, pending_id, "/auth", left)
        return response

    def _gone(self, response: web.Response) -> web.Response:
        self._set_cookie(response, self._cookie.name, "", "/auth", 0)
        return response
