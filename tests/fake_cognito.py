"""A fake Cognito user pool speaking InitiateAuth's real wire format, for tests.

`POST /` with `X-Amz-Target: AWSCognitoIdentityProviderService.InitiateAuth` and an
`application/x-amz-json-1.1` body; USER_PASSWORD_AUTH and REFRESH_TOKEN_AUTH with SECRET_HASH
checked per app client; AWS-shaped errors and challenges, answered by
RespondToAuthChallenge (NEW_PASSWORD_REQUIRED, SOFTWARE_TOKEN_MFA, SMS_MFA, MFA_SETUP after
AssociateSoftwareToken and VerifySoftwareToken); RevokeToken and GlobalSignOut; modes
that answer 500 or hang; and the pool's JWKS. It runs in a thread with its own event loop, so it answers while the
test thread blocks (make_server() waits for readiness synchronously).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.cognito_keys import CLIENT_ID, ISSUER, POOL_ID, SigningKey

TARGET = "AWSCognitoIdentityProviderService.InitiateAuth"
REVOKE_TARGET = "AWSCognitoIdentityProviderService.RevokeToken"
SERVICE = "AWSCognitoIdentityProviderService."
RESPOND, ASSOCIATE, VERIFY, GLOBAL_SIGN_OUT = (
    "RespondToAuthChallenge", "AssociateSoftwareToken", "VerifySoftwareToken", "GlobalSignOut")
SESSION_SECONDS = 180  # Cognito's challenge session
AMZ_JSON = "application/x-amz-json-1.1"
HANG_SECONDS = 30.0  # far beyond the server's 5 s bound; stop() releases it early


def expected_secret_hash(client_secret: str, username: str, client_id: str) -> str:
    """Base64(HMAC-SHA256(client secret, username + client id)), computed independently."""
    mac = hmac.new(client_secret.encode(), (username + client_id).encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


@dataclass
class PoolUser:
    """One user. `username` is the Cognito username; `aliases` sign in too (email alias)."""

    username: str
    password: str
    sub: str = field(default_factory=lambda: str(uuid.uuid4()))
    email: str | None = None
    aliases: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    # Answered once the password is right: an AWS error type, or a challenge name.
    error: str | None = None
    challenge: str | None = None
    token_ttl: int = 3600
    totp_secret: str | None = None  # base32; SOFTWARE_TOKEN_MFA checks codes against it
    required_attributes: tuple[str, ...] = ()  # NEW_PASSWORD_REQUIRED asks for these
    attributes: dict[str, str] = field(default_factory=dict)
    then: str | None = None  # the challenge that follows NEW_PASSWORD_REQUIRED (MFA_SETUP)


def totp(secret: str, at: float | None = None, step: int = 30) -> str:
    """RFC 6238 with SHA-1 and 6 digits, as authenticator apps and Cognito compute it."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    counter = int((time.time() if at is None else at) // step).to_bytes(8, "big")
    mac = hmac.new(key, counter, hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    return str((int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF) % 1_000_000).zfill(6)


@dataclass
class ChallengeSession:
    """A Session Cognito handed out: whose, for which step, until when."""

    username: str
    client_id: str
    challenge: str
    expires: float
    secret: str | None = None  # MFA_SETUP: associated, not yet verified
    verified: bool = False


@dataclass(frozen=True)
class Call:
    """One request the fake received, as it arrived."""

    target: str | None
    content_type: str | None
    user_agent: str | None
    body: dict[str, Any]

    @property
    def flow(self) -> str | None:
        return self.body.get("AuthFlow")

    @property
    def params(self) -> dict[str, str]:
        params: dict[str, str] = self.body.get("AuthParameters") or {}
        return params


class AwsError(Exception):
    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind, self.message, self.status = kind, message, status


class FakeCognito:
    """The pool: app clients (id -> secret or None), users, a signing key, a failure mode.

    `mode` is "ok", "error_500" (HTTP 500, AWS's InternalErrorException) or "hang" (no
    answer for HANG_SECONDS). `calls` records every InitiateAuth request; `issued` every
    token and refresh token handed out (for log-leak checks).
    """

    def __init__(self, clients: dict[str, str | None] | None = None,
                 key: SigningKey | None = None) -> None:
        self.clients: dict[str, str | None] = dict(clients or {CLIENT_ID: None})
        self.key = key or SigningKey()
        self.users: dict[str, PoolUser] = {}
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # token -> (username, client id)
        self.calls: list[Call] = []
        self.answered: list[str] = []  # per call: "ok", an AWS error type or a challenge
        self.issued: list[str] = []
        self.mode = "ok"
        self.jwks_hits = 0
        self.sessions: dict[str, ChallengeSession] = {}  # the live ones
        self.handed_out: list[str] = []  # every Session ever answered (for leak checks)
        self.sms_codes: dict[str, str] = {}  # username -> the code "sent" by SMS
        self.global_sign_outs: list[str] = []  # usernames
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---------------------------------------------------------------- setup

    def add(self, *users: PoolUser) -> None:
        for user in users:
            self.users[user.username] = user

    def reset(self) -> None:
        """Back to answering normally, with an empty call log."""
        self.mode = "ok"
        self.calls.clear()
        self.answered.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{POOL_ID}/.well-known/jwks.json"

    def expire_sessions(self) -> None:
        """Every challenge session runs out (as after Cognito's 3 minutes)."""
        for session in self.sessions.values():
            session.expires = 0.0

    def calls_to(self, operation: str) -> list[Call]:
        return [call for call in self.calls if call.target == SERVICE + operation]

    def calls_of(self, flow: str) -> list[Call]:
        return [call for call in self.calls if call.flow == flow]

    # ------------------------------------------------------------- lifecycle

    @contextmanager
    def running(self) -> Iterator[FakeCognito]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
            finally:
                ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._cleanup())
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-cognito", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"fake Cognito did not start: {failure}")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._release is not None:
            loop.call_soon_threadsafe(self._release.set)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    async def _serve(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/", self._initiate_auth)
        app.router.add_get(f"/{POOL_ID}/.well-known/jwks.json", self._jwks)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -------------------------------------------------------------- handlers

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        return web.json_response({"keys": [self.key.jwk()]})

    async def _initiate_auth(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_unparsed": raw.decode(errors="replace")}
        headers = request.headers
        self.calls.append(Call(headers.get("X-Amz-Target"), headers.get("Content-Type"),
                               headers.get("User-Agent"), body))
        if self.mode == "hang":
            assert self._release is not None
            with suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), HANG_SECONDS)
        try:
            if self.mode in ("error_500", "hang"):
                raise AwsError("InternalErrorException", "Internal server error", 500)
            if request.headers.get("X-Amz-Target") == REVOKE_TARGET:
                self.answered.append(self._revoke(body))
                return _answer({})
            operation = (request.headers.get("X-Amz-Target") or "").removeprefix(SERVICE)
            if operation in (RESPOND, ASSOCIATE, VERIFY, GLOBAL_SIGN_OUT):
                document = getattr(self, "_" + operation)(body)
                self.answered.append(document.get("ChallengeName", operation))
                return _answer(document)
            if request.headers.get("X-Amz-Target") != TARGET:
                raise AwsError("UnknownOperationException", "Unknown operation")
            if request.headers.get("Content-Type") != AMZ_JSON:
                raise AwsError("SerializationException", "Content-Type is not x-amz-json-1.1")
            if not isinstance(body, dict) or "_unparsed" in body:
                raise AwsError("SerializationException", "body is not a JSON object")
            document = self._authenticate(body)
        except AwsError as exc:
            self.answered.append(exc.kind)
            return _aws_error(exc)
        self.answered.append(document.get("ChallengeName", "ok"))
        return _answer(document)

    # ----------------------------------------------------------------- flows

    def _revoke(self, body: dict[str, Any]) -> str:
        """RevokeToken: the refresh token stops working (AWS answers {} either way)."""
        token = body.get("Token")
        owner = self.refresh_tokens.get(token) if isinstance(token, str) else None
        if owner is None or owner[1] != body.get("ClientId"):
            return "revoke-unknown"
        if self.clients[owner[1]] != body.get("ClientSecret"):
            raise AwsError("NotAuthorizedException", "Client secret is wrong")
        del self.refresh_tokens[token]
        return "revoked"

    def _authenticate(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id = body.get("ClientId")
        if client_id not in self.clients:
            raise AwsError("ResourceNotFoundException", f"User pool client {client_id} does not exist.")
        params = body.get("AuthParameters")
        if not isinstance(params, dict):
            raise AwsError("InvalidParameterException", "Missing required parameter AuthParameters")
        flow = body.get("AuthFlow")
        if flow == "USER_PASSWORD_AUTH":
            return self._password_auth(client_id, params)
        if flow in ("REFRESH_TOKEN_AUTH", "REFRESH_TOKEN"):
            return self._refresh_auth(client_id, params)
        raise AwsError("InvalidParameterException", f"Unsupported AuthFlow {flow}")

    def _check_secret_hash(self, client_id: str, username: str, params: dict[str, Any]) -> None:
        secret = self.clients[client_id]
        given = params.get("SECRET_HASH")
        if secret is None:
            if given is not None:
                raise AwsError("NotAuthorizedException",
                               f"Client {client_id} is not configured with a secret")
            return
        if not given:
            raise AwsError("NotAuthorizedException",
                           f"Client {client_id} is configured for secret but secret was not received")
        if not hmac.compare_digest(str(given), expected_secret_hash(secret, username, client_id)):
            raise AwsError("NotAuthorizedException",
                           f"Unable to verify secret hash for client {client_id}")

    def _find(self, name: str) -> PoolUser | None:
        if name in self.users:
            return self.users[name]
        lowered = name.lower()
        for user in self.users.values():
            if lowered in (alias.lower() for alias in user.aliases):
                return user
        return None

    def _password_auth(self, client_id: str, params: dict[str, Any]) -> dict[str, Any]:
        name, password = params.get("USERNAME"), params.get("PASSWORD")
        if not name or not isinstance(name, str):
            raise AwsError("InvalidParameterException", "Missing required parameter USERNAME")
        if not password or not isinstance(password, str):
            raise AwsError("InvalidParameterException", "Missing required parameter PASSWORD")
        # Cognito checks SECRET_HASH against USERNAME as sent (the alias, when one is used).
        self._check_secret_hash(client_id, name, params)
        user = self._find(name)
        if user is None:
            raise AwsError("UserNotFoundException", "User does not exist.")
        if not hmac.compare_digest(password.encode(), user.password.encode()):
            raise AwsError("NotAuthorizedException", "Incorrect username or password.")
        if user.error:
            raise AwsError(user.error, f"{user.error} for this user")
        if user.challenge:
            return self._challenge(user, client_id, user.challenge)
        return self._signed_in(user, client_id)

    def _signed_in(self, user: PoolUser, client_id: str) -> dict[str, Any]:
        refresh = _opaque_refresh_token()
        self.refresh_tokens[refresh] = (user.username, client_id)
        self.issued.append(refresh)
        return {"ChallengeParameters": {}, "AuthenticationResult": self._tokens(user, client_id, refresh)}

    def _refresh_auth(self, client_id: str, params: dict[str, Any]) -> dict[str, Any]:
        token = params.get("REFRESH_TOKEN")
        if not token or not isinstance(token, str):
            raise AwsError("InvalidParameterException", "Missing required parameter REFRESH_TOKEN")
        owner = self.refresh_tokens.get(token)
        if owner is None or owner[1] != client_id:
            raise AwsError("NotAuthorizedException", "Invalid Refresh Token")
        # The refresh flow's SECRET_HASH uses the Cognito username, never the alias typed.
        self._check_secret_hash(client_id, owner[0], params)
        user = self.users[owner[0]]
        return {"ChallengeParameters": {}, "AuthenticationResult": self._tokens(user, client_id, None)}

    def _tokens(self, user: PoolUser, client_id: str, refresh: str | None) -> dict[str, Any]:
        now = int(time.time())
        common: dict[str, Any] = {"sub": user.sub, "iss": ISSUER, "iat": now, "auth_time": now,
                                  "exp": now + user.token_ttl, "origin_jti": str(uuid.uuid4()),
                                  "event_id": str(uuid.uuid4())}
        if user.groups:
            common["cognito:groups"] = list(user.groups)
        access = dict(common, token_use="access", client_id=client_id, username=user.username,
                      scope="aws.cognito.signin.user.admin", jti=str(uuid.uuid4()))
        ident = dict(common, token_use="id", aud=client_id, jti=str(uuid.uuid4()),
                     **{"cognito:username": user.username})
        if user.email:
            ident.update(email=user.email, email_verified=True)
        result: dict[str, Any] = {"AccessToken": self.key.mint(access), "ExpiresIn": user.token_ttl,
                                  "TokenType": "Bearer", "IdToken": self.key.mint(ident)}
        if refresh is not None:
            result["RefreshToken"] = refresh
        self.issued += [result["AccessToken"], result["IdToken"]]
        return result


    # ------------------------------------------------------------ challenges

    def _challenge(self, user: PoolUser, client_id: str, name: str) -> dict[str, Any]:
        session = secrets.token_urlsafe(48)
        self.sessions[session] = ChallengeSession(user.username, client_id, name,
                                                  time.time() + SESSION_SECONDS)
        parameters = {"USER_ID_FOR_SRP": user.username}
        if name == "NEW_PASSWORD_REQUIRED":
            parameters["requiredAttributes"] = json.dumps(
                [f"userAttributes.{a}" for a in user.required_attributes])
            parameters["userAttributes"] = json.dumps(user.attributes)
        elif name == "SMS_MFA":
            self.sms_codes[user.username] = f"{secrets.randbelow(10**6):06d}"
            parameters.update(CODE_DELIVERY_DELIVERY_MEDIUM="SMS",
                              CODE_DELIVERY_DESTINATION="+*******0100")
        elif name == "MFA_SETUP":
            parameters["MFAS_CAN_SETUP"] = '["SOFTWARE_TOKEN_MFA"]'
        self.handed_out.append(session)
        return {"ChallengeName": name, "Session": session, "ChallengeParameters": parameters}

    def _session(self, body: dict[str, Any], step: str | None = None) -> ChallengeSession:
        token = body.get("Session")
        found = self.sessions.get(token) if isinstance(token, str) else None
        if found is None or found.expires <= time.time() or (step and found.challenge != step):
            raise AwsError("NotAuthorizedException", "Invalid session for the user, session is expired.")
        return found

    def _RespondToAuthChallenge(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id, name = body.get("ClientId"), body.get("ChallengeName")
        if client_id not in self.clients:
            raise AwsError("ResourceNotFoundException", f"User pool client {client_id} does not exist.")
        responses = body.get("ChallengeResponses")
        if not isinstance(responses, dict) or responses.get("USERNAME") is None:
            raise AwsError("InvalidParameterException", "Missing required parameter USERNAME")
        session = self._session(body, str(name))
        if session.client_id != client_id or responses["USERNAME"] != session.username:
            raise AwsError("NotAuthorizedException", "Invalid session for the user.")
        self._check_secret_hash(client_id, session.username, responses)
        user = self.users[session.username]
        if name == "NEW_PASSWORD_REQUIRED":
            self._new_password(user, responses)
        elif name in ("SOFTWARE_TOKEN_MFA", "SMS_MFA"):
            key = "SOFTWARE_TOKEN_MFA_CODE" if name == "SOFTWARE_TOKEN_MFA" else "SMS_MFA_CODE"
            right = (totp(user.totp_secret) if name == "SOFTWARE_TOKEN_MFA" and user.totp_secret
                     else self.sms_codes.get(user.username))
            if not right or not hmac.compare_digest(str(responses.get(key, "")), right):
                raise AwsError("CodeMismatchException", "Invalid code received for user")
        elif name == "MFA_SETUP":
            if not session.verified or session.secret is None:
                raise AwsError("InvalidParameterException", "Software token not verified")
            user.totp_secret, user.challenge = session.secret, "SOFTWARE_TOKEN_MFA"
        else:
            raise AwsError("InvalidParameterException", f"Unsupported challenge {name}")
        del self.sessions[body["Session"]]  # single use once answered
        if name == "NEW_PASSWORD_REQUIRED" and user.challenge:  # e.g. MFA set-up next
            return self._challenge(user, client_id, user.challenge)
        return self._signed_in(user, client_id)

    def _new_password(self, user: PoolUser, responses: dict[str, Any]) -> None:
        password = str(responses.get("NEW_PASSWORD") or "")
        if not password:
            raise AwsError("InvalidParameterException", "Missing required parameter NEW_PASSWORD")
        rules = (len(password) >= 8, any(c.isupper() for c in password),
                 any(c.islower() for c in password), any(c.isdigit() for c in password))
        if not all(rules):
            raise AwsError("InvalidPasswordException",
                           "Password does not conform to policy: Password not long enough")
        for name in user.required_attributes:
            if not responses.get(f"userAttributes.{name}"):
                raise AwsError("InvalidParameterException", f"Missing required attribute {name}")
            user.attributes[name] = str(responses[f"userAttributes.{name}"])
        user.password = password
        user.challenge, user.then = user.then, None

    def _AssociateSoftwareToken(self, body: dict[str, Any]) -> dict[str, Any]:
        session = self._session(body, "MFA_SETUP")
        del self.sessions[body["Session"]]
        session.secret = base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")
        new = secrets.token_urlsafe(48)
        self.sessions[new] = session
        self.handed_out.append(new)
        return {"SecretCode": session.secret, "Session": new}

    def _VerifySoftwareToken(self, body: dict[str, Any]) -> dict[str, Any]:
        session = self._session(body, "MFA_SETUP")
        if session.secret is None or not hmac.compare_digest(str(body.get("UserCode", "")),
                                                             totp(session.secret)):
            raise AwsError("EnableSoftwareTokenMFAException",
                           "Code mismatch and fail enable Software Token MFA")
        del self.sessions[body["Session"]]
        session.verified = True
        new = secrets.token_urlsafe(48)
        self.sessions[new] = session
        self.handed_out.append(new)
        return {"Status": "SUCCESS", "Session": new}

    def _GlobalSignOut(self, body: dict[str, Any]) -> dict[str, Any]:
        """Every refresh token of the access token's user stops working."""
        token = str(body.get("AccessToken", ""))
        if token not in self.issued:
            raise AwsError("NotAuthorizedException", "Invalid Access Token")
        claims = jwt.decode(token, options={"verify_signature": False})
        username = claims.get("username")
        self.refresh_tokens = {t: o for t, o in self.refresh_tokens.items() if o[0] != username}
        self.global_sign_outs.append(str(username))
        return {}


def _opaque_refresh_token() -> str:
    """Shaped like Cognito's: a five-part JWE, dots included, opaque to the client."""
    header = base64.urlsafe_b64encode(b'{"cty":"JWT","enc":"A256GCM","alg":"RSA-OAEP"}')
    parts = [header.rstrip(b"=").decode()] + [secrets.token_urlsafe(n) for n in (192, 9, 600, 12)]
    return ".".join(parts)


def _answer(document: dict[str, Any]) -> web.Response:
    return web.Response(text=json.dumps(document), content_type=AMZ_JSON,
                        headers={"x-amzn-RequestId": str(uuid.uuid4())})


def _aws_error(exc: AwsError) -> web.Response:
    return web.Response(text=json.dumps({"__type": exc.kind, "message": exc.message}),
                        status=exc.status, content_type=AMZ_JSON,
                        headers={"x-amzn-RequestId": str(uuid.uuid4()),
                                 "x-amzn-ErrorType": f"{exc.kind}:"})
