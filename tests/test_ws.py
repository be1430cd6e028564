"""The /ws contract on one real worker: welcome, message shape, Origin, bad frames, limits."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest

from tests.support import ServerProcess, close_frame, of_type, open_ws, receive_until, sign_in


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
