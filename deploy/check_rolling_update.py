#!/usr/bin/env python3
"""Check deploy/rolling-update.sh against a running `docker compose up` (run by hand).

Through nginx on the published port: sign-ins keyed on the real client address (each
sign-in claims its own X-Forwarded-For, which nginx believes from the gateway only),
/metrics 404 outside and 200 from inside the compose network, then CLIENTS resuming
WebSocket clients publishing to the lobby and an HTTP prober while
deploy/rolling-update.sh replaces every replica, then `--scale chatserver=4` (new
connections reach all four within the resolver's 5 s) and back to 3. Passes only with no
non-200 answer, no refused handshake, every client reconnected (1001) and resumed, and
every acked message held by every client exactly once, in order. Needs aiohttp; the last
line is a summary.

    COMPOSE='docker compose -p chatserver' python3 deploy/check_rolling_update.py \
        --base http://127.0.0.1:3020
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
RETRYABLE = {1001, 1006, 1011, 1013}


def id_key(message_id: str) -> tuple[int, int]:
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


class Client:
    """Stays connected to the lobby; on a retryable close reconnects with ?since=&epoch=."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str, name: str,
                 changed: asyncio.Condition) -> None:
        self.session, self.base, self.token, self.name = session, base, token, name
        self.changed = changed  # notified on every frame
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready = asyncio.Event()
        self.ids: list[str] = []
        self.last_id: str | None = None
        self.epoch = ""
        self.closes: list[int | str] = []
        self.connections = 0
        self.incomplete = 0
        self.acked: set[str] = set()
        self.unacked: set[str] = set()
        self.refs = 0

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            params = {"since": self.last_id, "epoch": self.epoch} if self.last_id else {}
            try:
                self.ws = await self.session.ws_connect(
                    self.base.replace("http", "ws", 1) + "/ws", params=params, heartbeat=None,
                    headers={"Origin": self.base, "Cookie": f"authToken={self.token}"},
                    timeout=aiohttp.ClientWSTimeout(ws_close=5))
            except aiohttp.WSServerHandshakeError as exc:
                self.closes.append(f"handshake {exc.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.closes.append(type(exc).__name__)
            else:
                self.connections += 1
                backoff = 0.1
                await self._read(stop)
                code = self.ws.close_code
                self.closes.append(code if code is not None else "no close")
                self.ws = None
                self.ready.clear()
                if (code is not None and code not in RETRYABLE) or stop.is_set():
                    return
            backoff = min(backoff * 2, 1.0)
            await asyncio.sleep(random.uniform(0.05, backoff))

    async def _read(self, stop: asyncio.Event) -> None:
        assert self.ws is not None
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                receive = asyncio.ensure_future(self.ws.receive())
                done, _ = await asyncio.wait({receive, stopper},
                                             return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    await self.ws.close()
                    return
                msg = receive.result()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                frame: dict[str, Any] = json.loads(msg.data)
                kind = frame.get("type")
                if kind in ("joined", "recovered") and frame.get("room") == "lobby":
                    self.epoch = str(frame.get("epoch", self.epoch))
                    if kind == "recovered" and not frame.get("complete"):
                        self.incomplete += 1
                    self.ready.set()
                elif kind == "message" and frame.get("room") == "lobby":
                    self.ids.append(frame["id"])
                    if self.last_id is None or id_key(frame["id"]) > id_key(self.last_id):
                        self.last_id = frame["id"]
                elif kind == "ack":
                    self.acked.add(frame["id"])
                    self.unacked.discard(frame["ref"])
                async with self.changed:
                    self.changed.notify_all()
        finally:
            stopper.cancel()

    async def publish(self) -> None:
        ws = self.ws
        if ws is None or ws.closed or not self.ready.is_set():
            return
        self.refs += 1
        ref = f"{self.name}-{self.refs}"
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_json({"type": "publish", "room": "lobby", "ref": ref,
                                "message": f"{self.name} says {ref}"})
            self.unacked.add(ref)


async def until(predicate: Any, changed: asyncio.Condition, within: float) -> bool:
    """Wait for `predicate`, re-checked on every frame; False after `within` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within), changed:
            await changed.wait_for(predicate)
    return bool(predicate())


async def login(session: aiohttp.ClientSession, base: str, user: str,
                forwarded: str) -> aiohttp.ClientResponse:
    async with session.post(f"{base}/auth/login", json={"username": user, "password": ""},
                            headers={"Origin": base, "X-Forwarded-For": forwarded}) as resp:
        await resp.read()
        return resp


def compose(args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [*shlex.split(os.environ.get("COMPOSE", "docker compose")), *shlex.split(args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


async def instances(session: aiohttp.ClientSession, base: str, tokens: list[str],
                    count: int) -> set[str]:
    """The replica (welcome `instance` host) each of `count` fresh connections lands on."""
    hosts = set()
    for n in range(count):
        async with session.ws_connect(
            base.replace("http", "ws", 1) + "/ws", heartbeat=None,
            headers={"Origin": base, "Cookie": f"authToken={tokens[n % len(tokens)]}"},
        ) as ws:
            welcome = await ws.receive_json(timeout=10)
            hosts.add(str(welcome["instance"]).rsplit(":", 1)[0])
    return hosts


async def check_scale(session: aiohttp.ClientSession, base: str, tokens: list[str],
                      fails: list[str]) -> str:
    """--scale chatserver=4: after the resolver's 5 s, new connections reach all four."""
    up = compose("up -d --no-deps --no-recreate --scale chatserver=4 chatserver", 120)
    running = len(compose("ps -q chatserver", 30).stdout.split())
    await asyncio.sleep(6)  # nginx.conf: resolver valid=5s
    seen = await instances(session, base, tokens, 24)
    compose("up -d --no-deps --scale chatserver=3 chatserver", 120)
    if up.returncode != 0 or running != 4 or len(seen) != 4:
        fails.append(f"scale to 4: rc {up.returncode}, {running} running, {len(seen)} reached")
    return f"--scale chatserver=4: {running} running, new connections reached {len(seen)}"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="http://127.0.0.1:3020")
    parser.add_argument("--clients", type=int, default=24)
    args = parser.parse_args()
    base, fails, notes = args.base.rstrip("/"), [], []
    run = uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=15)) as session:
        # The sign-in limit (10/min per client address) keys on the real client address.
        tokens = []
        for n in range(args.clients):
            resp = await login(session, base, f"roll{run}-{n}", f"203.0.113.{n + 1}")
            if resp.status != 200:
                fails.append(f"sign-in {n} as 203.0.113.{n + 1}: {resp.status}")
                break
            tokens.append(resp.cookies["authToken"].value)
        same = [(await login(session, base, f"same{run}-{n}", "198.51.100.7")).status
                for n in range(21)]
        notes.append(f"real IP: {len(tokens)} sign-ins from distinct client addresses all 200, "
                     f"21 from one: {same.count(429)} x 429")
        if 429 not in same:
            fails.append("one client address was never rate limited")
        async with session.get(f"{base}/metrics") as resp:
            outside = resp.status
        inside = compose("exec -T nginx wget -q -O - http://chatserver:3020/metrics", 30)
        scraped = "200" if "chatserver_" in inside.stdout else "FAIL"
        notes.append(f"/metrics: {outside} through nginx, {scraped} from the nginx container")
        if outside != 404 or "chatserver_" not in inside.stdout:
            fails.append(f"/metrics outside {outside}, inside rc {inside.returncode}")
        if fails:
            print("check_rolling_update: FAIL (" + "; ".join(fails) + ")")
            return 1

        stop, stop_sending, changed = asyncio.Event(), asyncio.Event(), asyncio.Condition()
        clients = [Client(session, base, t, f"c{i}", changed) for i, t in enumerate(tokens)]
        tasks = [asyncio.create_task(c.run(stop)) for c in clients]
        await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), 30)
        before = [c.connections for c in clients]
        probes: list[int | str] = []

        async def prober() -> None:
            while not stop_sending.is_set():
                try:
                    async with session.get(f"{base}/healthz",
                                           headers={"Connection": "close"}) as r:
                        probes.append(r.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    probes.append(type(exc).__name__)
                await asyncio.sleep(0.02)

        async def sender(c: Client) -> None:
            while not stop_sending.is_set():
                await c.publish()
                await asyncio.sleep(random.uniform(0.4, 0.6))

        load = [asyncio.create_task(prober()), *(asyncio.create_task(sender(c)) for c in clients)]
        started = time.monotonic()
        update = await asyncio.to_thread(
            subprocess.run, [str(HERE / "rolling-update.sh")], capture_output=True, text=True,
            timeout=600, check=False, env={**os.environ})
        took = time.monotonic() - started
        print(update.stdout + update.stderr, end="")
        if update.returncode != 0:
            fails.append(f"rolling-update.sh rc {update.returncode}")
        await asyncio.sleep(2)  # a little load on the new replicas
        stop_sending.set()
        await asyncio.gather(*load)
        await until(lambda: not any(c.unacked for c in clients if c.ws), changed, 10)
        expected = set().union(*(c.acked for c in clients), *(set(c.ids) for c in clients))
        await until(lambda: all(expected <= set(c.ids) for c in clients), changed, 10)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        notes.append(await check_scale(session, base, tokens, fails))

    bad_probes = [p for p in probes if p != 200]
    refused = [x for c in clients for x in c.closes if isinstance(x, str) and x != "no close"]
    resumed = sum(c.connections > b for c, b in zip(clients, before, strict=True))
    lost = sum(len(expected - set(c.ids)) for c in clients)
    duplicated = sum(len(c.ids) - len(set(c.ids)) for c in clients)
    disordered = sum(c.ids != sorted(c.ids, key=id_key) for c in clients)
    incomplete = sum(c.incomplete for c in clients)
    closes = sorted({str(x) for c in clients for x in c.closes[:-1]})
    for cond, what in ((bad_probes, f"non-200 through nginx: {bad_probes[:10]}"),
                       (refused, f"handshakes failed: {refused[:5]}"),
                       (resumed != len(clients), f"resumed {resumed}/{len(clients)}"),
                       (lost, f"lost {lost}"), (duplicated, f"duplicated {duplicated}"),
                       (disordered, f"{disordered} clients out of order"),
                       (incomplete, f"{incomplete} incomplete recoveries")):
        if cond:
            fails.append(what)
    summary = (f"rolling update {took:.0f}s; {len(probes)} HTTP probes, non-200 {len(bad_probes)}; "
               f"clients resumed {resumed}/{len(clients)} (closes {closes}); {len(expected)} "
               f"messages, lost {lost}, duplicated {duplicated}; " + "; ".join(notes))
    verdict = f"FAIL ({'; '.join(fails)})" if fails else "PASS"
    print(f"check_rolling_update: {verdict}; {summary}")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(asyncio.wait_for(main(), 900)))
