"""Cognito's public HTTP API: InitiateAuth (password and refresh flows), the challenge
calls (RespondToAuthChallenge, Associate/VerifySoftwareToken), RevokeToken, GlobalSignOut
and the JWKS.

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
RESPOND_TARGET = "AWSCognitoIdentityProviderService.RespondToAuthChallenge"
ASSOCIATE_TARGET = "AWSCognitoIdentityProviderService.AssociateSoftwareToken"
VERIFY_TARGET = "AWSCognitoIdentityProviderService.VerifySoftwareToken"
GLOBAL_SIGN_OUT_TARGET = "AWSCognitoIdentityProviderService.GlobalSignOut"
CONTENT_TYPE = "application/x-amz-json-1.1"


class CognitoError(Exception):
    """Cognito said no (`kind` is its `__type`, e.g. NotAuthorizedException)."""

    def __init__(self, kind: str, status: int, message: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.status = status
        self.message = message  # Cognito's words (a password policy breach names the rule)


class CognitoUnavailable(Exception):
    """Cognito could not be reached, timed out, or failed with a 5xx."""


class ChallengeRequired(Exception):
    """Cognito wants a challenge answered. `session` is Cognito's and must never reach
    the browser or a log; `parameters` are its ChallengeParameters."""

    def __init__(self, challenge: str, session: str = "",
                 parameters: dict[str, str] | None = None) -> None:
        super().__init__(challenge)
        self.challenge = challenge
        self.session = session
        self.parameters = parameters or {}


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

    def secret_hash(self, username: str) -> dict[str, str]:
        """{"SECRET_HASH": ...} for an app client with a secret, else {}."""
        if not self._client_secret:
            return {}
        return {"SECRET_HASH": secret_hash(self._client_secret, username, self._client_id)}

    async def respond(self, challenge: str, session: str, responses: dict[str, str]) -> Tokens:
        """RespondToAuthChallenge; `responses` already hold USERNAME and SECRET_HASH.
        Raises ChallengeRequired for a follow-on challenge, CognitoError for a refusal."""
        body = {"ChallengeName": challenge, "ClientId": self._client_id, "Session": session,
                "ChallengeResponses": responses}
        return _tokens_of(*await self._checked(RESPOND_TARGET, body))

    async def associate_software_token(self, session: str) -> tuple[str, str]:
        """AssociateSoftwareToken in an MFA_SETUP challenge: (secret code, new session)."""
        _, document = await self._checked(ASSOCIATE_TARGET, {"Session": session})
        secret, new_session = document.get("SecretCode"), document.get("Session")
        if not isinstance(secret, str) or not isinstance(new_session, str):
            raise CognitoUnavailable("AssociateSoftwareToken answer has no secret")
        return secret, new_session

    async def verify_software_token(self, session: str, code: str) -> str:
        """VerifySoftwareToken: the new session for answering MFA_SETUP. A wrong code is
        CognitoError (EnableSoftwareTokenMFAException or CodeMismatchException)."""
        body = {"Session": session, "UserCode": code, "FriendlyDeviceName": "chatserver"}
        status, document = await self._checked(VERIFY_TARGET, body)
        new_session = document.get("Session")
        if document.get("Status") != "SUCCESS" or not isinstance(new_session, str):
            raise CognitoError("CodeMismatchException", status)
        return new_session

    async def global_sign_out(self, access_token: str) -> None:
        """GlobalSignOut: Cognito revokes every refresh token of the user."""
        await self._checked(GLOBAL_SIGN_OUT_TARGET, {"AccessToken": access_token})

    async def revoke(self, refresh_token: str) -> None:
        """RevokeToken: the refresh token (and the tokens it issued) stop working. Raises
        CognitoError or CognitoUnavailable; a sign-out goes on either way."""
        body: dict[str, str] = {"Token": refresh_token, "ClientId": self._client_id}
        if self._client_secret:
            body["ClientSecret"] = self._client_secret
        await self._checked(REVOKE_TARGET, body)

    async def _initiate_auth(self, flow: str, params: dict[str, str]) -> Tokens:
        body = {"AuthFlow": flow, "ClientId": self._client_id, "AuthParameters": params}
        return _tokens_of(*await self._checked(TARGET, body))

    async def _checked(self, target: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One call whose 4xx answer is raised as CognitoError."""
        status, document = await self._call(target, body)
        if status >= 400:
            kind = str(document.get("__type", "UnknownError")).rpartition("#")[2]
            raise CognitoError(kind, status, str(document.get("message", ""))[:200])
        return status, document

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


def _tokens_of(status: int, document: dict[str, Any]) -> Tokens:
    """The tokens of an InitiateAuth or RespondToAuthChallenge answer, or the challenge."""
    if "ChallengeName" in document:
        parameters = document.get("ChallengeParameters")
        raise ChallengeRequired(
            str(document["ChallengeName"]), str(document.get("Session") or ""),
            {str(k): str(v) for k, v in parameters.items()} if isinstance(parameters, dict) else {})
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


async def fetch_json(session: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document (the JWKS); errors surface as OSError/ValueError/TimeoutError."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} from JWKS endpoint")
            return await response.json(content_type=None)
    except aiohttp.ClientError as exc:
        raise OSError(str(exc)) from None
