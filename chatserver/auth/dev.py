"""The dev issuer: the embedded default when no Cognito pool is configured.

It signs Cognito-shaped RS256 tokens with a local key and publishes a local JWKS, so dev
tokens go through the very same TokenVerifier as Cognito's. Every worker and replica must
share the key: it comes from CHAT_DEV_KEY_FILE, else from Redis (first writer wins), else
it is made in-process (one worker).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEV_ISSUER = "chatserver-dev"
DEV_CLIENT_ID = "chatserver-dev"
DEV_USERNAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEV_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # Cognito group names, the ASCII subset
MAX_DEV_GROUPS = 16
REFRESH_TTL = 7 * 24 * 3600


def new_private_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dev_sub(username: str) -> str:
    """A stable user id per username, so a user is the same user after signing in again."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"chatserver-dev:{username}"))


class DevIssuer:
    """Mints access and refresh tokens for any username; test tools may use it too."""

    def __init__(self, private_key_pem: bytes, *, ttl: int = 900) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the dev key must be an RSA private key")
        self._key = key
        self.ttl = ttl
        numbers = key.public_key().public_numbers()
        self._jwk = {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "n": _b64u(numbers.n),
            "e": _b64u(numbers.e),
        }
        self.kid = hashlib.sha256(self._jwk["n"].encode()).hexdigest()[:16]
        self._jwk["kid"] = self.kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def mint(self, username: str, *, ttl: int | None = None, token_use: str = "access",
             now: float | None = None, **extra: Any) -> str:
        issued = time.time() if now is None else now
        lifetime = self.ttl if ttl is None else ttl
        claims: dict[str, Any] = {
            "sub": dev_sub(username),
            "iss": DEV_ISSUER,
            "client_id": DEV_CLIENT_ID,
            "token_use": token_use,
            "username": username,
            # In milliseconds (a NumericDate may have a fraction): a sign-out refuses
            # tokens issued at or before it, and a sign-in in the same second after it
            # must not be taken for one issued before. Cognito's iat is whole seconds.
            "iat": round(issued, 3),
            "exp": int(issued) + lifetime,
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra)
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def mint_for(self, username: str, groups: tuple[str, ...] = ()) -> str:
        """An access token; groups go where Cognito puts them (cognito:groups)."""
        return self.mint(username, **_groups_claim(groups))

    def mint_refresh(self, username: str, groups: tuple[str, ...] = ()) -> str:
        """A refresh token that carries the groups, so a refresh keeps them."""
        return self.mint(username, ttl=REFRESH_TTL, token_use="refresh", **_groups_claim(groups))


def parse_dev_groups(value: object) -> tuple[str, ...]:
    """The dev sign-in's optional "groups" list, checked; ValueError says what is wrong."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_DEV_GROUPS:
        raise ValueError(f"groups: a list of at most {MAX_DEV_GROUPS} names")
    if not all(isinstance(g, str) and DEV_GROUP.fullmatch(g) for g in value):
        raise ValueError("groups: each 1-64 of A-Z a-z 0-9 _ . -")
    return tuple(dict.fromkeys(value))


def _groups_claim(groups: tuple[str, ...]) -> dict[str, Any]:
    return {"cognito:groups": list(groups)} if groups else {}


def _b64u(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
