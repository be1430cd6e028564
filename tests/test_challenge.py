"""Cognito sign-in challenges through POST /auth/challenge, against the fake pool over
the real wire format: a new password, TOTP and SMS codes, TOTP set-up; single use,
expiry, and Cognito's Session never leaving the server. Real chatserver processes.
"""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cognito_keys import CLIENT_ID
from tests.fake_cognito import FakeCognito, PoolUser, expected_secret_hash, totp
from tests.support import (
    ServerProcess,
    base_env,
    cookie_session,
    free_port,
    of_type,
    open_ws,
    receive_until,
)
from tests.test_signin import (
    SECRET,
    Answer,
    assert_auth_cookie,
    call,
    login,
    pool_env,
    secure_session,
)

COOKIE = "__Secure-authChallenge"  # Secure cookies (this module's server): prefixed
PLAIN_COOKIE = "authChallenge"  # the name without Secure (make_server's default)


@pytest.fixture(scope="module")
def pool() -> Iterator[FakeCognito]:
    fake = FakeCognito({CLIENT_ID: SECRET})
    with fake.running():
        yield fake


@pytest.fixture(scope="module")
def server(pool: FakeCognito, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One chatserver on the fake pool (embedded defaults: the memory challenge store)."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("challenge")
    process = ServerProcess(
        [sys.executable, "-m", "chatserver", "--host", "127.0.0.1", "--port", str(port)],
        base_env(pool_env(pool, CHAT_LOGIN_RATE="100000", CHAT_COOKIE_SECURE="1")),
        port, 1, workdir, workdir / "chatserver.log")
    try:
        process.start()
        yield process
    finally:
        process.stop()


def new_user(pool: FakeCognito, challenge: str, **fields: Any) -> PoolUser:
    user = PoolUser("u-" + uuid.uuid4().hex[:10], "First-pw-1", challenge=challenge, **fields)
    pool.add(user)
    return user


def assert_challenge(answer: Answer, name: str) -> str:
    """A 409 naming the challenge, with only the opaque id cookie: HttpOnly, SameSite=Strict,
    Path=/auth, 3 minutes; no auth cookie."""
    assert answer.status == 409, answer.body
    assert (answer.body["error"], answer.body["challenge"]) == ("challenge", name)
    assert set(answer.cookies) == {COOKIE}, answer.cookies
    value, attributes = answer.cookies[COOKIE]
    assert attributes["httponly"] is True and attributes["secure"] is True
    assert attributes["samesite"] == "Strict" and attributes["path"] == "/auth"
    assert 170 <= int(str(attributes["max-age"])) <= 180, attributes
    return value


def assert_no_session_leak(pool: FakeCognito, answers: list[Answer], log: str) -> None:
    """No Cognito Session in any body, any cookie, or the log."""
    sessions = pool.handed_out
    assert sessions
    for answer in answers:
        text = repr(answer.body) + repr(answer.cookies)
        assert not any(session in text for session in sessions), answer
    assert not any(session in log for session in sessions)


async def answer(session: Any, server: ServerProcess, **body: Any) -> Answer:
    return await call(session, server, "POST", "/auth/challenge", json_body=body)


async def assert_ws_works(session: Any, server: ServerProcess, sub: str) -> None:
    ws = await open_ws(session, server)
    welcome = await receive_until(ws, of_type("welcome"))
    assert welcome["user"]["sub"] == sub
    await ws.close()


async def test_new_password_then_ws(server: ServerProcess, pool: FakeCognito) -> None:
    """An admin-created user: 409 NEW_PASSWORD_REQUIRED with the pool's rules and the
    required attributes; a weak password is 400 and can be retried; then cookies, /ws."""
    user = new_user(pool, "NEW_PASSWORD_REQUIRED", required_attributes=("name",))
    async with secure_session(server) as session:
        first = await login(session, server, user.username, user.password)
        assert_challenge(first, "NEW_PASSWORD_REQUIRED")
        assert first.body["fields"] == ["new_password", "name"]
        assert "8 characters" in first.body["password_rules"]
        missing = await answer(session, server, new_password="Str0ng-pw-2")
        assert (missing.status, missing.body["error"]) == (400, "bad_request")
        weak = await answer(session, server, new_password="weak", attributes={"name": "U"})
        assert (weak.status, weak.body["error"]) == (400, "invalid_password")
        assert "policy" in weak.body["detail"]
        done = await answer(session, server, new_password="Str0ng-pw-2", attributes={"name": "U"})
        assert done.status == 200, done.body
        assert done.body["user"]["sub"] == user.sub
        assert_auth_cookie(done, user.token_ttl)
        assert done.cookies[COOKIE][0] == "" and done.cookies[COOKIE][1]["max-age"] == "0"
        (sent, *_) = [c for c in pool.calls_to("RespondToAuthChallenge")
                      if c.body["ChallengeResponses"].get("NEW_PASSWORD") == "Str0ng-pw-2"
                      and "userAttributes.name" in c.body["ChallengeResponses"]]
        assert sent.body["ChallengeName"] == "NEW_PASSWORD_REQUIRED"
        assert sent.body["ClientId"] == CLIENT_ID and sent.body["Session"]
        assert sent.body["ChallengeResponses"] == {
            "USERNAME": user.username, "NEW_PASSWORD": "Str0ng-pw-2", "userAttributes.name": "U",
            "SECRET_HASH": expected_secret_hash(SECRET, user.username, CLIENT_ID)}
        await assert_ws_works(session, server, user.sub)
        again = await login(session, server, user.username, "Str0ng-pw-2")
        assert again.status == 200, "the new password signs in without a challenge"
    assert_no_session_leak(pool, [first, missing, weak, done], server.log())


async def test_totp_wrong_code_then_right_code(server: ServerProcess, pool: FakeCognito) -> None:
    """SOFTWARE_TOKEN_MFA: a wrong code is 401 invalid_code (retry allowed); the right one signs in."""
    secret = base64.b32encode(uuid.uuid4().bytes[:10]).decode()
    user = new_user(pool, "SOFTWARE_TOKEN_MFA", totp_secret=secret)
    async with secure_session(server) as session:
        first = await login(session, server, user.username, user.password)
        assert first.status == 409 and first.body["fields"] == ["code"]
        wrong = "000000" if totp(secret) != "000000" else "111111"
        bad = await answer(session, server, code=wrong)
        assert (bad.status, bad.body["error"]) == (401, "invalid_code")
        good = await answer(session, server, code=totp(secret))
        assert good.status == 200, good.body
        sent = pool.calls_to("RespondToAuthChallenge")[-1]
        assert sent.body["ChallengeResponses"]["SOFTWARE_TOKEN_MFA_CODE"] == totp(secret)
        await assert_ws_works(session, server, user.sub)
    assert_no_session_leak(pool, [first, bad, good], server.log())


async def test_sms_code_signs_in(server: ServerProcess, pool: FakeCognito) -> None:
    """SMS_MFA: the 409 names the masked destination; the code that was sent signs in."""
    user = new_user(pool, "SMS_MFA")
    async with secure_session(server) as session:
        first = await login(session, server, user.username, user.password)
        assert first.status == 409 and first.body["destination"] == "+*******0100"
        good = await answer(session, server, code=pool.sms_codes[user.username])
        assert good.status == 200, good.body


async def test_mfa_setup_end_to_end(server: ServerProcess, pool: FakeCognito) -> None:
    """MFA_SETUP: the 409 carries the secret, its otpauth URI and an SVG QR code; a wrong
    code is 401; the right one signs in, and the next sign-in asks for the TOTP code."""
    user = new_user(pool, "MFA_SETUP")
    async with secure_session(server) as session:
        first = await login(session, server, user.username, user.password)
        assert first.status == 409, first.body
        secret = first.body["secret"]
        assert first.body["otpauth"] == (
            f"otpauth://totp/chatserver:{user.username}?secret={secret}&issuer=chatserver")
        assert first.body["qr"].startswith("data:image/svg+xml")
        associate = pool.calls_to("AssociateSoftwareToken")[-1]
        assert set(associate.body) == {"Session"}
        bad = await answer(session, server, code="12345")
        assert (bad.status, bad.body["error"]) == (400, "bad_request")
        wrong = "000000" if totp(secret) != "000000" else "111111"
        bad = await answer(session, server, code=wrong)
        assert (bad.status, bad.body["error"]) == (401, "invalid_code")
        good = await answer(session, server, code=totp(secret))
        assert good.status == 200, good.body
        verify = pool.calls_to("VerifySoftwareToken")[-1]
        assert verify.body["UserCode"] == totp(secret) and verify.body["Session"]
        respond = pool.calls_to("RespondToAuthChallenge")[-1]
        assert respond.body["ChallengeName"] == "MFA_SETUP"
        assert respond.body["ChallengeResponses"] == {
            "USERNAME": user.username,
            "SECRET_HASH": expected_secret_hash(SECRET, user.username, CLIENT_ID)}
        await assert_ws_works(session, server, user.sub)
        later = await login(session, server, user.username, user.password)
        assert later.status == 409 and later.body["challenge"] == "SOFTWARE_TOKEN_MFA"
    assert_no_session_leak(pool, [first, bad, good, later], server.log())


async def test_replayed_or_expired_challenge_is_401(server: ServerProcess,
                                                    pool: FakeCognito) -> None:
    """No cookie, a spent id (replay) and a session Cognito let expire: 401 challenge_expired."""
    user = new_user(pool, "SMS_MFA")
    async with secure_session(server) as session:
        none = await answer(session, server, code="123456")
        assert (none.status, none.body["error"]) == (401, "challenge_expired")
        first = await login(session, server, user.username, user.password)
        spent = first.cookies[COOKIE][0]
        wrong = await answer(session, server, code="999999" if pool.sms_codes[user.username] != "999999" else "888888")
        assert wrong.status == 401 and wrong.body["error"] == "invalid_code"
        assert wrong.cookies[COOKIE][0] not in ("", spent), "a retry gets a new id"
    async with cookie_session() as thief:
        thief.cookie_jar.update_cookies({COOKIE: spent})
        replay = await call(thief, server, "POST", "/auth/challenge", json_body={"code": "123456"})
        assert (replay.status, replay.body["error"]) == (401, "challenge_expired")
    async with secure_session(server) as late:
        assert (await login(late, server, user.username, user.password)).status == 409
        pool.expire_sessions()
        expired = await answer(late, server, code=pool.sms_codes[user.username])
        assert (expired.status, expired.body["error"]) == (401, "challenge_expired")
        assert expired.cookies[COOKIE][0] == ""


async def test_challenge_crosses_workers_through_redis(
        make_server: Callable[..., ServerProcess], redis_url: str, pool: FakeCognito) -> None:
    """Two workers on Redis: whichever worker answers /auth/challenge finds the pending
    challenge (a wrong code, a retry, then the right code)."""
    server = make_server(workers=2, redis_url=redis_url,
                         env=pool_env(pool, CHAT_LOGIN_RATE="100000"))
    for _ in range(3):
        user = new_user(pool, "SMS_MFA")
        async with cookie_session() as session:
            assert (await login(session, server, user.username, user.password)).status == 409
            right = pool.sms_codes[user.username]
            bad = await answer(session, server, code="000000" if right != "000000" else "111111")
            assert bad.body["error"] == "invalid_code"
            good = await answer(session, server, code=right)
            assert good.status == 200, good.body


async def test_logout_everywhere_calls_global_sign_out(server: ServerProcess,
                                                       pool: FakeCognito) -> None:
    """logout?everywhere=1 calls GlobalSignOut with the access token: the user's other
    refresh tokens stop working, and the other session's access token is refused."""
    user = PoolUser("g-" + uuid.uuid4().hex[:10], "Global-pw-1")
    pool.add(user)
    async with secure_session(server) as first, secure_session(server) as second:
        assert (await login(first, server, user.username, user.password)).status == 200
        other = await login(second, server, user.username, user.password)
        assert other.status == 200
        out = await call(first, server, "POST", "/auth/logout?everywhere=1")
        assert out.status == 200
        assert pool.global_sign_outs == [user.username]
        (sent,) = pool.calls_to("GlobalSignOut")
        assert set(sent.body) == {"AccessToken"}
        assert (await call(second, server, "GET", "/auth/me")).body["detail"] == "revoked"
        refreshed = await call(second, server, "POST", "/auth/refresh")
        assert refreshed.status == 401, "Cognito revoked the other session's refresh token"


async def test_challenge_answers_are_rate_limited_like_login(
        make_server: Callable[..., ServerProcess], pool: FakeCognito) -> None:
    """Answers count against the login's per-address limit: past it, 429 with Retry-After,
    and the challenge is kept (a new id) rather than spent."""
    server = make_server(env=pool_env(pool, CHAT_LOGIN_RATE="3"))
    user = new_user(pool, "SMS_MFA")
    async with cookie_session() as session:
        assert (await login(session, server, user.username, user.password)).status == 409
        right = pool.sms_codes[user.username]
        wrong = "000000" if right != "000000" else "111111"
        for _ in range(2):
            assert (await answer(session, server, code=wrong)).body["error"] == "invalid_code"
        limited = await answer(session, server, code=right)
        assert (limited.status, limited.body["error"]) == (429, "rate_limited")
        assert limited.cookies[PLAIN_COOKIE][0], "the challenge is kept for after the wait"
    calls = [c for c in pool.calls_to("RespondToAuthChallenge")
             if c.body["ChallengeResponses"]["USERNAME"] == user.username]
    assert len(calls) == 2, "a limited answer costs no Cognito call"
