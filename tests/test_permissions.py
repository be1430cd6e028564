"""Room permissions across real processes: revocation reaching another instance through
Redis, `group:` rooms against the real verifier path, and a bad rule at start-up."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatserver.auth.dev import dev_sub
from tests.cognito_keys import JwksServer, SigningKey, cognito_env
from tests.support import (
    ServerProcess,
    base_env,
    cookie_session,
    of_type,
    open_ws,
    receive_until,
    scaled,
    sign_in,
)

KEY = "ops-key-0123456789abcdef"
RULES = "team-* read=members write=members; staff-* read=group:staff write=group:staff"
ENV = {"CHAT_ROOM_RULES": RULES, "CHAT_API_KEYS": f"ops:{KEY}"}
AUTH = {"Authorization": f"Bearer {KEY}"}


async def frames_until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    """Every frame up to and including the first of `kind`."""
    seen: list[dict[str, Any]] = []

    def record(frame: dict[str, Any]) -> bool:
        seen.append(frame)
        return frame.get("type") == kind

    await receive_until(ws, record)
    return seen


async def test_revocation_reaches_another_instance_within_a_second(
    make_server: Callable[..., ServerProcess], redis_url: str,
    sessions: list[aiohttp.ClientSession],
) -> None:
    """bob, on instance B, is removed from team-a through instance A's API: left(revoked)
    within 1 s, no further message of the room, and a resume of it is refused."""
    a = make_server(redis_url=redis_url, env=ENV)
    b = make_server(redis_url=redis_url, env=ENV)
    bob_sub = dev_sub("bob")
    async with aiohttp.ClientSession() as api:
        for sub in (bob_sub, dev_sub("alice")):
            async with api.put(f"{a.url}/api/rooms/team-a/members/{sub}", headers=AUTH) as r:
                assert r.status == 200
        bob_session, alice_session = await sign_in(b, "bob"), await sign_in(a, "alice")
        sessions += [bob_session, alice_session]
        bob, alice = await open_ws(bob_session, b), await open_ws(alice_session, a)
        for ws in (bob, alice):
            await ws.send_json({"type": "join", "room": "team-a"})
        joined = await receive_until(bob, of_type("joined", room="team-a"))
        await receive_until(alice, of_type("joined", room="team-a"))
        await alice.send_json({"type": "publish", "room": "team-a", "message": "m1"})
        last = (await receive_until(bob, of_type("message", message="m1")))["id"]

        started = time.monotonic()
        async with api.delete(f"{a.url}/api/rooms/team-a/members/{bob_sub}", headers=AUTH) as r:
            assert r.status == 200 and (await r.json())["revoked"] is True
        await receive_until(bob, of_type("left", room="team-a", reason="revoked"),
                            timeout=1.0)
        assert time.monotonic() - started < scaled(1.0)

    await alice.send_json({"type": "publish", "room": "team-a", "message": "m2", "ref": "p"})
    await receive_until(alice, of_type("ack", ref="p"))
    await bob.send_json({"type": "members", "room": "lobby"})  # a marker: after m2's fan-out
    assert [f for f in await frames_until(bob, "members") if f["type"] == "message"] == []
    await bob.send_json({"type": "join", "room": "team-a", "since": last,
                         "epoch": joined["epoch"], "ref": "r"})
    refused = await frames_until(bob, "error")
    assert refused[-1]["code"] == "forbidden" and refused[-1]["ref"] == "r"
    assert [f for f in refused if f["type"] == "message"] == []
    for ws in (bob, alice):
        await ws.close()


async def test_group_rooms_follow_the_tokens_cognito_groups(
    make_server: Callable[..., ServerProcess],
) -> None:
    """A Cognito token whose cognito:groups holds `staff` joins staff-room and publishes;
    one without it is refused, and its connection stays open."""
    key = SigningKey()
    with JwksServer([key.jwk()]).running() as jwks:
        server = make_server(env=cognito_env(jwks.url, CHAT_ROOM_RULES=RULES))
        staff = key.mint(key.claims(sub="sam", **{"cognito:groups": ["staff"]}))
        other = key.mint(key.claims(sub="olga", **{"cognito:groups": ["sales"]}))
        async with cookie_session(staff) as s1, cookie_session(other) as s2:
            sam, olga = await open_ws(s1, server), await open_ws(s2, server)
            await sam.send_json({"type": "join", "room": "staff-room"})
            await receive_until(sam, of_type("joined", room="staff-room"))
            await sam.send_json({"type": "publish", "room": "staff-room", "message": "hi",
                                 "ref": "s"})
            await receive_until(sam, of_type("ack", ref="s"))
            await olga.send_json({"type": "join", "room": "staff-room", "ref": "o"})
            refused = await receive_until(olga, of_type("error", ref="o"))
            assert refused["code"] == "forbidden" and not olga.closed
            await olga.send_json({"message": "still open"})
            await receive_until(olga, of_type("message", message="still open"))
            await sam.close()
            await olga.close()


@pytest.mark.parametrize("rules", ["team-* read=sometimes", "team-* write"])
def test_a_bad_rule_exits_2_naming_it(tmp_path: Path, rules: str) -> None:
    """A malformed rule stops start-up with exit 2 and one line quoting the rule."""
    result = subprocess.run([sys.executable, "-m", "chatserver"],
                            env=base_env({"CHAT_ROOM_RULES": rules}), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and rules in lines[0], result.stderr
