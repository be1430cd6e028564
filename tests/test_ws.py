"""The /ws contract on one real worker: welcome, message shape, Origin, bad frames, limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from chatserver.auth.dev import DevIssuer
from tests.support import (
    RedisServer,
    ServerProcess,
    close_frame,
    cookie_session,
    of_type,
    open_ws,
    receive_until,
    sign_in,
)


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server(env={"CHAT_RATE": "5", "CHAT_BURST": "5"})


async def test_welcome_then_broadcast_with_identity_from_token(server: ServerProcess) -> None:
    """Welcome comes first; a message reaches everyone, sender included, with the sender's sub."""
    alice, bob = await sign_in(server, "alice"), await sign_in(server, "bob")
    async with alice, bob:
        wa, wb = await open_ws(alice, server), await open_ws(bob, server)
        first = await wa.receive_json(timeout=10)
        assert first["type"] == "welcome" and first["rooms"] == ["lobby"]
        assert first["instance"].endswith(f":{server.pid}")
        await receive_until(wa, of_type("joined", room="lobby"))
        welcome_b = await receive_until(wb, of_type("welcome"))
        await receive_until(wb, of_type("joined"))
        await wa.send_json({"message": "hi", "user": "someone-else"})
        for ws in (wa, wb):
            got = await receive_until(ws, of_type("message"))
            assert got["message"] == "hi" and got["room"] == "lobby"
            assert got["user"] == first["user"]["sub"] != welcome_b["user"]["sub"]
            assert got["username"] == "alice"
            assert isinstance(got["ts"], int) and "-" in got["id"]


@pytest.mark.parametrize("origin", ["http://evil.example", None])
async def test_foreign_or_missing_origin_is_403(server: ServerProcess, origin: str | None) -> None:
    """An upgrade from another origin, or with no Origin at all, is refused before the upgrade."""
    session = await sign_in(server, "alice")
    async with session:
        headers = {"Origin": origin} if origin else {}
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(server.ws_url, headers=headers)
        assert caught.value.status == 403


async def test_bad_frames_get_error_frames_and_connection_stays(server: ServerProcess) -> None:
    """Malformed JSON, unknown type, missing and over-long text: error frames, then a message works."""
    session = await sign_in(server, "alice")
    async with session:
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("joined"))
        cases = [
            ("{not json", "bad_request"),
            ('{"type": "dance"}', "bad_request"),
            ('{"type": "publish", "room": "lobby"}', "bad_request"),
            ('{"message": "' + "x" * 4001 + '"}', "too_large"),
        ]
        for frame, code in cases:
            await ws.send_str(frame)
            error = await receive_until(ws, of_type("error"))
            assert error["code"] == code, frame[:40]
        # four bad frames and this one: within the burst of 5, so no rate_limited here
        await ws.send_json({"type": "publish", "room": "lobby", "message": "still here", "ref": "r1"})
        ack = await receive_until(ws, of_type("ack"))
        assert ack["ref"] == "r1"
        got = await receive_until(ws, of_type("message"))
        assert got["message"] == "still here" and got["id"] == ack["id"]


async def test_oversized_frame_closes_1009(server: ServerProcess) -> None:
    """A frame over the 64 KiB limit closes the socket with 1009."""
    session = await sign_in(server, "alice")
    async with session:
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("joined"))
        await ws.send_str('{"message": "' + "x" * (65 * 1024) + '"}')
        code, _ = await close_frame(ws)
        assert code == 1009


async def test_flood_is_rate_limited_then_closed_1008(server: ServerProcess) -> None:
    """Past the burst a client gets rate_limited errors; if the flood goes on, 1008."""
    session = await sign_in(server, "alice")
    async with session:
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("joined"))
        for i in range(40):
            await ws.send_json({"message": f"flood {i}"})
        await receive_until(ws, of_type("error", code="rate_limited"))
        code, reason = await close_frame(ws)
        assert code == 1008 and "rate" in reason


async def test_join_rules(server: ServerProcess) -> None:
    """Bad room names are refused; publishing to a room not joined is forbidden."""
    session = await sign_in(server, "alice")
    async with session:
        ws = await open_ws(session, server)
        await receive_until(ws, of_type("joined"))
        await ws.send_json({"type": "join", "room": "no spaces"})
        assert (await receive_until(ws, of_type("error")))["code"] == "bad_request"
        await ws.send_json({"type": "publish", "room": "elsewhere", "message": "x", "ref": "p"})
        error = await receive_until(ws, of_type("error"))
        assert error["code"] == "forbidden" and error["ref"] == "p"


async def test_a_connect_costs_one_shard_subscribe_and_one_batched_presence_call_at_most(
        make_server: Callable[..., ServerProcess], redis_server: RedisServer, redis_url: str,
        dev_key_file: Path, dev_issuer: DevIssuer) -> None:
    """Issue 14's structural guard: with the lobby open on the worker, a new user's connect
    sends Redis at most a SUBSCRIBE of their user shard (the one round trip before the
    welcome) and one presence script call (batched per loop pass, not awaited); a second
    socket of a connected user sends nothing at all."""
    server = make_server(redis_url=redis_url, env={"CHAT_DEV_KEY_FILE": str(dev_key_file)})
    first = cookie_session(dev_issuer.mint("warm-up"))
    async with first:
        ws = await open_ws(first, server)
        await receive_until(ws, of_type("joined", room="lobby"))
        await receive_until(ws, of_type("presence"))  # its own presence call is done
        redis_server.command("CONFIG", "RESETSTAT")
        sessions = [cookie_session(dev_issuer.mint(f"user-{n}")) for n in range(30)]
        sockets = []  # held: a dropped socket would close, and its user leave
        try:
            for session in sessions:
                sockets.append(await open_ws(session, server))
                await receive_until(sockets[-1], of_type("joined", room="lobby"))
            new_users = command_calls(redis_server)
            redis_server.command("CONFIG", "RESETSTAT")
            for session in sessions:  # second tabs
                sockets.append(await open_ws(session, server))
                await receive_until(sockets[-1], of_type("joined", room="lobby"))
            second_tabs = command_calls(redis_server)
        finally:
            for session in sessions:
                await session.close()
    top_level = {name: n for name, n in new_users.items() if name not in PRESENCE_JOIN_CALLS}
    assert top_level.keys() <= {"subscribe", "evalsha"}, new_users
    assert top_level.get("subscribe", 0) <= 30 and top_level.get("evalsha", 0) <= 30, new_users
    assert second_tabs == {}, second_tabs


# What the presence join script runs inside Redis (commandstats counts those too).
PRESENCE_JOIN_CALLS = {"zadd", "hincrby", "hlen", "expire", "publish"}


def command_calls(redis: RedisServer) -> dict[str, int]:
    """Commands Redis ran since CONFIG RESETSTAT, by name, without the test's own and the
    connections' keepalive pings."""
    text = redis.command("INFO", "commandstats").decode()
    calls = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_"):].partition(":")
            calls[name] = int(stats.split(",")[0].split("=")[1])
    return {k: v for k, v in calls.items() if k not in ("info", "config|resetstat", "ping")}
