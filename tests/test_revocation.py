"""Sign-out revokes tokens: a copied access or refresh cookie is refused afterwards, at
/ws (1008 "revoked") and on /auth/*, on every worker and replica sharing one Redis, and
after a restart. Real chatserver processes, real redis-server, dev sign-in.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import aiohttp
from yarl import URL

from tests.support import ServerProcess, cookie_session, of_type, open_ws, receive_until
from tests.test_signin import call, login, server_close, sockets_on_two_workers

TRIES = 24  # refused upgrades carry no instance: this many land on both workers but for 2**-23


async def refused_at_ws(token: str, server: ServerProcess, tries: int = 1) -> list[tuple[int, str]]:
    """The closes of `tries` upgrades with this authToken cookie."""
    closes = []
    async with cookie_session(token) as thief:
        for _ in range(tries):
            ws = await open_ws(thief, server)
            closes.append(await server_close(ws))
            await ws.close()
    return closes


async def me_with(token: str, server: ServerProcess) -> tuple[int, str]:
    async with cookie_session(token) as session:
        answer = await call(session, server, "GET", "/auth/me")
    return answer.status, str(answer.body.get("detail") or answer.body.get("user"))


async def works_at_ws(session: aiohttp.ClientSession, server: ServerProcess) -> None:
    ws = await open_ws(session, server)
    await receive_until(ws, of_type("welcome"))
    await ws.close()


async def test_copied_cookie_refused_after_logout_on_both_workers(
        make_server: Callable[..., ServerProcess], redis_url: str) -> None:
    """Log out; the copied authToken is 1008 revoked at /ws on both workers and 401 on
    /auth/me; the copied refresh cookie is refused by /auth/refresh."""
    server = make_server(workers=2, redis_url=redis_url)
    async with cookie_session() as session:
        answer = await login(session, server, "rita", "")
        assert answer.status == 200, answer.body
        token, refresh = answer.cookies["authToken"][0], answer.cookies["refreshToken"][0]
        sockets = await sockets_on_two_workers(session, server, answer.body["user"]["sub"])
        out = await call(session, server, "POST", "/auth/logout")
        assert (out.status, out.body) == (200, {"ok": True})
        for ws in sockets:  # both workers had the token verified and cached
            assert await server_close(ws) == (1000, "signed out")
    assert await refused_at_ws(token, server, TRIES) == [(1008, "revoked")] * TRIES
    assert await me_with(token, server) == (401, "revoked")
    async with cookie_session() as thief:
        thief.cookie_jar.update_cookies({"refreshToken": refresh}, URL(server.url + "/auth/"))
        refused = await call(thief, server, "POST", "/auth/refresh")
        assert (refused.status, refused.body["error"]) == (401, "unauthenticated")


async def test_logout_everywhere_refuses_other_sessions_not_later_ones(
        make_server: Callable[..., ServerProcess], redis_url: str) -> None:
    """logout?everywhere=1 refuses a second session's tokens too; a sign-in after it works."""
    server = make_server(workers=2, redis_url=redis_url)
    async with cookie_session() as first, cookie_session() as second:
        assert (await login(first, server, "sam", "")).status == 200
        other = await login(second, server, "sam", "")
        assert other.status == 200
        other_token = other.cookies["authToken"][0]
        other_refresh = other.cookies["refreshToken"][0]
        plain = await call(second, server, "GET", "/auth/me")
        assert plain.status == 200
        out = await call(first, server, "POST", "/auth/logout?everywhere=1")
        assert (out.status, out.body) == (200, {"ok": True})
        assert await me_with(other_token, server) == (401, "revoked")
        assert await refused_at_ws(other_token, server, TRIES) == [(1008, "revoked")] * TRIES
        refreshed = await call(second, server, "POST", "/auth/refresh")
        assert refreshed.status == 401, "the other session's refresh token is refused too"
        async with cookie_session() as thief:  # and a copy of it, which the 401 did not clear
            thief.cookie_jar.update_cookies({"refreshToken": other_refresh},
                                            URL(server.url + "/auth/"))
            assert (await call(thief, server, "POST", "/auth/refresh")).status == 401
    async with cookie_session() as later:
        again = await login(later, server, "sam", "")
        assert again.status == 200
        assert (await call(later, server, "GET", "/auth/me")).status == 200
        await works_at_ws(later, server)


async def test_denylist_shared_by_two_instances_and_survives_restart(
        make_server: Callable[..., ServerProcess], redis_url: str) -> None:
    """Two instances on one Redis: a sign-out on one is refused on the other, and on a
    fresh process started after it (loaded from Redis, not from the broadcast)."""
    one = make_server(redis_url=redis_url)
    two = make_server(redis_url=redis_url)
    async with cookie_session() as session:
        answer = await login(session, one, "tess", "")
        assert answer.status == 200, answer.body
        token = answer.cookies["authToken"][0]
        assert (await me_with(token, two))[0] == 200, "the dev key is shared through Redis"
        assert (await call(session, one, "POST", "/auth/logout")).status == 200
    assert await me_with(token, two) == (401, "revoked")
    assert await refused_at_ws(token, two) == [(1008, "revoked")]
    two.stop()
    three = make_server(redis_url=redis_url)
    assert await me_with(token, three) == (401, "revoked")
    assert await refused_at_ws(token, three) == [(1008, "revoked")]
    async with cookie_session() as fresh:
        assert (await login(fresh, three, "tess", "")).status == 200
        await works_at_ws(fresh, three)


async def test_restarted_worker_loads_the_denylist(
        make_server: Callable[..., ServerProcess], redis_url: str) -> None:
    """A worker killed after a sign-out comes back refusing the copied token: it loads the
    denylist from Redis at start (it never heard the broadcast)."""
    server = make_server(workers=2, redis_url=redis_url)
    async with cookie_session() as session:
        answer = await login(session, server, "wanda", "")
        token = answer.cookies["authToken"][0]
        sockets = await sockets_on_two_workers(session, server, answer.body["user"]["sub"])
        for ws in sockets:
            await ws.close()
        instances = sorted({i for _ in range(40)
                            if (i := await asyncio.to_thread(server.instance_answering))})
        assert len(instances) == 2, instances
        assert (await call(session, server, "POST", "/auth/logout")).status == 200
    killed = instances[0]
    os.kill(int(killed.rsplit(":", 1)[1]), signal.SIGKILL)
    await asyncio.to_thread(server.wait_ready)
    seen = {await asyncio.to_thread(server.instance_answering) for _ in range(40)}
    assert killed not in seen and len(seen - {None}) == 2, seen
    assert await refused_at_ws(token, server, TRIES) == [(1008, "revoked")] * TRIES
