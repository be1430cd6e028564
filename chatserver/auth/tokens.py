"""TokenVerifier: Cognito JWT rules as AWS's aws-jwt-verify applies them, plus `exp` required.

RS256 only, `kid` looked up in a cached JWKS (one shared refetch on an unknown kid, then
a penalty box so forged kids cannot cause a fetch storm), exact issuer, `token_use`,
audience or client id. The JWKS fetch is handed in, so this module does no I/O itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

JwksFetcher = Callable[[], Awaitable[dict[str, Any]]]
Refuses = Callable[["User"], bool]  # the denylist's check: True for a revoked token
MIN_FETCH_BACKOFF, MAX_FETCH_BACKOFF = 1.0, 30.0  # seconds, while no key is cached
log = logging.getLogger(__name__)


class TokenError(Exception):
    """The token is refused; `reason` is a short fixed word for logs and metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class KeysUnavailable(TokenError):
    """The JWKS could not be fetched: the token may be fine, so this is retryable."""

    def __init__(self, detail: str) -> None:
        super().__init__("jwks_unavailable", detail)


@dataclass(frozen=True, slots=True)
class User:
    sub: str
    username: str
    email: str | None = None
    groups: tuple[str, ...] = ()
    exp: float = 0.0
    iat: float = 0.0  # when the token was issued: a sign-out closes the ones before it
    jti: str = ""  # the token's id: a sign-out denylists it until exp

    def public(self) -> dict[str, Any]:
        """What other users and the browser may see of this user."""
        out: dict[str, Any] = {"sub": self.sub, "username": self.username}
        if self.email:
            out["email"] = self.email
        out["groups"] = list(self.groups)
        return out


def user_from_claims(claims: dict[str, Any]) -> User:
    sub = str(claims["sub"])
    username = str(claims.get("cognito:username") or claims.get("username") or sub)
    groups = claims.get("cognito:groups") or []
    email = claims.get("email")
    return User(
        sub=sub,
        username=username,
        email=str(email) if email else None,
        groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
        exp=float(claims["exp"]),
        iat=float(claims.get("iat") or 0),
        jti=str(claims.get("jti") or ""),
    )


class TokenVerifier:
    """Verifies RS256 JWTs against one issuer's JWKS; safe for concurrent use."""

    def __init__(
        self,
        *,
        issuers: Iterable[str],
        client_id: str,
        token_uses: Iterable[str],
        fetch_jwks: JwksFetcher,
        leeway: float = 5.0,
        penalty_seconds: float = 10.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
        refuses: Refuses | None = None,
    ) -> None:
        self._issuers = frozenset(issuers)
        self._client_id = client_id
        self._token_uses = frozenset(token_uses)
        self._fetch_jwks = fetch_jwks
        self._leeway = leeway
        self._penalty_seconds = penalty_seconds
        self._clock = clock
        self._refuses = refuses
        self._keys: dict[str, Any] = {}
        self._fetching: asyncio.Future[None] | None = None
        self._penalty_until = 0.0
        # With no keys at all, failed fetches back off (1 s doubling to 30 s) instead of
        # one fetch per connection attempt.
        self._retry_at = 0.0
        self._backoff = MIN_FETCH_BACKOFF
        # Verified tokens until their exp: a reconnect with the same cookie costs no RSA.
        # Keyed by the token's digest: 32 bytes a connection, not the whole JWT.
        self._cache: OrderedDict[bytes, User] = OrderedDict()
        self._cache_size = cache_size

    async def verify(self, token: str | None) -> User:
        if not token:
            raise TokenError("missing", "no authToken cookie")
        now = self._clock()
        try:
            digest = hashlib.sha256(token.encode()).digest()
        except UnicodeEncodeError:  # aiohttp hands a non-UTF-8 cookie byte in as a surrogate
            raise TokenError("malformed", "token is not a JWT") from None
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.exp + self._leeway > now:
                self._check_revoked(cached)
                return cached
            del self._cache[digest]
        header = _header(token)
        if header.get("alg") != "RS256":
            raise TokenError("bad_algorithm", "only RS256 is accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("missing_kid", "token has no kid")
        key = await self._key(kid)
        user = user_from_claims(self._decode(token, key))
        self._cache[digest] = user
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        self._check_revoked(user)
        return user

    def _check_revoked(self, user: User) -> None:
        """After the signature and cache: a revoked token stays cached (it is still
        authentic) and is refused here on every use, at the cost of two dict lookups."""
        if self._refuses is not None and self._refuses(user):
            raise TokenError("revoked", "token revoked at sign-out")

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                # exp and nbf are checked below on this verifier's clock, not PyJWT's
                options={"require": ["exp", "iss", "sub"], "verify_aud": False,
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError("missing_claim", f"token has no {exc.claim}") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError("invalid", f"token refused: {type(exc).__name__}") from None
        self._check_times(claims)
        if not isinstance(claims["iss"], str) or claims["iss"] not in self._issuers:
            raise TokenError("bad_issuer", "issuer not accepted")
        token_use = claims.get("token_use")
        if not isinstance(token_use, str) or token_use not in self._token_uses:
            raise TokenError("bad_token_use", "token_use not accepted")
        if token_use == "id" and claims.get("aud") != self._client_id:
            raise TokenError("bad_audience", "aud is not this client")
        if token_use == "access" and claims.get("client_id") != self._client_id:
            raise TokenError("bad_audience", "client_id is not this client")
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        exp, nbf, iat = claims["exp"], claims.get("nbf"), claims.get("iat")
        if not all(_is_number(t) for t in (exp, nbf, iat) if t is not None):
            raise TokenError("invalid", "token refused: exp/nbf/iat must be numbers")
        if exp + self._leeway <= now:
            raise TokenError("expired", "token has expired")
        if any(t is not None and t - self._leeway > now for t in (nbf, iat)):
            raise TokenError("not_yet_valid", "token is not valid yet (nbf/iat)")

    async def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            return key
        if not self._keys and self._clock() < self._retry_at:
            raise KeysUnavailable("JWKS unavailable; backing off")
        if self._keys and self._clock() < self._penalty_until:
            raise TokenError("unknown_kid", "kid not in the JWKS")
        await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            self._penalty_until = self._clock() + self._penalty_seconds
            raise TokenError("unknown_kid", "kid not in the JWKS")
        return key

    async def _refresh(self) -> None:
        """One fetch at a time; concurrent callers share it. A failure keeps old keys."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._fetch())
            self._fetching.add_done_callback(self._fetch_done)
        await asyncio.shield(self._fetching)

    def _fetch_done(self, fut: asyncio.Future[None]) -> None:
        self._fetching = None
        if not fut.cancelled():
            fut.exception()  # consumed here; awaiting callers see it too

    async def _fetch(self) -> None:
        try:
            keys = parse_jwks(await self._fetch_jwks())
            if not keys:
                raise ValueError("no usable signing key")
        except (TimeoutError, OSError, ValueError, RecursionError) as exc:
            why = f"JWKS fetch failed: {type(exc).__name__}: {str(exc)[:80]}"
            if self._keys:
                # Keep serving the keys we have (an empty or broken JWKS never replaces
                # them); the kid stays unknown this round.
                log.warning("%s; keeping the %d cached keys", why, len(self._keys))
                return
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, MAX_FETCH_BACKOFF)
            log.warning("%s; no keys cached, next try in %.0f s", why, self._backoff / 2)
            raise KeysUnavailable(why) from None
        self._keys = keys
        self._backoff = MIN_FETCH_BACKOFF

    @property
    def ready(self) -> bool:
        """Keys are cached: tokens can be verified (/readyz says so)."""
        return bool(self._keys)

    async def prefetch(self) -> None:
        """Warm the key cache at start-up; a failure here is retried on first use."""
        with contextlib.suppress(KeysUnavailable):
            await self._refresh()

    async def keep_warm(self) -> None:
        """Until keys are cached, fetch them at the backoff's pace (so /readyz recovers
        on its own after a JWKS outage at start-up); then return."""
        while not self._keys:
            with contextlib.suppress(KeysUnavailable):
                await self._refresh()
            await asyncio.sleep(max(0.0, self._retry_at - self._clock()) or MIN_FETCH_BACKOFF)


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, read only to pick the key; PyJWT then checks everything, the
    header included. (PyJWT's own get_unverified_header decodes the whole token again.)"""
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenError("malformed", "token is not a JWT") from None
    if not isinstance(header, dict) or token.count(".") != 2:
        raise TokenError("malformed", "token is not a JWT")
    return header


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_jwks(document: dict[str, Any]) -> dict[str, Any]:
    """kid -> public key for the RSA signing keys of a JWKS document."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("JWKS has no keys list")
    out: dict[str, Any] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not jwk.get("kid"):
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
            continue
        try:
            out[str(jwk["kid"])] = RSAAlgorithm.from_jwk(json.dumps(jwk))
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as exc:
            log.warning("JWKS key %.40r skipped: %s", jwk.get("kid"), exc)
            continue
    return out
