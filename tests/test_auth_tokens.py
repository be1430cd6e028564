"""Every kind of bad token gets 1008 on /ws before any frame; the JWKS endpoint is not
stormed by forged kids. Real chatserver process, a local JWKS server standing in for Cognito.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.cognito_keys import JwksServer, SigningKey, cognito_env
from tests.support import (
    ServerProcess,
    close_frame,
    cookie_session,
    of_type,
    open_ws,
    receive_until,
)

KEY = SigningKey()
OTHER = SigningKey()  # same kid, a key the pool never published


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    with JwksServer([KEY.jwk()]).running() as server:
        yield server


@pytest.fixture
def server(jwks: JwksServer, make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server(env=cognito_env(jwks.url))


def bad_tokens() -> dict[str, str | None]:
    now = int(time.time())
    good = KEY.claims()
    no_exp = {k: v for k, v in good.items() if k != "exp"}
    public_pem = KEY.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"kid": KEY.kid}
    return {
        "none": None,
        "garbage": "not.a.jwt",
        "alg_none": jwt.encode(good, None, algorithm="none", headers=header),
        "hs256_with_public_key": _hs256(good, public_pem),
        "expired": KEY.mint(dict(good, iat=now - 7200, exp=now - 3600)),
        "nbf_future": KEY.mint(dict(good, nbf=now + 3600)),
        "wrong_iss": KEY.mint(dict(good, iss=good["iss"] + "x")),
        "wrong_client_id": KEY.mint(dict(good, client_id="otherclient")),
        "wrong_aud_id_token": KEY.mint(KEY.claims(token_use="id", aud="otherclient")),
        "wrong_token_use": KEY.mint(dict(good, token_use="refresh")),
        "unknown_kid": KEY.mint(good, kid="unknown-kid"),
        "signed_by_other_key": OTHER.mint(good),
        "no_exp": KEY.mint(no_exp),
    }


def _hs256(claims: dict[str, object], secret: bytes) -> str:
    """The classic key-confusion forgery: HS256 keyed with the RSA public key."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KEY.kid}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


async def test_good_token_is_welcomed(server: ServerProcess) -> None:
    """A valid Cognito access token gets a welcome naming its sub."""
    async with cookie_session(KEY.mint(KEY.claims(sub="alice"))) as session:
        ws = await open_ws(session, server)
        welcome = await receive_until(ws, of_type("welcome"))
        assert welcome["user"]["sub"] == "alice"
        await ws.close()


async def test_id_token_refused_when_access_expected(server: ServerProcess) -> None:
    """With CHAT_TOKEN_USE=access (the default), a correct ID token is refused."""
    async with cookie_session(KEY.mint(KEY.claims(token_use="id"))) as session:
        ws = await open_ws(session, server)
        code, reason = await close_frame(ws)
        assert code == 1008 and "token_use" in reason


@pytest.mark.parametrize("kind", list(bad_tokens()))
async def test_bad_token_closed_1008_without_frames(server: ServerProcess, kind: str) -> None:
    """Each forged, stale or misdirected token: closed 1008 with a reason, before any frame,
    while a signed-in client's broadcast goes on."""
    token = bad_tokens()[kind]
    async with cookie_session(KEY.mint(KEY.claims(sub="watcher"))) as good, \
            cookie_session(token) as bad:
        watcher = await open_ws(good, server)
        await receive_until(watcher, of_type("joined"))
        ws = await open_ws(bad, server)
        await watcher.send_json({"message": f"after {kind}"})
        await receive_until(watcher, of_type("message", message=f"after {kind}"))
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type.name == "CLOSE", f"{kind}: got a frame {msg.type} {msg.data!r}"
        assert ws.close_code == 1008
        assert msg.extra, "the close reason says what is wrong"
        await watcher.close()


async def test_forged_kids_do_not_storm_jwks(server: ServerProcess, jwks: JwksServer) -> None:
    """However many unknown kids arrive, the JWKS is fetched at most once per penalty window."""
    async with cookie_session(KEY.mint()) as session:
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("welcome"))
        await ws.close()
    before = jwks.hits

    async def forged() -> int | None:
        async with cookie_session(KEY.mint(kid=uuid.uuid4().hex)) as session:
            ws = await open_ws(session, server)
            code, _ = await close_frame(ws)
            return code

    codes = await asyncio.gather(*(forged() for _ in range(30)))
    assert codes == [1008] * 30
    assert jwks.hits - before <= 1, f"{jwks.hits - before} JWKS fetches for 30 forged kids"

