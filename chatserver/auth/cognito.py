"""Cognito's public HTTP API: InitiateAuth (password and refresh flows) and the JWKS.

Unsigned calls with the aiohttp client (no AWS keys, no boto3); every call is bounded by
a timeout. Secrets, passwords and tokens never reach a log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TARGET = "AWSCognitoIdentityProviderService.InitiateAuth"
REVOKE_TARGET = "AWSCognitoIdentityProviderService.RevokeToken"
CONTENT_TYPE = "application/x-amz-json-1.1"


class CognitoError(Exception):
    """Cognito said no (`kind` is its `__type`, e.g. NotAuthorizedException)."""

    def __init__(self, kind: str, status: int) -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status


class CognitoUnavailable(Exception):
    """Cognito could not be reached, timed out, or failed with a 5xx."""


class ChallengeRequired(Exception):
    def __init__(self, challenge: str) -> None:
        super().__init__(challenge)
        self.challenge = challenge


@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    id_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: int


def secret_hash(client_secret: str, username: str, client_id: str) -> str:
    """Base64(HMAC-SHA256(client secret, username + client id)), as Cognito defines it."""
    digest = hmac.new(
        client_secret.encode(), (username + client_id).encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


class CognitoClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        region: str,
        client_id: str,
        client_secret: str | None = None,
        endpoint: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._session = session
        self._client_id = client_id
        self._client_secret = client_secret
        self._endpoint = endpoint or f"https://cognito-idp.{region}.amazonaws.com/"
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def login(self, username: str, password: str) -> Tokens:
        params = {"USERNAME": username, "PASSWORD": password}
        if self._client_secret:
            params["SECRET_HASH"] = secret_hash(self._client_secret, username, self._client_id)
        return await self._initiate_auth("USER_PASSWORD_AUTH", params)

    async def refresh(self, refresh_token: str, username: str) -> Tokens:
        """`username` is Cognito's own (the token's `username`), not what the user typed."""
        params = {"REFRESH_TOKEN": refresh_token}
        if self._client_secret:
            params["SECRET_HASH"] = secret_hash(self._client_secret, username, self._client_id)
        return await self._initiate_auth("REFRESH_TOKEN_AUTH", params)

    async def revoke(self, refresh_token: str) -> None:
        """RevokeToken: the refresh token (and the tokens it issued) stop working. Raises
        CognitoError or CognitoUnavailable; a sign-out goes on either way."""
        body: dict[str, str] = {"Token": refresh_token, "ClientId": self._client_id}
        if self._client_secret:
            body["ClientSecret"] = self._client_secret
        status, document = await self._call(REVOKE_TARGET, body)
        if status >= 400:
            kind = str(document.get("__type", "UnknownError")).rpartition("#")[2]
            raise CognitoError(kind, status)

    async def _initiate_auth(self, flow: str, params: dict[str, str]) -> Tokens:
        body = {"AuthFlow": flow, "ClientId": self._client_id, "AuthParameters": params}
        status, document = await self._call(TARGET, body)
        if status >= 400:
            kind = str(document.get("__type", "UnknownError")).rpartition("#")[2]
            raise CognitoError(kind, status)
        if "ChallengeName" in document:
            raise ChallengeRequired(str(document["ChallengeName"]))
        result = document.get("AuthenticationResult") or {}
        try:
            return Tokens(
                access_token=result["AccessToken"],
                id_token=result["IdToken"],
                refresh_token=result.get("RefreshToken"),
                expires_in=int(result.get("ExpiresIn", 3600)),
            )
        except (KeyError, TypeError, ValueError):
            raise CognitoUnavailable("Cognito answer has no tokens") from None


    async def _call(self, target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One unsigned call; 5xx, timeouts and non-JSON answers are CognitoUnavailable."""
        headers = {"X-Amz-Target": target, "Content-Type": CONTENT_TYPE}
        try:
            async with self._session.post(
                self._endpoint, data=json.dumps(body), headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            raise CognitoUnavailable("Cognito unreachable or slow") from None
        if status >= 500:
            raise CognitoUnavailable(f"Cognito answered {status}")
        try:
            document = json.loads(text) if text else {}
        except ValueError:
            raise CognitoUnavailable("Cognito answered something that is not JSON") from None
        return status, document if isinstance(document, dict) else {}


async def fetch_json(session: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document (the JWKS); errors surface as OSError/ValueError/TimeoutError."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} from JWKS endpoint")
            return await response.json(content_type=None)
    except aiohttp.ClientError as exc:
        raise OSError(str(exc)) from None
