"""The compose topology, run natively: redis, three chatserver replicas, nginx in front.

No Docker engine runs here, so the same pieces run as local processes on 127.0.0.1:
a real redis-server, three `chatserver --workers 2` replicas and Debian's nginx with
deploy/nginx.conf rendered for their addresses (deploy/render_nginx.py). Clients speak
to nginx only, reconnect with jitter on a retryable close, and resume every room from
the last id they hold (lobby via /ws?since=&epoch=, others via join with since).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from tests.support import SCALE, ServerProcess, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GRACE = 3.0  # CHAT_GRACE of the replicas: a SIGTERM drain ends within this
TERMINAL_CLOSES = {1000, 1008, 1009, 4001}
RETRY_STATUSES = {502, 503, 504}

if not Path(NGINX).exists() or shutil.which("redis-server") is None:
    pytest.skip("needs nginx and redis-server (apt-get install nginx redis-server)",
                allow_module_level=True)


def load_renderer() -> ModuleType:
    """Import deploy/render_nginx.py (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "render_nginx", ROOT / "deploy" / "render_nginx.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_nginx = load_renderer()


def id_key(message_id: str) -> tuple[int, int]:
    """A stream id `<ms>-<seq>` as two integers, the order PROTOCOL.md defines."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


async def wait_until(predicate: Callable[[], bool], changed: asyncio.Condition,
                     within: float, what: str) -> None:
    """Wait for `predicate`, re-checked whenever a client reports a change; bounded."""
    try:
        async with asyncio.timeout(within * SCALE), changed:
            await changed.wait_for(predicate)
    except TimeoutError:
        raise AssertionError(f"timed out after {within * SCALE:.0f}s waiting for {what}") from None


# ----------------------------------------------------------------- processes


class Nginx:
    """Debian's nginx in the foreground (daemon off, master on), paths under `runtime`."""

    def __init__(self, runtime: Path, conf: Path) -> None:
        self.runtime, self.conf = runtime, conf
        self.log = runtime / "nginx.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                NGINX, "-p", f"{self.runtime}/", "-c", str(self.conf),
                "-e", str(self.runtime / "error.log"),
                "-g", f"daemon off; master_process on; pid {self.runtime / 'nginx.pid'};",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        """SIGTERM (fast shutdown) to the master's PID; SIGKILL its group if it lingers."""
        if self.proc is None:
            return
        try:
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5 * SCALE):
                        await self.proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we created
            async with asyncio.timeout(5 * SCALE):
                await self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        text = "".join(p.read_text(errors="replace") for p in (self.log, self.runtime / "error.log")
                       if p.exists())
        return "--- nginx ---\n" + "\n".join(text.splitlines()[-lines:])


def tail(server: ServerProcess, lines: int = 30) -> str:
    return f"--- chatserver :{server.port} ---\n" + "\n".join(server.log().splitlines()[-lines:])


def descendants(pid: int) -> set[int]:
    """PIDs below `pid` (a replica's workers), from /proc; bounded depth."""
    found: set[int] = set()
    frontier = [pid]
    for _ in range(3):
        children: list[int] = []
        for parent in frontier:
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
                children += [int(c) for c in text.split()]
        found.update(children)
        frontier = children
    return found


def group_alive(pid: int) -> bool:
    """Is anything left in the session (process group) we started as `pid`?"""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def exit_code(server: ServerProcess, within: float) -> int:
    """Wait (in a thread, the loop keeps serving the clients) for the replica to exit."""
    assert server.proc is not None
    return await asyncio.to_thread(server.proc.wait, within * SCALE)


@dataclass
class Topology:
    """The running pieces and how to reach them."""

    redis_url: str
    prefix: str
    replicas: list[ServerProcess]
    nginx: Nginx
    base: str
    session: aiohttp.ClientSession

    @property
    def origin(self) -> str:
        return self.base

    async def start(self, index: int) -> None:
        """Start replica `index` on its port; return once every worker answers."""
        await asyncio.to_thread(self.replicas[index].start)

    def replica_of(self, instance: str) -> int | None:
        """Which running replica a welcome frame's `instance` (host:pid) belongs to."""
        pid = int(instance.rsplit(":", 1)[1])
        for index, replica in enumerate(self.replicas):
            if replica.proc is not None and replica.proc.poll() is None and (
                pid == replica.pid or pid in descendants(replica.pid)
            ):
                return index
        return None

    def tails(self) -> str:
        return "\n".join([*(tail(r) for r in self.replicas), self.nginx.tail()])


@contextlib.asynccontextmanager
async def topology(tmp_path: Path, redis_url: str, make_server: Callable[..., ServerProcess],
                   *, replicas: int, env: dict[str, str]) -> AsyncIterator[Topology]:
    """Start `replicas` chatservers (2 workers each) behind nginx; stop them all by PID after."""
    nginx_port = free_port()
    base = f"http://127.0.0.1:{nginx_port}"
    prefix = f"topo-{uuid.uuid4().hex[:8]}:"
    server_env = {
        "CHAT_REDIS_PREFIX": prefix,
        "CHAT_ALLOWED_ORIGINS": base,
        "CHAT_COOKIE_SECURE": "0",  # plain http, as in compose
        "CHAT_TRUSTED_PROXIES": "127.0.0.1",  # nginx's address (compose: its subnet)
        "CHAT_GRACE": str(GRACE),
        **env,
    }
    servers = [make_server(workers=2, redis_url=redis_url, env=server_env, start=False)
               for _ in range(replicas)]
    runtime = tmp_path / "nginx"
    runtime.mkdir()
    for path in (tmp_path, runtime):  # nginx's workers run as nobody and write temp files here
        path.chmod(0o755)
    conf = runtime / "nginx.conf"
    conf.write_text(render_nginx.render(
        (ROOT / "deploy" / "nginx.conf").read_text(),
        listen=f"127.0.0.1:{nginx_port}",
        servers=[f"127.0.0.1:{server.port}" for server in servers],
        runtime_dir=runtime,
    ))
    nginx = Nginx(runtime, conf)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    cookie_jar=aiohttp.DummyCookieJar())
    topo = Topology(redis_url, prefix, servers, nginx, base, session)
    try:
        await asyncio.gather(*(topo.start(i) for i in range(replicas)))
        await nginx.start()
        await poll_healthz(session, base, nginx)
        yield topo
    except BaseException:
        print(topo.tails())
        raise
    finally:
        try:
            await nginx.stop()
        finally:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
            await session.close()


async def poll_healthz(session: aiohttp.ClientSession, base: str, nginx: Nginx) -> None:
    """GET /healthz through nginx until 200 (nginx gives no ready signal); bounded."""
    last: object = None
    for _ in range(int(100 * SCALE)):
        if not nginx.running:
            raise AssertionError(f"nginx exited\n{nginx.tail()}")
        try:
            async with session.get(f"{base}/healthz",
                                   timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
                last = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"nginx not serving /healthz: {last}\n{nginx.tail()}")


# -------------------------------------------------------------------- client


@dataclass
class RoomLog:
    """What one client holds of one room."""

    last_id: str | None = None
    epoch: str | None = None
    ids: set[str] = field(default_factory=set)
    # id -> (connection number, joined yet?) of its first delivery: says where a duplicate
    # came from (the same connection: the server sent it twice; a later one: the resume).
    first_seen: dict[str, tuple[int, bool]] = field(default_factory=dict)
    live: bool = False  # the current connection has joined or recovered this room
    duplicates: list[tuple[str, tuple[int, bool], tuple[int, bool]]] = field(
        default_factory=list)
    out_of_order: list[tuple[str, str]] = field(default_factory=list)
    incomplete: int = 0


class ChatClient:
    """A resuming client: reconnects on retryable closes, replays each room from its last id."""

    def __init__(self, topo: Topology, username: str, rooms: list[str],
                 changed: asyncio.Condition) -> None:
        self.topo, self.username, self.changed = topo, username, changed
        self.rooms = {room: RoomLog() for room in ["lobby", *rooms]}
        self.extra_rooms = rooms
        self.token: str | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready = False  # welcome seen and every room joined or recovered
        self.instances: list[str] = []
        self.closes: list[int | str] = []
        self.terminal: str | None = None
        self.acks: dict[str, str] = {}  # ref -> message id
        self.sent: dict[str, tuple[str, int]] = {}  # ref -> (room, connection number)
        self.connections = 0
        self.refs = itertools.count()
        self.errors: list[dict[str, Any]] = []

    async def sign_in(self) -> None:
        """Dev sign-in through nginx; keep the authToken cookie."""
        async with asyncio.timeout(10 * SCALE), self.topo.session.post(
            f"{self.topo.base}/auth/login",
            json={"username": self.username, "password": "pw"},
            headers={"Origin": self.topo.origin},
        ) as resp:
            assert resp.status == 200, f"login {self.username}: {resp.status} {await resp.text()}"
            self.token = resp.cookies["authToken"].value

    async def run(self, stop: asyncio.Event, max_connects: int = 40) -> None:
        """Stay connected until `stop`; a crash of the client itself is reported, not lost."""
        try:
            await self._run(stop, max_connects)
        except Exception as exc:
            self.terminal = f"client failed: {exc!r}"
            await self._notify()
            raise

    async def _run(self, stop: asyncio.Event, max_connects: int) -> None:
        backoff = 0.1
        for _ in range(max_connects):
            if stop.is_set() or self.terminal:
                return
            try:
                connected = await self._connect_once(stop)
            except aiohttp.WSServerHandshakeError as exc:
                self.closes.append(f"handshake {exc.status}")
                if exc.status not in RETRY_STATUSES:
                    self.terminal = f"handshake refused: {exc.status}"
                    await self._notify()
                    return
                connected = False
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.closes.append(type(exc).__name__)
                connected = False
            backoff = 0.1 if connected else min(backoff * 2, 1.0)
            if stop.is_set() or self.terminal:
                return
            with contextlib.suppress(TimeoutError):  # jittered backoff, cut short by stop
                async with asyncio.timeout(random.uniform(0.05, backoff)):
                    await stop.wait()
        self.terminal = f"gave up after {max_connects} connects"
        await self._notify()

    async def _connect_once(self, stop: asyncio.Event) -> bool:
        lobby = self.rooms["lobby"]
        params = {}
        if lobby.last_id is not None:
            params = {"since": lobby.last_id, "epoch": lobby.epoch or ""}
        async with asyncio.timeout(10 * SCALE):
            ws = await self.topo.session.ws_connect(
                f"{self.topo.base}/ws", params=params, heartbeat=None, autoping=True,
                headers={"Origin": self.topo.origin, "Cookie": f"authToken={self.token}"},
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5),
            )
        self.ws = ws
        self.connections += 1
        pending = set(self.rooms)
        welcomed = False
        try:
            stopper = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    receive = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({receive, stopper},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if receive not in done:
                        receive.cancel()
                        await ws.close()
                        return welcomed
                    msg = receive.result()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = json.loads(msg.data)
                    kind = frame.get("type")
                    if kind == "welcome":
                        welcomed = True
                        self.instances.append(frame["instance"])
                        for room in self.extra_rooms:
                            await ws.send_json(self._join_frame(room))
                    elif kind in ("joined", "recovered"):
                        self._joined(frame)
                        pending.discard(frame["room"])
                        if not pending:
                            self.ready = True
                    elif kind == "message":
                        self._message(frame)
                    elif kind == "ack":
                        self.acks[frame["ref"]] = frame["id"]
                    elif kind == "error":
                        self.errors.append(frame)
                    await self._notify()
            finally:
                stopper.cancel()
        finally:
            self.ready = False
            self.ws = None
            for log in self.rooms.values():
                log.live = False
            code = ws.close_code if ws.close_code is not None else "no close"
            self.closes.append(code)
            if code in TERMINAL_CLOSES:
                self.terminal = f"closed {code}"
            await ws.close()
            await self._notify()
        return welcomed

    def _join_frame(self, room: str) -> dict[str, str]:
        log = self.rooms[room]
        frame = {"type": "join", "room": room}
        if log.last_id is not None:
            frame.update(since=log.last_id, epoch=log.epoch or "")
        return frame

    def _joined(self, frame: dict[str, Any]) -> None:
        log = self.rooms[frame["room"]]
        if frame["type"] == "recovered" and not frame["complete"]:
            log.incomplete += 1
        log.epoch = frame["epoch"]
        log.live = True

    def _message(self, frame: dict[str, Any]) -> None:
        log = self.rooms.get(frame["room"])
        if log is None:
            return
        message_id = frame["id"]
        seen = (self.connections, log.live)
        if message_id in log.ids:
            log.duplicates.append((message_id, log.first_seen[message_id], seen))
            return
        log.first_seen[message_id] = seen
        if log.last_id is not None and id_key(message_id) < id_key(log.last_id):
            log.out_of_order.append((log.last_id, message_id))
        log.ids.add(message_id)
        if log.last_id is None or id_key(message_id) > id_key(log.last_id):
            log.last_id = message_id

    async def publish(self, room: str) -> bool:
        """Send one message if connected and joined; True if it went out."""
        ws = self.ws
        if ws is None or not self.ready or ws.closed:
            return False
        ref = f"{self.username}-{next(self.refs)}"
        try:
            await ws.send_json({"type": "publish", "room": room, "ref": ref,
                                "message": f"{self.username} says {ref}"})
        except (ConnectionError, RuntimeError):  # closed under us; not sent
            return False
        self.sent[ref] = (room, self.connections)
        return True

    def settled(self) -> bool:
        """Every message sent on the open connection has its ack."""
        return self.terminal is not None or all(
            ref in self.acks for ref, (_, n) in self.sent.items() if n == self.connections
        )

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


async def sender(client: ChatClient, stop: asyncio.Event, room_every: float,
                 lobby_every: int) -> None:
    """Publish steadily: one message per `room_every` s, every `lobby_every`th to the lobby."""
    await asyncio.sleep(random.uniform(0, room_every))  # spread the clients' phases
    for n in itertools.count():
        if stop.is_set():
            return
        room = "lobby" if n % lobby_every == lobby_every - 1 else client.extra_rooms[0]
        await client.publish(room)
        with contextlib.suppress(TimeoutError):  # pacing, cut short by stop
            async with asyncio.timeout(room_every * random.uniform(0.8, 1.2)):
                await stop.wait()


# --------------------------------------------------------------------- tests


async def start_clients(topo: Topology, count: int, groups: int,
                        changed: asyncio.Condition,
                        stop: asyncio.Event) -> tuple[list[ChatClient], list[asyncio.Task[None]]]:
    """Sign `count` users in through nginx, connect them, wait until all are ready."""
    run_id = uuid.uuid4().hex[:6]
    clients = [ChatClient(topo, f"u{run_id}-{i}", [f"g{i % groups}"], changed)
               for i in range(count)]
    await asyncio.gather(*(c.sign_in() for c in clients))
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    await wait_until(lambda: all(c.ready or c.terminal for c in clients), changed, 20,
                     "every client to connect")
    assert not [c.terminal for c in clients if c.terminal]
    return clients, tasks


def all_ready(clients: list[ChatClient]) -> bool:
    return all(c.ready or c.terminal for c in clients)


async def seed_rooms(clients: list[ChatClient], changed: asyncio.Condition) -> None:
    """One message per room, held by every member: after it, every client can resume by id."""
    by_room: dict[str, ChatClient] = {}
    for client in clients:
        for room in client.rooms:
            by_room.setdefault(room, client)
    for room, client in by_room.items():
        assert await client.publish(room)
    await wait_until(lambda: all(log.last_id for c in clients for log in c.rooms.values()),
                     changed, 10, "the seed message of every room")


async def stream_ids(topo: Topology, room: str) -> list[str] | None:
    """The room's history stream in Redis (None if the layout is not the expected one)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(topo.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        key = f"{topo.prefix}history:{room}"
        if await client.type(key) != b"stream":
            return None
        entries = await client.xrange(key)
        return [e.decode() if isinstance(e, bytes) else str(e) for e, _ in entries or []]
    finally:
        await client.aclose()


async def check_everything_held(topo: Topology, clients: list[ChatClient],
                                changed: asyncio.Condition) -> dict[str, set[str]]:
    """Wait until every client holds every known message of its rooms; assert exactly once."""
    expected: dict[str, set[str]] = {}
    for client in clients:
        for room, log in client.rooms.items():
            expected.setdefault(room, set()).update(log.ids)
        for ref, message_id in client.acks.items():
            expected.setdefault(client.sent[ref][0], set()).add(message_id)
    for room in expected:
        stored = await stream_ids(topo, room)
        if stored is not None:
            assert set(stored) >= expected[room], f"{room}: delivered ids missing from history"
            expected[room] = set(stored)

    def complete() -> bool:
        return all(c.terminal or (c.ready and all(expected[r] <= log.ids
                                                  for r, log in c.rooms.items()))
                   for c in clients)

    try:
        await wait_until(complete, changed, 15, "every client to hold every message")
    finally:
        problems = []
        for c in clients:
            if c.terminal:
                problems.append(f"{c.username}: {c.terminal}; closes {c.closes}")
            for room, log in c.rooms.items():
                missing = expected[room] - log.ids
                if missing or log.duplicates or log.out_of_order or log.incomplete:
                    problems.append(
                        f"{c.username}/{room}: missing {len(missing)} {sorted(missing)[:3]}, "
                        f"delivered twice {log.duplicates[:3]} (id, first, again as "
                        f"(connection #, after joined/recovered?)), "
                        f"out of order {log.out_of_order[:3]}, "
                        f"incomplete recoveries {log.incomplete}; closes {c.closes}")
        if problems:
            print("\n".join(problems[:40]))
    assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
    return expected


async def test_clients_spread_over_replicas_and_hear_each_other(
    tmp_path: Path, redis_url: str, make_server: Callable[..., ServerProcess]
) -> None:
    """Through nginx, clients land on several replicas and all receive each other's messages."""
    changed, stop = asyncio.Condition(), asyncio.Event()
    async with topology(tmp_path, redis_url, make_server, replicas=3,
                        env={"CHAT_LOGIN_RATE": "1000"}) as topo:
        clients, tasks = await start_clients(topo, 12, 1, changed, stop)
        try:
            replicas = {topo.replica_of(c.instances[-1]) for c in clients}
            assert None not in replicas
            assert len(replicas) >= 2, f"least_conn put every client on {replicas}"
            for client in clients:
                assert await client.publish("g0")
            expected = await check_everything_held(topo, clients, changed)
            assert len(expected["g0"]) == len(clients)
            for client in clients:  # every sender's message reached every client
                senders = {c.username for c in clients}
                assert len(client.rooms["g0"].ids) == len(senders)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10 * SCALE)


async def test_rolling_restart_and_crash_lose_nothing(
    tmp_path: Path, redis_url: str, make_server: Callable[..., ServerProcess]
) -> None:
    """60 clients under load through a SIGTERM rolling restart and a SIGKILL: all held once."""
    changed, stop, stop_sending = asyncio.Condition(), asyncio.Event(), asyncio.Event()
    async with topology(tmp_path, redis_url, make_server, replicas=3,
                        env={"CHAT_LOGIN_RATE": "1000", "CHAT_HISTORY_MAXLEN": "100000"}) as topo:
        clients, tasks = await start_clients(topo, 60, 6, changed, stop)
        senders: list[asyncio.Task[None]] = []
        try:
            assert len({topo.replica_of(c.instances[-1]) for c in clients}) >= 2
            await seed_rooms(clients, changed)
            # Each client: 2 msg/s to its group room, every 10th to the lobby.
            senders = [asyncio.create_task(sender(c, stop_sending, 0.5, 10)) for c in clients]
            reconnects_before = sum(len(c.instances) for c in clients)

            for index, replica in enumerate(topo.replicas):  # rolling restart
                on_it = [c for c in clients if topo.replica_of(c.instances[-1]) == index]
                replica.signal(signal.SIGTERM)
                code = await exit_code(replica, GRACE + 5)
                assert code == 0, f"replica{index} exited {code} on SIGTERM\n{tail(replica)}"
                assert not group_alive(replica.pid), f"replica{index} left workers behind"
                await topo.start(index)
                await wait_until(lambda: all_ready(clients), changed, 15,
                                 f"clients of replica{index} ({len(on_it)}) to come back")

            # Crash: SIGKILL the replica holding the most clients, workers and all.
            counts = [sum(1 for c in clients if topo.replica_of(c.instances[-1]) == i)
                      for i in range(3)]
            victim = counts.index(max(counts))
            victims = [c for c in clients if topo.replica_of(c.instances[-1]) == victim]
            assert victims
            os.killpg(topo.replicas[victim].pid, signal.SIGKILL)  # its session: workers too
            assert await exit_code(topo.replicas[victim], 5) == -signal.SIGKILL
            await wait_until(
                lambda: all(c.ready and topo.replica_of(c.instances[-1]) not in (None, victim)
                            for c in victims) and all_ready(clients),
                changed, 15, "the crashed replica's clients to move to the others")
            await topo.start(victim)

            with contextlib.suppress(TimeoutError):  # a little more load after the crash
                async with asyncio.timeout(1.0):
                    await stop.wait()
            stop_sending.set()
            await asyncio.wait_for(asyncio.gather(*senders), 5 * SCALE)

            await wait_until(lambda: all(c.settled() for c in clients), changed, 10,
                             "an ack for every message sent on a live connection")
            expected = await check_everything_held(topo, clients, changed)
            assert sum(len(c.instances) for c in clients) - reconnects_before >= 60
            assert sum(len(ids) for ids in expected.values()) > 500, "too little load"
            errors = [e for c in clients for e in c.errors if e.get("code") != "unavailable"]
            assert not errors, errors[:5]
        finally:
            stop_sending.set()
            stop.set()
            for task in senders:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, *senders, return_exceptions=True),
                                   10 * SCALE)


async def test_forwarded_for_cannot_be_spoofed_through_nginx(
    tmp_path: Path, redis_url: str, make_server: Callable[..., ServerProcess]
) -> None:
    """nginx overwrites X-Forwarded-For, so a client cannot dodge the per-IP sign-in limit."""
    rate = 3
    async with topology(tmp_path, redis_url, make_server, replicas=1,
                        env={"CHAT_LOGIN_RATE": str(rate)}) as topo:

        async def login(base: str, n: int, forwarded: str) -> int:
            async with topo.session.post(
                f"{base}/auth/login", json={"username": f"spoof{n}", "password": "pw"},
                headers={"Origin": topo.origin, "X-Forwarded-For": forwarded},
            ) as resp:
                return resp.status

        # Two windows' worth plus one: a limit window may roll over once meanwhile.
        through_nginx = [await login(topo.base, n, f"203.0.113.{n}") for n in range(2 * rate + 1)]
        assert 429 in through_nginx, through_nginx
        # The replica itself believes its trusted proxy (127.0.0.1): distinct hops, no limit.
        direct = topo.replicas[0].url
        straight = [await login(direct, 100 + n, f"198.51.100.{n}") for n in range(2 * rate + 1)]
        assert straight == [200] * len(straight)
