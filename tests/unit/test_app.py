"""The app through pytest-aiohttp's test client, in process: create_app(settings) with
the memory broker and the dev sign-in, every HTTP route and the /ws upgrade rules."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from chatserver.admission import LoopLag
from chatserver.app import ENDPOINT, create_app
from chatserver.auth.cookies import cookie_names
from chatserver.broker.memory import MemoryBroker
from chatserver.config import load_settings
from tests.cognito_keys import SigningKey

ORIGIN = "http://127.0.0.1:3020"  # the default allowlist (PORT 3020)
API_KEY = "announcer-key-0123456789"
KEY = SigningKey()
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(**env: str) -> Client:
        values = {"CHAT_COOKIE_SECURE": "0", "CHAT_API_KEYS": f"announcer:{API_KEY}", **env}
        app = await create_app(load_settings(values, env_file=None))
        client: Client = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def login(client: Client, username: str = "alice") -> aiohttp.ClientResponse:
    return await client.post("/auth/login", json={"username": username, "password": ""},
                             headers={"Origin": ORIGIN})


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next frame of this type, skipping others (presence...); bounded by the test."""
    while True:
        frame: dict[str, Any] = await ws.receive_json()
        if frame["type"] == kind:
            return frame


async def test_health_and_readiness(client: Client) -> None:
    """/healthz names the instance; /readyz is 200 until the worker drains, then 503."""
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "alive"
    assert (await client.get("/readyz")).status == 200
    client.app[ENDPOINT].draining.set()
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["detail"] == "draining"


async def test_login_sets_http_only_strict_cookies(client: Client) -> None:
    """A dev sign-in answers the user and sets both cookies HttpOnly, SameSite=Strict."""
    response = await login(client)
    assert response.status == 200
    assert (await response.json())["user"]["username"] == "alice"
    auth, refresh = response.cookies["authToken"], response.cookies["refreshToken"]
    assert auth["httponly"] and auth["samesite"] == "Strict" and auth["path"] == "/"
    assert refresh["httponly"] and refresh["path"] == "/auth"
    me = await client.get("/auth/me")
    assert me.status == 200 and (await me.json())["user"]["username"] == "alice"


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, {"username": "alice"}, 403),  # no Origin
        ({"Origin": "http://evil.example"}, {"username": "alice"}, 403),
        ({"Origin": ORIGIN}, {"username": ""}, 400),
        ({"Origin": ORIGIN}, {"username": "bad name!"}, 400),
        ({"Origin": ORIGIN}, {"username": "a" * 300}, 400),
        ({"Origin": ORIGIN}, ["alice"], 400),
    ],
)
async def test_login_refuses_bad_requests(client: Client, headers: dict[str, str],
                                          body: Any, status: int) -> None:
    """Cross-origin or malformed sign-ins answer 4xx with a JSON error, and no cookie."""
    response = await client.post("/auth/login", json=body, headers=headers)
    assert response.status == status
    assert "error" in await response.json() and "authToken" not in response.cookies


async def test_dev_sign_in_may_name_groups_that_rules_and_refresh_honour(
        make_client: MakeClient) -> None:
    """For local work with group rules, the dev sign-in takes "groups": they land in
    cognito:groups, open a group: room, survive a refresh; bad groups answer 400."""
    client = await make_client(CHAT_ROOM_RULES="staff-* read=group:staff write=group:staff")
    signed = await client.post("/auth/login", headers={"Origin": ORIGIN},
                               json={"username": "alice", "groups": ["staff", "ops"]})
    assert (await signed.json())["user"]["groups"] == ["staff", "ops"]
    refreshed = await client.post("/auth/refresh", json={}, headers={"Origin": ORIGIN})
    assert (await refreshed.json())["user"]["groups"] == ["staff", "ops"]
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    assert (await next_of(ws, "joined"))["room"] == "lobby"
    await ws.send_json({"type": "join", "room": "staff-room", "ref": "j"})
    assert (await next_of(ws, "joined"))["room"] == "staff-room"
    await ws.close()
    await login(client, "bob")
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    await ws.send_json({"type": "join", "room": "staff-room", "ref": "j"})
    refused = await next_of(ws, "error")
    assert (refused["code"], refused["room"]) == ("forbidden", "staff-room")
    await ws.close()
    for groups in ("staff", ["bad group"], ["g"] * 17, [1]):
        bad = await client.post("/auth/login", headers={"Origin": ORIGIN},
                                json={"username": "carol", "groups": groups})
        assert bad.status == 400 and "groups" in (await bad.json())["detail"]


async def test_login_needs_json_content_type(client: Client) -> None:
    """A form POST (what a cross-site form could send) is refused before any route."""
    response = await client.post("/auth/login", data={"username": "alice"},
                                 headers={"Origin": ORIGIN})
    assert response.status == 403


async def test_login_rate_limit_answers_429_with_retry_after(make_client: MakeClient) -> None:
    """Past CHAT_LOGIN_RATE attempts a minute, sign-in answers 429 and Retry-After."""
    client = await make_client(CHAT_LOGIN_RATE="3")
    statuses = [(await login(client, f"user{n}")).status for n in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = await login(client, "late")
    assert 0 < int(limited.headers["Retry-After"]) <= 60


async def test_me_without_a_cookie_is_401(client: Client) -> None:
    """/auth/me with no token answers 401 unauthenticated."""
    response = await client.get("/auth/me")
    assert response.status == 401 and (await response.json())["error"] == "unauthenticated"


async def test_ws_welcomes_a_signed_in_user(client: Client) -> None:
    """With the cookie and an allowed Origin: welcome, then joined lobby."""
    await login(client)
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    welcome, joined = await ws.receive_json(), await ws.receive_json()
    assert welcome["type"] == "welcome" and welcome["user"]["username"] == "alice"
    assert joined["type"] == "joined" and joined["room"] == "lobby"
    await ws.close()


async def test_ws_refuses_a_foreign_origin_before_the_upgrade(client: Client) -> None:
    """A cross-origin upgrade is answered 403 and never becomes a WebSocket."""
    await login(client)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403


async def test_ws_without_token_is_closed_1008(client: Client) -> None:
    """No cookie: the upgrade completes and closes at once with 1008 missing token."""
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert (ws.close_code, msg.extra) == (1008, "missing token")


async def test_logout_closes_the_users_sockets_1000(client: Client) -> None:
    """Sign-out clears both cookies and closes the user's open socket with 1000."""
    await login(client)
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    await ws.receive_json()
    await ws.receive_json()
    await next_of(ws, "presence")
    response = await client.post("/auth/logout", json={}, headers={"Origin": ORIGIN})
    assert response.status == 200 and response.cookies["authToken"].value == ""
    msg = await ws.receive()
    assert (msg.type, ws.close_code, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1000, "signed out")


async def test_publish_api_needs_a_key_and_reaches_the_room(client: Client) -> None:
    """The publish API refuses a missing or wrong key and bad input; a good call is
    stored and delivered to the room's members under the service's name."""
    await login(client)
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    await ws.receive_json()
    await ws.receive_json()
    url = "/api/rooms/lobby/messages"
    assert (await client.post(url, json={"message": "x"})).status == 401
    wrong = {"Authorization": "Bearer not-the-key-000000"}
    assert (await client.post(url, json={"message": "x"}, headers=wrong)).status == 401
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert (await client.post("/api/rooms/bad%20room/messages", json={"message": "x"},
                              headers=key)).status == 400
    assert (await client.post(url, data=b"{", headers=key)).status == 400
    assert (await client.post(url, json={"message": ""}, headers=key)).status == 400
    stored = await client.post(url, json={"message": "deploy at 5"}, headers=key)
    assert stored.status == 200
    message_id = (await stored.json())["id"]
    frame = await next_of(ws, "message")
    assert (frame["id"], frame["user"], frame["message"]) == (message_id, "announcer",
                                                              "deploy at 5")
    await ws.close()


async def raw_request(client: Client, request: bytes) -> bytes:
    """Send bytes no HTTP client library would, and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read(65536)
    writer.close()
    return answer


async def test_publish_api_refuses_a_non_utf8_key_with_401(client: Client) -> None:
    """An Authorization header with bytes that are not UTF-8 is a 401, not a 500."""
    answer = await raw_request(
        client, b"POST /api/rooms/lobby/messages HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]


async def test_crafted_cookies_are_refused_not_crashed(client: Client) -> None:
    """A deeply nested JSON header or a non-UTF-8 byte in the cookie: /auth/me 401 and
    /auth/logout clears the cookies (no 500 before authentication)."""
    nested = base64.urlsafe_b64encode(b"[" * 2000).decode().rstrip("=") + ".e30.x"
    for cookie in (nested.encode(), b"\xff" + nested.encode()):
        me = await raw_request(client, b"GET /auth/me HTTP/1.1\r\nHost: x\r\nCookie: authToken="
                               + cookie + b"\r\nConnection: close\r\n\r\n")
        assert me.startswith(b"HTTP/1.1 401 "), me[:80]
        out = await raw_request(
            client, b"POST /auth/logout HTTP/1.1\r\nHost: x\r\nOrigin: " + ORIGIN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nCookie: authToken="
            + cookie + b"\r\nConnection: close\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 200 ") and b'authToken=""; ' in out, out[:300]


async def test_pages_carry_security_headers(client: Client) -> None:
    """The page is served with CSP, nosniff and a Server header that names no version."""
    response = await client.get("/")
    assert response.status == 200 and "<html" in (await response.text()).lower()
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Server"] == "chatserver"


async def test_unreachable_jwks_is_not_ready_and_closes_1011(make_client: MakeClient) -> None:
    """With Cognito's JWKS unreachable, /readyz says so (503) and an upgrade with a token
    closes 1011 (retry), not 1008 (which the browser treats as signed out)."""
    client = await make_client(
        AWS_COGNITO_USER_POOL_ID="us-east-1_TestPool", AWS_COGNITO_CLIENT_ID="testclient123",
        AWS_COGNITO_JWKS_URL="http://127.0.0.1:9/jwks.json")
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["detail"] == "auth keys unavailable"
    token = KEY.mint()
    ws = await client.ws_connect("/ws", headers={"Origin": ORIGIN,
                                                "Cookie": f"authToken={token}"})
    msg = await ws.receive()
    assert (msg.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 1011)


async def test_a_draining_worker_answers_upgrades_503_before_upgrading(client: Client) -> None:
    """While draining, /ws answers 503 with Retry-After (a proxy retries another replica)."""
    await login(client)
    client.app[ENDPOINT].draining.set()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    assert refused.value.status == 503
    assert refused.value.headers is not None and refused.value.headers["Retry-After"] == "1"


async def test_metrics_answer_a_direct_scraper_but_never_through_a_proxy(
    make_client: MakeClient,
) -> None:
    """/metrics serves a loopback or private scraper directly, refuses anything that came
    through a proxy (X-Forwarded-For or Forwarded); with CHAT_METRICS_TOKEN, its bearer."""
    client = await make_client()
    assert (await client.get("/metrics")).status == 200
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
        assert (await client.get("/metrics", headers=header)).status == 403
    guarded = await make_client(CHAT_METRICS_TOKEN="scrape-token-0123456789")
    assert (await guarded.get("/metrics")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await guarded.get("/metrics", headers=wrong)).status == 401
    right = {"Authorization": "Bearer scrape-token-0123456789"}
    scraped = await guarded.get("/metrics", headers=right)
    assert scraped.status == 200 and "chatserver_connections" in await scraped.text()


TEAM_KEY = "teams-key-0123456789abc"


async def test_membership_api_grants_lists_and_revokes(make_client: MakeClient) -> None:
    """PUT grants (role write by default), GET lists by page, GET by user, DELETE revokes."""
    client = await make_client(CHAT_API_KEYS=f"ops:{API_KEY}",
                               CHAT_ROOM_RULES="team-* read=members write=members")
    key = {"Authorization": f"Bearer {API_KEY}"}
    for sub in ("u3", "u1", "u2"):
        put = await client.put(f"/api/rooms/team-a/members/{sub}", headers=key)
        assert put.status == 200 and (await put.json())["role"] == "write"
    read = await client.put("/api/rooms/team-b/members/u1", json={"role": "read"}, headers=key)
    assert (await read.json())["role"] == "read"
    first = await (await client.get("/api/rooms/team-a/members?limit=2", headers=key)).json()
    assert first == {"members": [{"sub": "u1", "role": "write"}, {"sub": "u2", "role": "write"}],
                     "next": "u2"}
    rest = await (await client.get("/api/rooms/team-a/members?after=u2", headers=key)).json()
    assert rest == {"members": [{"sub": "u3", "role": "write"}], "next": None}
    rooms = await (await client.get("/api/users/u1/rooms", headers=key)).json()
    assert rooms == {"rooms": [{"room": "team-a", "role": "write"},
                               {"room": "team-b", "role": "read"}]}
    gone = await client.delete("/api/rooms/team-a/members/u1", headers=key)
    assert (await gone.json())["revoked"] is True
    again = await client.delete("/api/rooms/team-a/members/u1", headers=key)
    assert (await again.json())["revoked"] is False


async def test_membership_api_refuses_bad_keys_and_input(make_client: MakeClient) -> None:
    """No key or a wrong key: 401; a key scoped to other rooms: 403; a bad room, sub,
    role or an oversized body: 400 with a JSON error, and nothing stored."""
    client = await make_client(CHAT_API_KEYS=f"ops:{API_KEY},teams:{TEAM_KEY}:team-*",
                               CHAT_ROOM_RULES="team-* read=members; staff-* read=members")
    url = "/api/rooms/staff-x/members/u1"
    assert (await client.put(url)).status == 401
    assert (await client.put(url, headers={"Authorization": "Bearer wrong"})).status == 401
    scoped = {"Authorization": f"Bearer {TEAM_KEY}"}
    assert (await client.put(url, headers=scoped)).status == 403
    assert (await client.get("/api/users/u1/rooms", headers=scoped)).status == 403
    key = {"Authorization": f"Bearer {API_KEY}"}
    for bad_url, body in [("/api/rooms/bad%20room/members/u1", None),
                          ("/api/rooms/staff-x/members/u%0A1", None),
                          (url, b'{"role": "owner"}'), (url, b"{"), (url, b"x" * 2000)]:
        answer = await client.put(bad_url, data=body, headers=key)
        assert answer.status == 400 and "error" in await answer.json(), bad_url
    listed = await (await client.get("/api/users/u1/rooms", headers=key)).json()
    assert listed == {"rooms": []}
    assert (await client.put("/api/rooms/team-a/members/u1", headers=scoped)).status == 200


async def test_publish_api_key_scope_and_closed_rooms(make_client: MakeClient) -> None:
    """A scoped key publishes only in its rooms; no key publishes where no rule reaches."""
    client = await make_client(CHAT_API_KEYS=f"ops:{API_KEY},teams:{TEAM_KEY}:team-*",
                               CHAT_ROOM_RULES="team-* read=members; news read=open")
    scoped = {"Authorization": f"Bearer {TEAM_KEY}"}
    body = {"message": "hello"}
    assert (await client.post("/api/rooms/team-a/messages", json=body, headers=scoped)).status == 200
    assert (await client.post("/api/rooms/news/messages", json=body, headers=scoped)).status == 403
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert (await client.post("/api/rooms/news/messages", json=body, headers=key)).status == 200
    assert (await client.post("/api/rooms/other/messages", json=body, headers=key)).status == 403


async def test_secure_cookies_are_host_prefixed_and_a_planted_one_cannot_sign_in(
        make_client: MakeClient) -> None:
    """Hardening (low): with Secure cookies on a real domain the names are __Host- and
    __Secure- (no sibling subdomain can set those); the original design's authToken, which
    a sibling could plant, is not read there, and a cookie sent twice is refused."""
    site = "https://chat.example.com"
    client = await make_client(CHAT_COOKIE_SECURE="1", CHAT_ALLOWED_ORIGINS=site, CHAT_DEV_AUTH="1")
    signed = await client.post("/auth/login", json={"username": "alice"},
                               headers={"Origin": site})
    assert signed.status == 200
    assert {"__Host-authToken", "__Secure-refreshToken"} <= set(signed.cookies)
    assert "authToken" not in signed.cookies
    token = signed.cookies["__Host-authToken"].value
    client.session.cookie_jar.clear()

    async def me(cookie: str) -> tuple[int, str]:
        answer = await client.get("/auth/me", headers={"Cookie": cookie})
        return answer.status, (await answer.json()).get("detail", "")

    assert (await me(f"__Host-authToken={token}"))[0] == 200
    assert (await me(f"authToken={token}"))[0] == 401  # a sibling host's cookie: ignored
    assert (await me(f"authToken=planted; __Host-authToken={token}"))[0] == 200
    assert await me(f"__Host-authToken={token}; __Host-authToken={token}") == (
        401, "duplicate_cookie")
    with pytest.raises(aiohttp.WSServerHandshakeError):  # a foreign origin, as a check
        await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    ws = await client.ws_connect("/ws", headers={
        "Origin": site, "Cookie": f"__Host-authToken={token}; __Host-authToken=x"})
    msg = await ws.receive()
    assert (ws.close_code, msg.extra) == (1008, "invalid token: duplicate_cookie")


@pytest.mark.parametrize(("env", "legacy"), [
    ({"CHAT_ALLOWED_ORIGINS": "http://127.0.0.1:3020"}, True),  # auto: an IP has no siblings
    ({"CHAT_ALLOWED_ORIGINS": "https://chat.example.com", "CHAT_LEGACY_COOKIES": "1",
      "CHAT_DEV_AUTH": "1"}, True),
    ({"CHAT_ALLOWED_ORIGINS": "http://127.0.0.1:3020", "CHAT_LEGACY_COOKIES": "0"}, False),
])
async def test_the_original_cookie_name_is_read_only_where_it_is_safe_or_asked_for(
        make_client: MakeClient, env: dict[str, str], legacy: bool) -> None:
    """CHAT_LEGACY_COOKIES=auto reads authToken when every origin is an IP or localhost
    (a benchmark, a laptop); 1 always; 0 never. Both names at once are refused."""
    client = await make_client(CHAT_COOKIE_SECURE="1", **env)
    origin = env["CHAT_ALLOWED_ORIGINS"]
    signed = await client.post("/auth/login", json={"username": "bob"}, headers={"Origin": origin})
    token = signed.cookies["__Host-authToken"].value
    client.session.cookie_jar.clear()
    plain = await client.get("/auth/me", headers={"Cookie": f"authToken={token}"})
    assert plain.status == (200 if legacy else 401)
    both = await client.get("/auth/me", headers={
        "Cookie": f"authToken={token}; __Host-authToken={token}"})
    assert both.status == (401 if legacy else 200)


async def test_the_dev_sign_in_refuses_what_came_through_a_proxy(make_client: MakeClient) -> None:
    """Hardening (low): a proxy on the same host connects from 127.0.0.1 but adds a
    forwarding header; without CHAT_DEV_AUTH=1 such a sign-in is 403, a direct one 200."""
    client = await make_client()
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host"):
        relayed = await client.post("/auth/login", json={"username": "alice"},
                                    headers={"Origin": ORIGIN, header: "203.0.113.7"})
        assert relayed.status == 403 and "CHAT_DEV_AUTH" in (await relayed.json())["detail"]
        assert "authToken" not in relayed.cookies
    assert (await login(client)).status == 200
    allowed = await make_client(CHAT_DEV_AUTH="1")
    through = await allowed.post("/auth/login", json={"username": "alice"},
                                 headers={"Origin": ORIGIN, "X-Forwarded-For": "203.0.113.7"})
    assert through.status == 200


class GatedBroker(MemoryBroker):
    """A memory broker whose user subscription waits for the test: a handshake stuck
    after its upgrade, as when Redis is slow."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def subscribe_user(self, sub: str) -> None:
        await self.gate.wait()
        await super().subscribe_user(sub)


async def test_handshakes_past_the_limit_are_shed_at_once_with_retry_after(
        aiohttp_client: Any) -> None:
    """Issue 14: with CHAT_MAX_HANDSHAKES in flight, one more upgrade is answered 503 and
    Retry-After before any token check; once the stuck ones are greeted, upgrades pass."""
    broker = GatedBroker()
    settings = load_settings({"CHAT_COOKIE_SECURE": "0", "CHAT_MAX_HANDSHAKES": "2"},
                             env_file=None)
    client: Client = await aiohttp_client(await create_app(settings, broker=broker))
    stuck = []
    for name in ("alice", "bob"):  # a user's first socket subscribes the user: stuck
        await login(client, name)
        stuck.append(await client.ws_connect("/ws", headers={"Origin": ORIGIN}))
    with pytest.raises(aiohttp.WSServerHandshakeError) as shed:
        await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    assert shed.value.status == 503 and shed.value.headers["Retry-After"] == "1"
    metrics = await (await client.get("/metrics")).text()
    assert "chatserver_handshakes_shed_total 1.0" in metrics
    broker.gate.set()
    for ws in stuck:
        assert (await ws.receive_json())["type"] == "welcome"
    more = [await client.ws_connect("/ws", headers={"Origin": ORIGIN}) for _ in range(3)]
    for ws in [*stuck, *more]:
        await ws.close()


async def test_a_client_gone_before_its_101_is_counted_not_a_traceback(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """A storm's client that gave up (its own timeout) before the 101 was written is an
    `abandoned` count in the connections line, not an ERROR with a traceback."""
    await login(client)
    cookie = "; ".join(f"{c.key}={c.value}" for c in client.session.cookie_jar)
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write((f"GET /ws HTTP/1.1\r\nHost: {client.host}\r\nOrigin: {ORIGIN}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: {cookie}\r\n\r\n"
                  ).encode())
    writer.close()  # gone before the server can answer
    tally = client.app[ENDPOINT].tally
    async with asyncio.timeout(5):
        while not tally.abandoned:  # noqa: ASYNC110 - a count of the app's: no event
            await asyncio.sleep(0.005)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def tick(lag: LoopLag) -> None:
    """Until the lag timer has taken its next sample."""
    before = lag.value
    async with asyncio.timeout(5):
        while lag.value == before:  # noqa: ASYNC110 - the app's own timer: no event to await
            await asyncio.sleep(0.005)


async def test_a_worker_whose_loop_runs_late_sheds_upgrades_until_it_caught_up(
        make_client: MakeClient) -> None:
    """Issue 14: past CHAT_SHED_LAG of event-loop lateness a worker answers new upgrades
    503 + Retry-After (it serves the sockets it holds first); once the loop keeps time
    again, upgrades pass."""
    client = await make_client(CHAT_SHED_LAG="0.1")
    await login(client)
    held = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    lag = client.app[ENDPOINT].admission.lag
    time.sleep(0.2)  # noqa: ASYNC251 - one long pass (a GC pause): nothing is shed
    await tick(lag)
    assert 0 < lag.value <= 0.1
    again = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    await again.close()

    async def saturate() -> None:  # a loop that stays saturated, as in a reconnect storm
        while True:
            time.sleep(0.2)  # noqa: ASYNC251
            await asyncio.sleep(0)

    saturating = asyncio.create_task(saturate())
    try:
        async with asyncio.timeout(10):
            while lag.value <= 0.1:
                await tick(lag)
        with pytest.raises(aiohttp.WSServerHandshakeError) as shed:
            await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    finally:
        saturating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await saturating
    assert shed.value.status == 503 and shed.value.headers["Retry-After"] == "1"
    async with asyncio.timeout(5):
        while lag.value > 0.1:  # the loop keeps time again: the average falls
            await tick(lag)
    again = await client.ws_connect("/ws", headers={"Origin": ORIGIN})
    assert (await again.receive_json())["type"] == "welcome"
    await again.close()
    await held.close()


async def test_the_heartbeat_sweep_keeps_answering_peers_and_drops_silent_ones(
        make_client: MakeClient) -> None:
    """One sweep a worker pings every socket each CHAT_HEARTBEAT: a peer that answers
    stays however long it is idle; one that never answers is cut by the next beat."""
    client = await make_client(CHAT_HEARTBEAT="0.2")
    await login(client)
    alive = await client.ws_connect("/ws", headers={"Origin": ORIGIN}, autoping=False)
    silent = await client.ws_connect("/ws", headers={"Origin": ORIGIN}, autoping=False)

    async def pings_until_closed(ws: aiohttp.ClientWebSocketResponse) -> int:
        pings = 0
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.PING:
                pings += 1
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                return pings

    async def answer_pings(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
        answered = 0
        while answered < count:
            msg = await ws.receive()
            assert msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.TEXT), msg
            if msg.type == aiohttp.WSMsgType.PING:
                await ws.pong(msg.data)
                answered += 1

    async with asyncio.timeout(10):
        # The silent one is pinged once and cut at the next beat; the other, answering,
        # is still pinged and open well after that.
        silent_pings, _ = await asyncio.gather(pings_until_closed(silent),
                                               answer_pings(alive, 5))
    assert silent_pings == 1 and not alive.closed
    await alive.close()


def test_cookie_names_carry_the_prefixes_exactly_when_secure() -> None:
    """Secure: __Host- for the token (Path=/), __Secure- for the /auth-scoped ones."""
    secure = cookie_names(load_settings(
        {"CHAT_ALLOWED_ORIGINS": "https://chat.example.com", "CHAT_DEV_AUTH": "1"},
        env_file=None))
    assert (secure.auth.name, secure.refresh.name, secure.challenge.name) == (
        "__Host-authToken", "__Secure-refreshToken", "__Secure-authChallenge")
    assert secure.auth.accepted == ("__Host-authToken",)  # a real domain: no legacy name
    assert secure.challenge.accepted == ("__Secure-authChallenge",)
    plain = cookie_names(load_settings({"CHAT_COOKIE_SECURE": "0"}, env_file=None))
    assert (plain.auth.name, plain.refresh.name, plain.challenge.name) == (
        "authToken", "refreshToken", "authChallenge")
