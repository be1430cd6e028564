"""Sign-in: /auth/login, /auth/refresh, /auth/me and /auth/logout against a fake Cognito pool
over the real InitiateAuth wire format, and the dev sign-in. Real chatserver processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from yarl import URL

from chatserver.config import load_settings
from tests.cognito_keys import CLIENT_ID, cognito_env
from tests.fake_cognito import AMZ_JSON, TARGET, FakeCognito, PoolUser, expected_secret_hash
from tests.support import (
    RedisServer,
    ServerProcess,
    base_env,
    cookie_session,
    free_port,
    of_type,
    open_ws,
    receive_until,
    scaled,
)

SECRET = "client-secret-" + uuid.uuid4().hex
PUBLIC_CLIENT = "publicclient456"  # an app client of the same pool without a secret
EVIL = "http://evil.example.com"

ALICE = PoolUser("alice", "Alice-pw-" + uuid.uuid4().hex, email="alice@example.com",
                 groups=("staff",))
CAROL_EMAIL = "carol@example.com"
# An email-alias pool: the Cognito username is a UUID (not the sub), she types her email.
CAROL = PoolUser(str(uuid.uuid4()), "Carol-pw-" + uuid.uuid4().hex, email=CAROL_EMAIL,
                 aliases=(CAROL_EMAIL,), groups=("admins",))
BRIEF = PoolUser("brief", "Brief-pw-" + uuid.uuid4().hex, token_ttl=2)
UNCONFIRMED = PoolUser("unconfirmed", "Unconf-pw-1", error="UserNotConfirmedException")
RESET = PoolUser("reset", "Reset-pw-1", error="PasswordResetRequiredException")
THROTTLED = PoolUser("throttled", "Throttle-pw-1", error="TooManyRequestsException")
CHALLENGED = {name: PoolUser(name.lower(), "Chal-pw-1", challenge=name)
              for name in ("NEW_PASSWORD_REQUIRED", "SMS_MFA", "SOFTWARE_TOKEN_MFA")}
USERS = (ALICE, CAROL, BRIEF, UNCONFIRMED, RESET, THROTTLED, *CHALLENGED.values())


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pool() -> Iterator[FakeCognito]:
    """The fake pool, serving for the whole module."""
    fake = FakeCognito({CLIENT_ID: SECRET, PUBLIC_CLIENT: None})
    fake.add(*USERS)
    with fake.running():
        yield fake


@pytest.fixture
def fake(pool: FakeCognito) -> Iterator[FakeCognito]:
    """The pool, answering normally with an empty call log for this test."""
    pool.reset()
    yield pool
    pool.reset()


def pool_env(fake: FakeCognito, **extra: str) -> dict[str, str]:
    return cognito_env(fake.jwks_url, AWS_COGNITO_ENDPOINT=fake.url,
                       AWS_COGNITO_CLIENT_SECRET=SECRET, **extra)


@pytest.fixture(scope="module")
def server(pool: FakeCognito, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One chatserver on the fake pool for the tests that do not need their own: no token
    leeway, and a login rate high enough that these tests never meet it."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("signin")
    process = ServerProcess(
        [sys.executable, "-m", "chatserver", "--host", "127.0.0.1", "--port", str(port)],
        base_env(pool_env(pool, CHAT_TOKEN_LEEWAY="0", CHAT_LOGIN_RATE="100000")),
        port, 1, workdir, workdir / "chatserver.log",
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()


# ------------------------------------------------------------------- helpers


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    cookies: dict[str, tuple[str, dict[str, str | bool]]]  # name -> (value, attributes)
    headers: dict[str, str] = field(default_factory=dict)


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str | bool]]:
    """A raw Set-Cookie header: name, value, attributes (lower-case keys; flags are True)."""
    first, *rest = (part.strip() for part in header.split(";"))
    name, _, value = first.partition("=")
    attributes: dict[str, str | bool] = {}
    for attribute in filter(None, rest):
        key, sep, attr_value = attribute.partition("=")
        attributes[key.strip().lower()] = attr_value.strip() if sep else True
    return name, value.strip('"'), attributes


async def call(session: aiohttp.ClientSession, server: ServerProcess, method: str, path: str,
               *, json_body: Any = None, data: bytes | None = None,
               headers: dict[str, str | None] | None = None) -> Answer:
    """One request as the browser client sends it (Origin, JSON), unless `headers` say
    otherwise (a None value leaves that header out)."""
    wanted: dict[str, str | None] = {"Origin": server.origin}
    if method == "POST":
        wanted["Content-Type"] = "application/json"
    wanted.update(headers or {})
    sent = {name: value for name, value in wanted.items() if value is not None}
    payload = data if json_body is None else json.dumps(json_body).encode()
    async with session.request(method, server.url + path, data=payload, headers=sent) as response:
        text = await response.text()
        cookies = {}
        for header in response.headers.getall("Set-Cookie", []):
            name, value, attributes = parse_set_cookie(header)
            cookies[name] = (value, attributes)
        try:
            body = await response.json(content_type=None) if text else {}
        except ValueError:
            body = {"_text": text}
        return Answer(response.status, body, cookies, dict(response.headers))


async def login(session: aiohttp.ClientSession, server: ServerProcess, username: str,
                password: str, **kwargs: Any) -> Answer:
    return await call(session, server, "POST", "/auth/login",
                      json_body={"username": username, "password": password}, **kwargs)


def jar_cookie(session: aiohttp.ClientSession, server: ServerProcess, name: str) -> str | None:
    morsel = session.cookie_jar.filter_cookies(URL(server.url + "/auth/x")).get(name)
    return None if morsel is None else morsel.value


def assert_auth_cookie(answer: Answer, lifetime: int) -> str:
    """__Host-authToken is exactly HttpOnly; Secure; SameSite=Strict; Path=/;
    Max-Age=<lifetime> (what the __Host- prefix needs: Secure, Path=/, no Domain)."""
    value, attributes = answer.cookies["__Host-authToken"]
    assert set(attributes) == {"httponly", "secure", "samesite", "path", "max-age"}, attributes
    assert attributes["httponly"] is True and attributes["secure"] is True
    assert attributes["samesite"] == "Strict" and attributes["path"] == "/"
    assert lifetime - 2 <= int(str(attributes["max-age"])) <= lifetime, attributes
    return value


def assert_refresh_cookie(answer: Answer) -> str:
    """__Secure-refreshToken: HttpOnly; Secure; SameSite=Strict; Path=/auth (Max-Age allowed)."""
    value, attributes = answer.cookies["__Secure-refreshToken"]
    assert set(attributes) - {"max-age"} == {"httponly", "secure", "samesite", "path"}, attributes
    assert attributes["httponly"] is True and attributes["secure"] is True
    assert attributes["samesite"] == "Strict" and attributes["path"] == "/auth"
    return value


def assert_cleared(answer: Answer, *, secure: bool = False) -> None:
    """Both cookies are overwritten empty with Max-Age=0 on their own paths, under the
    original design's names and, with Secure cookies, under the prefixed ones."""
    names = [("authToken", "/"), ("refreshToken", "/auth")]
    if secure:
        names += [("__Host-authToken", "/"), ("__Secure-refreshToken", "/auth")]
    for name, path in names:
        value, attributes = answer.cookies[name]
        assert value == "" and attributes.get("max-age") == "0", (name, attributes)
        assert attributes.get("path") == path, (name, attributes)


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def latest_refresh_token(fake: FakeCognito, user: PoolUser) -> str:
    return [t for t, (name, _) in fake.refresh_tokens.items() if name == user.username][-1]


async def server_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> tuple[int, str]:
    """Read until the server's Close frame; its (code, reason) as sent.

    Not ws.close_code: that reads 1006 when the server shuts TCP before our Close reply.
    """
    async with asyncio.timeout(scaled(timeout)):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra or "")
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                raise AssertionError(f"socket ended without a Close frame: {msg}")


@asynccontextmanager
async def secure_session(server: ServerProcess) -> AsyncIterator[aiohttp.ClientSession]:
    """A cookie jar that returns Secure cookies to this plain-http test server."""
    origins = [server.url, f"ws://127.0.0.1:{server.port}"]
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=origins)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        yield session


@asynccontextmanager
async def session_from(ip: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from `ip` (any 127.x address is loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(ip, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def sockets_on_two_workers(session: aiohttp.ClientSession, server: ServerProcess,
                                 sub: str) -> list[aiohttp.ClientWebSocketResponse]:
    """Open sockets with one session's cookie until two sit on different workers."""
    found: dict[str, aiohttp.ClientWebSocketResponse] = {}
    for _ in range(60):
        ws = await open_ws(session, server)
        welcome = await receive_until(ws, of_type("welcome"))
        assert welcome["user"]["sub"] == sub
        await receive_until(ws, of_type("joined"))
        if welcome["instance"] in found:
            await ws.close()
            continue
        found[welcome["instance"]] = ws
        if len(found) == 2:
            return list(found.values())
    raise AssertionError(f"only {len(found)} distinct workers after 60 connections")


# ------------------------------------------------------- the whole happy path


async def test_login_ws_refresh_logout_on_two_workers(
        make_server: Callable[..., ServerProcess], redis_url: str, fake: FakeCognito) -> None:
    """Alias login sets exact cookies; /ws on both workers; refresh renews; logout closes both."""
    server = make_server(workers=2, redis_url=redis_url, env=pool_env(fake, CHAT_COOKIE_SECURE="1"))
    async with secure_session(server) as session:
        answer = await login(session, server, CAROL_EMAIL, CAROL.password)
        assert answer.status == 200, answer.body
        user = {"sub": CAROL.sub, "username": CAROL.username, "groups": ["admins"]}
        assert answer.body == {"user": user}
        (sent,) = fake.calls_of("USER_PASSWORD_AUTH")
        assert (sent.target, sent.content_type) == (TARGET, AMZ_JSON)
        assert "aiohttp" in (sent.user_agent or ""), sent.user_agent
        assert sent.body == {"AuthFlow": "USER_PASSWORD_AUTH", "ClientId": CLIENT_ID,
                             "AuthParameters": {
                                 "USERNAME": CAROL_EMAIL, "PASSWORD": CAROL.password,
                                 "SECRET_HASH": expected_secret_hash(SECRET, CAROL_EMAIL, CLIENT_ID)}}
        token = assert_auth_cookie(answer, CAROL.token_ttl)
        assert claims_of(token)["token_use"] == "access"
        assert assert_refresh_cookie(answer).endswith(latest_refresh_token(fake, CAROL))

        sockets = await sockets_on_two_workers(session, server, CAROL.sub)
        await sockets[0].send_json({"message": "hello from carol"})
        for ws in sockets:
            frame = await receive_until(ws, of_type("message", message="hello from carol"))
            assert frame["user"] == CAROL.sub

        refreshed = await call(session, server, "POST", "/auth/refresh")
        assert refreshed.status == 200, refreshed.body
        assert refreshed.body == {"user": user}
        (renewal,) = fake.calls_of("REFRESH_TOKEN_AUTH")
        assert (renewal.target, renewal.content_type) == (TARGET, AMZ_JSON)
        assert renewal.body == {"AuthFlow": "REFRESH_TOKEN_AUTH", "ClientId": CLIENT_ID,
                                "AuthParameters": {
                                    "REFRESH_TOKEN": latest_refresh_token(fake, CAROL),
                                    "SECRET_HASH": expected_secret_hash(SECRET, CAROL.username, CLIENT_ID)}}
        new_token = assert_auth_cookie(refreshed, CAROL.token_ttl)
        assert new_token != token and jar_cookie(session, server, "__Host-authToken") == new_token
        me = await call(session, server, "GET", "/auth/me")
        assert (me.status, me.body) == (200, {"user": user})

        out = await call(session, server, "POST", "/auth/logout")
        assert (out.status, out.body) == (200, {"ok": True})
        assert_cleared(out, secure=True)
        closes = await asyncio.gather(*(server_close(ws) for ws in sockets))
        assert closes == [(1000, "signed out")] * 2
        gone = await call(session, server, "GET", "/auth/me")
        assert gone.status == 401 and gone.body["error"] == "unauthenticated"


async def test_id_token_mode_carries_email(make_server: Callable[..., ServerProcess],
                                           fake: FakeCognito) -> None:
    """CHAT_TOKEN_USE=id: ID-token cookie, email in the user, Secure by default, refresh works."""
    server = make_server(env=pool_env(fake, CHAT_TOKEN_USE="id", CHAT_COOKIE_SECURE=""))
    async with secure_session(server) as session:
        answer = await login(session, server, CAROL_EMAIL, CAROL.password)
        assert answer.status == 200, answer.body
        user = {"sub": CAROL.sub, "username": CAROL.username, "email": CAROL_EMAIL,
                "groups": ["admins"]}
        assert answer.body == {"user": user}
        assert claims_of(assert_auth_cookie(answer, CAROL.token_ttl))["token_use"] == "id"
        assert_refresh_cookie(answer)
        refreshed = await call(session, server, "POST", "/auth/refresh")
        assert (refreshed.status, refreshed.body) == (200, {"user": user})
        assert claims_of(assert_auth_cookie(refreshed, CAROL.token_ttl))["token_use"] == "id"
        (renewal,) = fake.calls_of("REFRESH_TOKEN_AUTH")
        assert renewal.params["SECRET_HASH"] == expected_secret_hash(SECRET, CAROL.username, CLIENT_ID)


async def test_client_without_secret_sends_no_secret_hash(
        make_server: Callable[..., ServerProcess], fake: FakeCognito) -> None:
    """An app client without a secret: login and refresh carry no SECRET_HASH."""
    server = make_server(env=cognito_env(fake.jwks_url, AWS_COGNITO_ENDPOINT=fake.url,
                                         AWS_COGNITO_CLIENT_ID=PUBLIC_CLIENT))
    async with cookie_session() as session:
        answer = await login(session, server, ALICE.username, ALICE.password)
        assert answer.status == 200, answer.body
        refreshed = await call(session, server, "POST", "/auth/refresh")
        assert refreshed.status == 200, refreshed.body
    assert [call.params.keys() for call in fake.calls] == [
        {"USERNAME", "PASSWORD"}, {"REFRESH_TOKEN"}]
    assert all(call.body["ClientId"] == PUBLIC_CLIENT for call in fake.calls)


# ------------------------------------------------------------- error mapping


@pytest.mark.parametrize(("username", "password", "aws", "status", "code"), [
    ("alice", "not-her-password", "NotAuthorizedException", 401, "invalid_credentials"),
    ("nobody", "whatever-pw", "UserNotFoundException", 401, "invalid_credentials"),
    (UNCONFIRMED.username, UNCONFIRMED.password, "UserNotConfirmedException", 401,
     "invalid_credentials"),
    (RESET.username, RESET.password, "PasswordResetRequiredException", 403,
     "password_reset_required"),
    (THROTTLED.username, THROTTLED.password, "TooManyRequestsException", 429, "rate_limited"),
    *[(user.username, user.password, name, 409, "challenge") for name, user in CHALLENGED.items()],
])
async def test_cognito_answer_maps_to_error(server: ServerProcess, fake: FakeCognito,
                                            username: str, password: str, aws: str,
                                            status: int, code: str) -> None:
    """Each Cognito refusal or challenge maps to its status and {"error", "detail"}, no cookie."""
    async with cookie_session() as session:
        answer = await login(session, server, username, password)
    assert fake.answered == [aws]
    assert answer.status == status, answer.body
    assert answer.body["error"] == code and isinstance(answer.body["detail"], str)
    if status == 409:  # the one cookie is the challenge's opaque id (tests/test_challenge.py)
        assert answer.body["challenge"] == aws
        assert set(answer.cookies) == {"authChallenge"}, answer.cookies
        assert answer.cookies["authChallenge"][1]["httponly"] is True
    else:
        assert answer.cookies == {}


async def test_bad_credentials_are_indistinguishable(server: ServerProcess,
                                                     fake: FakeCognito) -> None:
    """Wrong password, unknown user and unconfirmed user get byte-identical 401 answers."""
    answers = []
    async with cookie_session() as session:
        for username, password in (("alice", "wrong-pw"), ("nobody", "wrong-pw"),
                                   (UNCONFIRMED.username, UNCONFIRMED.password)):
            answers.append(await login(session, server, username, password))
    assert fake.answered == ["NotAuthorizedException", "UserNotFoundException",
                             "UserNotConfirmedException"]
    assert [a.status for a in answers] == [401] * 3
    assert answers[0].body == answers[1].body == answers[2].body
    assert answers[0].body["error"] == "invalid_credentials"


async def test_cognito_500_is_503(server: ServerProcess, fake: FakeCognito) -> None:
    """Cognito answering HTTP 500 gives 503 unavailable."""
    fake.mode = "error_500"
    async with cookie_session() as session:
        answer = await login(session, server, ALICE.username, ALICE.password)
    assert fake.answered == ["InternalErrorException"]
    assert (answer.status, answer.body["error"]) == (503, "unavailable")
    assert answer.cookies == {}


async def test_hanging_cognito_is_503_within_bound(server: ServerProcess,
                                                   fake: FakeCognito) -> None:
    """Cognito not answering gives 503 once the 5 s bound passes (well under 7 s)."""
    fake.mode = "hang"
    async with cookie_session() as session:
        started = time.monotonic()
        answer = await login(session, server, ALICE.username, ALICE.password)
        elapsed = time.monotonic() - started
    assert (answer.status, answer.body["error"]) == (503, "unavailable")
    assert len(fake.calls) == 1
    assert 4.5 <= elapsed < 5 + scaled(2), f"503 after {elapsed:.1f} s"


async def test_unreachable_cognito_is_503(make_server: Callable[..., ServerProcess],
                                          fake: FakeCognito) -> None:
    """A Cognito endpoint nobody listens on gives 503 unavailable, promptly."""
    dead = f"http://127.0.0.1:{free_port()}/"
    server = make_server(env=cognito_env(fake.jwks_url, AWS_COGNITO_ENDPOINT=dead,
                                         AWS_COGNITO_CLIENT_SECRET=SECRET))
    async with cookie_session() as session:
        started = time.monotonic()
        answer = await login(session, server, ALICE.username, ALICE.password)
    assert (answer.status, answer.body["error"]) == (503, "unavailable")
    assert time.monotonic() - started < scaled(3)


async def test_refresh_refused_or_unavailable(server: ServerProcess, fake: FakeCognito) -> None:
    """Refresh: Cognito down is 503 keeping cookies; refused or missing is 401 clearing them."""
    async with cookie_session() as session:
        assert (await login(session, server, ALICE.username, ALICE.password)).status == 200
        fake.mode = "error_500"
        answer = await call(session, server, "POST", "/auth/refresh")
        assert (answer.status, answer.body["error"], answer.cookies) == (503, "unavailable", {})
        fake.mode = "ok"
        fake.refresh_tokens.pop(latest_refresh_token(fake, ALICE))  # revoked at Cognito
        answer = await call(session, server, "POST", "/auth/refresh")
        assert (answer.status, answer.body["error"]) == (401, "unauthenticated")
        assert fake.answered[-1] == "NotAuthorizedException"
        assert_cleared(answer)
        assert jar_cookie(session, server, "refreshToken") is None
        answer = await call(session, server, "POST", "/auth/refresh")
        assert (answer.status, answer.body["error"]) == (401, "unauthenticated")


@pytest.mark.parametrize("cookie", ["garbage", "YWxpY2U=", "YWxpY2U=.", "."],
                         ids=["not_packed", "name_only", "empty_token", "dot_only"])
async def test_malformed_refresh_cookie_is_401(server: ServerProcess, fake: FakeCognito,
                                               cookie: str) -> None:
    """A refresh cookie that is not <name>.<token> is 401 unauthenticated and cleared."""
    async with cookie_session() as session:
        session.cookie_jar.update_cookies({"refreshToken": cookie}, URL(server.url + "/auth/"))
        answer = await call(session, server, "POST", "/auth/refresh")
    assert (answer.status, answer.body.get("error")) == (401, "unauthenticated"), answer
    assert_cleared(answer)


async def test_oversized_login_body_is_a_json_error(server: ServerProcess,
                                                    fake: FakeCognito) -> None:
    """A login body over the size bound is refused with a JSON {"error", "detail"} body."""
    body = json.dumps({"username": "alice", "password": "x" * 70_000}).encode()
    async with cookie_session() as session:
        answer = await call(session, server, "POST", "/auth/login", data=body)
    assert answer.status in (400, 413), answer
    assert isinstance(answer.body.get("error"), str), f"not a JSON error body: {answer.body}"
    assert isinstance(answer.body.get("detail"), str)
    assert fake.calls == []


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"[]", b'"alice"', b'{"password": "x"}',
    b'{"username": 42, "password": "x"}', b'{"username": "alice", "password": 42}',
    b'{"username": "   ", "password": "x"}', b'{"username": "' + b"a" * 300 + b'", "password": "x"}',
    b'{"username": "alice", "password": "x", "groups": ["admins"]}',
], ids=["not_json", "empty", "array", "string", "no_username", "username_number",
        "password_number", "blank_username", "long_username", "groups_are_cognitos"])
async def test_malformed_login_body_is_400(server: ServerProcess, fake: FakeCognito,
                                           body: bytes) -> None:
    """A login body that is not {"username": str, "password": str} is 400, not sent on."""
    async with cookie_session() as session:
        answer = await call(session, server, "POST", "/auth/login", data=body)
    assert answer.status == 400, answer.body
    assert answer.body["error"] == "bad_request" and isinstance(answer.body["detail"], str)
    assert fake.calls == []


async def test_secrets_never_reach_the_log(server: ServerProcess, fake: FakeCognito) -> None:
    """Sign-ins, failures, refreshes, logouts: no password, token or secret in the log."""
    wrong = "Wrong-pw-" + uuid.uuid4().hex
    async with cookie_session() as session:
        assert (await login(session, server, ALICE.username, ALICE.password)).status == 200
        assert (await login(session, server, CAROL_EMAIL, CAROL.password)).status == 200
        assert (await call(session, server, "POST", "/auth/refresh")).status == 200
        assert (await call(session, server, "POST", "/auth/logout")).status == 200
        assert (await login(session, server, ALICE.username, wrong)).status == 401
        fake.mode = "error_500"
        assert (await login(session, server, ALICE.username, ALICE.password)).status == 503
        fake.mode = "ok"
        forged = "bm9ib2R5." + latest_refresh_token(fake, ALICE)  # hashed as "nobody"
        session.cookie_jar.update_cookies({"refreshToken": forged}, URL(server.url + "/auth/"))
        assert (await call(session, server, "POST", "/auth/refresh")).status == 401
    log = server.log()
    assert "cognito login failed" in log, "the 503 above should have been logged"
    secrets = [SECRET, wrong, *(user.password for user in USERS)]
    secrets += [part for token in fake.issued for part in token.split(".") if len(part) >= 16]
    leaked = [secret[:24] + "..." for secret in secrets if secret in log]
    assert not leaked, f"in the server log: {leaked}"


# --------------------------------------------------------- token expiry, CSRF


async def test_token_expiring_on_open_socket_closes_4001(server: ServerProcess,
                                                         fake: FakeCognito) -> None:
    """A socket whose token reaches exp (CHAT_TOKEN_LEEWAY=0) is closed with 4001 at exp."""
    async with cookie_session() as session:
        answer = await login(session, server, BRIEF.username, BRIEF.password)
        assert answer.status == 200, answer.body
        exp = claims_of(answer.cookies["authToken"][0])["exp"]
        assert 0 <= int(str(answer.cookies["authToken"][1]["max-age"])) <= BRIEF.token_ttl
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("welcome"))
        code, reason = await server_close(ws, timeout=BRIEF.token_ttl + 5)
        closed_at = time.time()
    assert (code, reason) == (4001, "token expired")
    assert exp - 0.2 <= closed_at <= exp + scaled(1.5), f"closed {closed_at - exp:+.2f} s from exp"


@pytest.mark.parametrize(("origin", "content_type", "body"), [
    (EVIL, "application/json", b'{"username": "alice", "password": "x"}'),
    (None, "application/json", b'{"username": "alice", "password": "x"}'),
    ("null", "application/json", b'{"username": "alice", "password": "x"}'),
    ("same", "application/x-www-form-urlencoded", b"username=alice&password=x"),
    ("same", "multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nalice\r\n--b--\r\n"),
    ("same", "text/plain", b'{"username": "alice", "password": "x"}'),
], ids=["cross_origin", "no_origin", "null_origin", "form", "multipart", "text_plain"])
async def test_csrf_refused_login(server: ServerProcess, fake: FakeCognito, origin: str | None,
                                  content_type: str, body: bytes) -> None:
    """A cross-origin or non-JSON POST to /auth/login is 403 and never reaches Cognito."""
    headers = {"Content-Type": content_type,
               "Origin": server.origin if origin == "same" else origin}
    async with cookie_session() as session:
        answer = await call(session, server, "POST", "/auth/login", data=body, headers=headers)
    assert (answer.status, answer.body.get("error")) == (403, "forbidden"), answer.body
    assert fake.calls == [] and answer.cookies == {}


async def test_csrf_cannot_sign_out_or_refresh(server: ServerProcess, fake: FakeCognito) -> None:
    """A cross-origin or non-JSON logout/refresh is 403: socket, cookies and session stay."""
    async with cookie_session() as session:
        assert (await login(session, server, ALICE.username, ALICE.password)).status == 200
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("joined"))
        fake.reset()
        for path in ("/auth/logout", "/auth/refresh"):
            for headers in ({"Origin": EVIL},
                            {"Content-Type": "application/x-www-form-urlencoded"},
                            {"Content-Type": "text/plain"}):
                answer = await call(session, server, "POST", path, data=b"x=1", headers=headers)
                assert (answer.status, answer.cookies) == (403, {}), (path, headers, answer)
        assert fake.calls == []
        await ws.send_json({"message": "still here"})
        await receive_until(ws, of_type("message", message="still here"))
        assert (await call(session, server, "GET", "/auth/me")).status == 200
        await ws.close()


async def test_me_without_cookie_is_401(server: ServerProcess) -> None:
    """GET /auth/me with no cookie, or a forged one, is 401 unauthenticated."""
    forged = FakeCognito().key.mint()  # right shape and kid, a key the pool never published
    for token in (None, "not-a-jwt", forged):
        async with cookie_session(token) as session:
            answer = await call(session, server, "GET", "/auth/me")
        assert (answer.status, answer.body["error"]) == (401, "unauthenticated")


# ---------------------------------------------------------------- rate limit


async def inside_one_window(seconds: float = 10) -> None:
    """The sign-in limits count in fixed minutes: start a counting test where the next
    `seconds` cannot cross into a new minute, or its counts would start again."""
    left = 60 - time.time() % 60
    if left < seconds:
        await asyncio.sleep(left + 0.05)


async def test_login_rate_limited_per_ip(make_server: Callable[..., ServerProcess],
                                         fake: FakeCognito) -> None:
    """The 11th attempt a minute from one IP is 429 before Cognito, XFF or not; other IPs pass."""
    server = make_server(env=pool_env(fake))
    async with session_from("127.0.0.1") as session:
        statuses = [(await login(session, server, f"user{n}", "wrong-pw")).status for n in range(11)]
        limited = await login(session, server, "someone-else", "wrong-pw")
        spoofed = await login(session, server, "another-one", "wrong-pw",
                              headers={"X-Forwarded-For": "203.0.113.9"})
    assert statuses == [401] * 10 + [429]
    assert (limited.status, limited.body["error"]) == (429, "rate_limited")
    assert spoofed.status == 429, "X-Forwarded-For from an untrusted peer is ignored"
    assert len(fake.calls) == 10
    async with session_from("127.0.0.2") as other:
        assert (await login(other, server, ALICE.username, ALICE.password)).status == 200


async def test_login_rate_limited_per_username(make_server: Callable[..., ServerProcess],
                                               fake: FakeCognito) -> None:
    """The 11th attempt a minute on one username (any case), from 11 IPs, is 429."""
    server = make_server(env=pool_env(fake))
    statuses = []
    for n in range(11):
        async with session_from(f"127.0.0.{20 + n}") as session:
            name = "Alice" if n % 2 else "alice"
            statuses.append((await login(session, server, name, "wrong-pw")).status)
    assert statuses == [401] * 10 + [429]
    assert len(fake.calls) == 10
    async with session_from("127.0.0.30") as session:
        assert (await login(session, server, CAROL_EMAIL, CAROL.password)).status == 200


async def test_nobody_can_lock_a_user_out_by_typing_their_name(
        make_server: Callable[..., ServerProcess], fake: FakeCognito) -> None:
    """Hardening 3: 30 wrong passwords for alice from one address reach Cognito 10 times
    (the address limit refuses the rest, and those do not count against her name); the
    wait they put on her name is 1 s, after which she signs in; her own good sign-ins,
    from 12 addresses, never count at all."""
    server = make_server(env=pool_env(fake))
    await inside_one_window()
    async with session_from("127.0.0.1") as attacker:
        statuses = [(await login(attacker, server, ALICE.username, "wrong-pw")).status
                    for _ in range(30)]
    assert statuses == [401] * 10 + [429] * 20
    assert len(fake.calls) == 10
    async with session_from("127.0.0.2") as victim:
        answer = await login(victim, server, ALICE.username, ALICE.password)
        if answer.status == 429:  # inside the 1 s the tenth failure imposed
            assert answer.headers["Retry-After"] == "1", answer.headers
            await asyncio.sleep(1.05)
            answer = await login(victim, server, ALICE.username, ALICE.password)
        assert answer.status == 200, answer.body
    for n in range(12):
        async with session_from(f"127.0.0.{40 + n}") as session:
            assert (await login(session, server, ALICE.username, ALICE.password)).status == 200


async def test_forged_refresh_cookies_cost_no_cognito_call(
        make_server: Callable[..., ServerProcess], fake: FakeCognito) -> None:
    """Hardening 7: a refresh cookie that cannot be Cognito's is refused with no call;
    one shaped like a real one costs a call, at most CHAT_LOGIN_RATE x 3 a minute per
    address for refresh and sign-out together, then 429 with Retry-After."""
    server = make_server(env=pool_env(fake, CHAT_LOGIN_RATE="2"))
    await inside_one_window()
    async with session_from("127.0.0.1") as session:
        for forged in ("YWxpY2U=.short", "YWxpY2U=." + "a" * 30 + "~.b.c.d.e", "YWxpY2U=.a.b.c.d.e.f"):
            answer = await call(session, server, "POST", "/auth/refresh",
                                headers=refresh_cookie(forged))
            assert answer.body == {"error": "unauthenticated", "detail": "refresh token refused"}
            logout = await call(session, server, "POST", "/auth/logout",
                                headers=refresh_cookie(forged))
            assert logout.status == 200
        assert fake.calls == []
        shaped = "YWxpY2U=." + ".".join(["eyJjdHkiOiJKV1QifQ", "a" * 40, "b" * 12, "c" * 80,
                                         "d" * 16])
        statuses = []
        for path in ["/auth/refresh", "/auth/logout"] * 4:
            answer = await call(session, server, "POST", path, headers=refresh_cookie(shaped))
            statuses.append(answer.status)
        assert statuses == [401, 200, 401, 200, 401, 200, 429, 429], statuses
        assert 0 < int(answer.headers["Retry-After"]) <= 60
    assert len(fake.calls) == 6


def refresh_cookie(value: str) -> dict[str, str | None]:
    """Sent by hand: a jar would drop the cookie once the server has cleared it."""
    return {"Cookie": f"refreshToken={value}"}


# ------------------------------------------------------------------ dev sign-in


async def test_dev_sign_in_across_two_workers(make_server: Callable[..., ServerProcess],
                                              redis_url: str) -> None:
    """Dev sign-in, 2 workers: password enforced, tokens cross workers, forged ones refused."""
    password = "dev-pw-" + uuid.uuid4().hex
    server = make_server(workers=2, redis_url=redis_url, env={"CHAT_DEV_PASSWORD": password})
    async with cookie_session() as session:
        for wrong in ("", "nope"):
            answer = await login(session, server, "dana", wrong)
            assert (answer.status, answer.body["error"]) == (401, "invalid_credentials")
            assert answer.cookies == {}
        assert (await login(session, server, "no spaces!", password)).status == 400
        answer = await login(session, server, "dana", password)
        assert answer.status == 200, answer.body
        sub = answer.body["user"]["sub"]
        assert answer.body == {"user": {"sub": str(uuid.UUID(sub)), "username": "dana", "groups": []}}
        assert claims_of(answer.cookies["authToken"][0])["token_use"] == "access"
        sockets = await sockets_on_two_workers(session, server, sub)  # login hit only one
        refreshed = await call(session, server, "POST", "/auth/refresh")
        assert (refreshed.status, refreshed.body) == (200, answer.body)
        again = await login(session, server, "dana", password)
        assert again.body == answer.body, "the dev sub is stable per username"
        out = await call(session, server, "POST", "/auth/logout")
        assert (out.status, out.body) == (200, {"ok": True})
        closes = await asyncio.gather(*(server_close(ws) for ws in sockets))
        assert closes == [(1000, "signed out")] * 2
    token, refresh = answer.cookies["authToken"][0], answer.cookies["refreshToken"][0]
    tampered = token[:-6] + ("AAAAAA" if token[-6:] != "AAAAAA" else "BBBBBB")
    for access in (tampered, refresh):  # a bad signature; a refresh token as access token
        async with cookie_session(access) as forged:
            assert (await call(forged, server, "GET", "/auth/me")).status == 401
    async with cookie_session() as swapped:  # an access token as refresh token
        swapped.cookie_jar.update_cookies({"refreshToken": token}, URL(server.url + "/auth/"))
        assert (await call(swapped, server, "POST", "/auth/refresh")).status == 401


async def test_sign_out_while_redis_is_down_closes_every_socket_once_it_returns(
        make_server: Callable[..., ServerProcess], make_redis: Callable[[], RedisServer],
        dev_key_file: Path) -> None:
    """Hardening 6: Redis is killed, the user signs out: the worker that answered closes
    its socket at once, the other worker's socket stays open while nothing can reach it,
    and closes within seconds of Redis coming back (the sign-out was retried)."""
    redis = make_redis()
    server = make_server(workers=2, redis_url=redis.url,
                         env={"CHAT_DEV_KEY_FILE": str(dev_key_file)})
    async with cookie_session() as session:
        signed = await login(session, server, "olga", "")
        sockets = await sockets_on_two_workers(session, server, signed.body["user"]["sub"])
        redis.kill()
        out = await call(session, server, "POST", "/auth/logout")
        assert (out.status, out.body) == (200, {"ok": True})
        assert_cleared(out)
        closing = [asyncio.ensure_future(server_close(ws, timeout=30)) for ws in sockets]
        done, pending = await asyncio.wait(closing, timeout=scaled(5),
                                           return_when=asyncio.FIRST_COMPLETED)
        assert [task.result() for task in done] == [(1000, "signed out")]
        assert len(pending) == 1, "the other worker cannot have heard of it yet"
        await asyncio.to_thread(redis.start)
        assert await pending.pop() == (1000, "signed out")
    assert "not broadcast (broker unavailable); retrying" in server.log()


async def test_logout_revokes_the_refresh_token(server: ServerProcess, fake: FakeCognito) -> None:
    """After sign-out a copy of the refresh cookie is worthless: Cognito revoked it."""
    async with cookie_session() as session:
        assert (await login(session, server, ALICE.username, ALICE.password)).status == 200
        copied = jar_cookie(session, server, "refreshToken")
        assert copied
        assert (await call(session, server, "POST", "/auth/logout")).status == 200
    (revoke,) = [c for c in fake.calls if c.target and c.target.endswith("RevokeToken")]
    assert revoke.body["ClientId"] == CLIENT_ID and revoke.body["ClientSecret"] == SECRET
    assert "revoked" in fake.answered
    async with cookie_session() as thief:
        thief.cookie_jar.update_cookies({"refreshToken": copied}, URL(server.url + "/auth/"))
        refused = await call(thief, server, "POST", "/auth/refresh")
        assert (refused.status, refused.body["error"]) == (401, "unauthenticated")


def test_dev_sign_in_refused_off_loopback(tmp_path: Path) -> None:
    """No pool on --host 0.0.0.0: exit 2, one line, unless CHAT_DEV_AUTH=1 (no bind)."""
    result = subprocess.run(
        [sys.executable, "-m", "chatserver", "--host", "0.0.0.0", "--port", str(free_port())],
        env=base_env({}), cwd=tmp_path, capture_output=True, timeout=scaled(20), check=False,
    )
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "CHAT_DEV_AUTH" in lines[0], lines
    settings = load_settings({"CHAT_DEV_AUTH": "1"}, env_file=None, overrides={"host": "0.0.0.0"})
    assert settings.dev_auth and settings.host == "0.0.0.0"
