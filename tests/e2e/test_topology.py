"""The compose topology, run natively: redis, three chatserver replicas, nginx in front.

No Docker engine runs here, so the same pieces run as local processes: a real
redis-server, `chatserver --workers 2` replicas each on its own loopback address and
one port (as containers have their own IPs), a DNS stub standing in for Docker's
embedded DNS (`chatserver` -> the running replicas), and Debian's nginx with
deploy/nginx.conf rendered for these addresses (deploy/render_nginx.py). Clients speak
to nginx only, reconnect with jitter on a retryable close, and resume every room from
the last id they hold (lobby via /ws?since=&epoch=, others via join with since).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.util
import ipaddress
import itertools
import json
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import SCALE, ServerProcess, base_env, free_port

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


class Replica(ServerProcess):
    """A `chatserver --workers 2` on its own loopback address: in compose every replica
    has its own IP and the same port, and nginx finds them by name, so here too."""

    def __init__(self, host: str, port: int, redis_url: str, env: dict[str, str],
                 log_dir: Path) -> None:
        args = [sys.executable, "-m", "chatserver", "--host", host, "--port", str(port),
                "--workers", "2", "--redis-url", redis_url]
        super().__init__(args, base_env(env), port, 2, log_dir,
                         log_dir / f"chatserver-{host}-{port}.log")
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def instance_answering(self) -> str | None:
        """The instance of the worker that answers one /healthz (None: not up yet)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
        except OSError:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n")[0]:
            return None
        return str(json.loads(body).get("instance"))


class NameServer(asyncio.DatagramProtocol):
    """Docker's embedded DNS in miniature: `name` -> the A records of the running replicas.

    Records which answer (a version number) each asker got last: every nginx worker
    queries from its own UDP socket, so "every asker has version v" means no worker
    still routes by an older list.
    """

    def __init__(self, name: str) -> None:
        self.name = name.lower()
        self.addresses: list[str] = []
        self.version = 0
        self.answered: dict[tuple[str, int], int] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                           local_addr=("127.0.0.1", 0))
        self.port = transport.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def set(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self.version += 1

    def everyone_has(self, version: int) -> bool:
        return all(v >= version for v in self.answered.values())

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or self.transport is None:
            return
        query_id, _flags, qdcount = struct.unpack("!HHH", data[:6])
        labels, pos = [], 12
        while pos < len(data) and data[pos]:
            labels.append(data[pos + 1 : pos + 1 + data[pos]].decode("ascii", "replace"))
            pos += 1 + data[pos]
        question = data[12 : pos + 5]
        qtype = struct.unpack("!H", data[pos + 1 : pos + 3])[0] if pos + 3 <= len(data) else 0
        known = ".".join(labels).lower() == self.name
        answers = self.addresses if known and qtype == 1 else []
        rcode = 0 if known else 3  # NXDOMAIN for any other name
        header = struct.pack("!HHHHHH", query_id, 0x8180 | rcode, qdcount, len(answers), 0, 0)
        records = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a)
                           for a in answers)
        self.transport.sendto(header + question + records, addr)
        if known and qtype == 1:
            self.answered[addr] = self.version

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Topology:
    """The running pieces and how to reach them."""

    redis_url: str
    prefix: str
    replicas: list[Replica]
    nginx: Nginx
    dns: NameServer
    base: str
    session: aiohttp.ClientSession
    make_replica: Callable[[], Replica]
    front_proxy: str  # the one address whose X-Forwarded-For nginx believes
    retired: list[Replica] = field(default_factory=list)
    probes: list[int | str] = field(default_factory=list)  # every answer through nginx
    learned: list[float] = field(default_factory=list)  # seconds until nginx routed to a new one

    @property
    def origin(self) -> str:
        return self.base

    async def start(self, index: int) -> None:
        """Start replica `index`; once every worker answers, name it in DNS."""
        replica = self.replicas[index]
        await asyncio.to_thread(replica.start)
        self.dns.set(sorted({*self.dns.addresses, replica.host}))

    def replica_of(self, instance: str) -> int | None:
        """Which running replica a welcome frame's `instance` (host:pid) belongs to."""
        pid = int(instance.rsplit(":", 1)[1])
        for index, replica in enumerate(self.replicas):
            if replica.proc is not None and replica.proc.poll() is None and (
                pid == replica.pid or pid in descendants(replica.pid)
            ):
                return index
        return None

    async def nginx_knows(self, version: int, within: float) -> float:
        """Probe through nginx until no worker routes by a DNS answer older than `version`.

        A worker asks again only for a request after its cached answer expired (valid=5s),
        so the probes (new connections, spread over the workers) make it ask. Returns the
        seconds it took; no reload is ever sent.
        """
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(within * SCALE):
            while not self.dns.everyone_has(version):
                self.probes.append(await probe(self.session, f"{self.base}/healthz"))
                await asyncio.sleep(0.05)
        return asyncio.get_running_loop().time() - started

    async def replace(self, index: int) -> None:
        """One step of deploy/rolling-update.sh: start the new replica, wait /readyz and
        until nginx routes to it, then SIGTERM the old one (1001 to its clients) and drop
        its address once it has exited, as Docker's DNS does when a container stops."""
        old, new = self.replicas[index], self.make_replica()
        await asyncio.to_thread(new.start)
        for _ in range(int(200 * SCALE)):  # /readyz: Redis connected, not draining
            if await probe(self.session, f"{new.url}/readyz") == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"{new.host} never became ready\n{tail(new)}")
        self.dns.set(sorted({*self.dns.addresses, new.host}))
        learned = await self.nginx_knows(self.dns.version, 10)
        self.learned.append(learned)
        self.replicas[index] = new
        self.retired.append(old)
        old.signal(signal.SIGTERM)
        code = await exit_code(old, GRACE + 5)
        assert code == 0, f"{old.host} exited {code} on SIGTERM\n{tail(old)}"
        assert not group_alive(old.pid), f"{old.host} left workers behind"
        self.dns.set([a for a in self.dns.addresses if a != old.host])

    def tails(self) -> str:
        return "\n".join([*(tail(r) for r in self.replicas), self.nginx.tail()])


async def probe(session: aiohttp.ClientSession, url: str) -> int | str:
    """One GET on a new connection: the status, or the error's name."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5),
                               headers={"Connection": "close"}) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


def self_signed(directory: Path) -> Path:
    """tls.crt/tls.key for 127.0.0.1 in `directory` (as deploy/compose.tls.yml mounts them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir()
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return directory


@dataclass
class Addresses:
    """A private corner of 127.0.0.0/8: replicas at .10 and up, a front proxy at .5."""

    prefix: str = field(default_factory=lambda: f"127.{random.randint(100, 199)}."
                                                f"{random.randint(0, 255)}.")
    next_host: itertools.count[int] = field(default_factory=lambda: itertools.count(10))

    @property
    def front_proxy(self) -> str:
        return f"{self.prefix}5"

    def replica(self) -> str:
        return f"{self.prefix}{next(self.next_host)}"


@contextlib.asynccontextmanager
async def topology(tmp_path: Path, redis_url: str, *, replicas: int, env: dict[str, str],
                   tls_port: int | None = None) -> AsyncIterator[Topology]:
    """Start `replicas` chatservers behind nginx, named by a DNS stub; stop all by PID after."""
    nginx_port = free_port()
    base = f"http://127.0.0.1:{nginx_port}"
    prefix = f"topo-{uuid.uuid4().hex[:8]}:"
    addresses = Addresses()
    port = free_port()  # every replica listens on it, each on its own address
    server_env = {
        "CHAT_REDIS_PREFIX": prefix,
        "CHAT_ALLOWED_ORIGINS": base,
        "CHAT_COOKIE_SECURE": "0",  # plain http, as in compose
        "CHAT_DEV_AUTH": "1",  # the dev sign-in through nginx, as in compose
        "CHAT_TRUSTED_PROXIES": "127.0.0.1",  # nginx's address (compose: its static IP)
        "CHAT_GRACE": str(GRACE),
        **env,
    }
    started: list[Replica] = []

    def make_replica() -> Replica:
        replica = Replica(addresses.replica(), port, redis_url, server_env, tmp_path)
        started.append(replica)
        return replica

    servers = [make_replica() for _ in range(replicas)]
    runtime = tmp_path / "nginx"
    (runtime / "tls.d").mkdir(parents=True)
    for path in (tmp_path, runtime):  # nginx's workers run as nobody and write temp files here
        path.chmod(0o755)
    dns = NameServer("chatserver")
    await dns.start()
    conf = runtime / "nginx.conf"
    conf.write_text(render_nginx.render(
        (ROOT / "deploy" / "nginx.conf").read_text(),
        listen=f"127.0.0.1:{nginx_port}",
        resolver=f"127.0.0.1:{dns.port}",
        upstream=f"chatserver:{port}",
        real_ip_from=[addresses.front_proxy],
        runtime_dir=runtime,
    ))
    if tls_port is not None:  # what deploy/compose.tls.yml mounts
        (runtime / "tls.d" / "tls.conf").write_text(render_nginx.render_tls(
            (ROOT / "deploy" / "tls.conf").read_text(),
            listen=f"127.0.0.1:{tls_port}", cert_dir=self_signed(tmp_path / "certs")))
    nginx = Nginx(runtime, conf)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    cookie_jar=aiohttp.DummyCookieJar())
    topo = Topology(redis_url, prefix, servers, nginx, dns, base, session, make_replica,
                    addresses.front_proxy)
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
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in started))
            await session.close()
            dns.close()


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
    tmp_path: Path, redis_url: str
) -> None:
    """Through nginx, clients land on several replicas and all receive each other's messages."""
    changed, stop = asyncio.Condition(), asyncio.Event()
    async with topology(tmp_path, redis_url, replicas=3,
                        env={"CHAT_LOGIN_RATE": "1000"}) as topo:
        clients, tasks = await start_clients(topo, 12, 1, changed, stop)
        try:
            replicas = {topo.replica_of(c.instances[-1]) for c in clients}
            assert None not in replicas
            assert len(replicas) >= 2, f"nginx put every client on {replicas}"
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


async def probe_loop(topo: Topology, stop: asyncio.Event) -> None:
    """HTTP load through nginx while replicas come and go: every answer is recorded."""
    while not stop.is_set():
        topo.probes.append(await probe(topo.session, f"{topo.base}/healthz"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.02):
                await stop.wait()


async def test_rolling_update_and_crash_lose_nothing(tmp_path: Path, redis_url: str) -> None:
    """40 clients under load through a rolling update (deploy/rolling-update.sh's steps) and
    a SIGKILL: no 502, every client resumed, every message held exactly once."""
    changed, stop, stop_sending = asyncio.Condition(), asyncio.Event(), asyncio.Event()
    async with topology(tmp_path, redis_url, replicas=3,
                        env={"CHAT_LOGIN_RATE": "1000", "CHAT_HISTORY_MAXLEN": "100000"}) as topo:
        clients, tasks = await start_clients(topo, 40, 5, changed, stop)
        senders: list[asyncio.Task[None]] = []
        prober = asyncio.create_task(probe_loop(topo, stop))
        try:
            assert len({topo.replica_of(c.instances[-1]) for c in clients}) >= 2
            await seed_rooms(clients, changed)
            # Each client: 2 msg/s to its group room, every 10th to the lobby.
            senders = [asyncio.create_task(sender(c, stop_sending, 0.5, 10)) for c in clients]
            before = {c.username: c.connections for c in clients}
            old_hosts = {r.host for r in topo.replicas}
            started = time.monotonic()
            for index in range(len(topo.replicas)):  # the rolling update
                await topo.replace(index)
                await wait_until(lambda: all_ready(clients), changed, 15,
                                 f"clients of the old replica {index} to come back")
            took = time.monotonic() - started
            assert not old_hosts & set(topo.dns.addresses)
            resumed = sum(c.connections > before[c.username] for c in clients)
            update_closes = [x for c in clients for x in c.closes]
            refused = [x for x in update_closes if isinstance(x, str)]
            bad_probes = [p for p in topo.probes if p != 200]
            print(f"rolling update: 3 replicas replaced in {took:.1f}s (nginx learned each new "
                  f"address in {', '.join(f'{s:.1f}s' for s in topo.learned)}); "
                  f"{len(topo.probes)} HTTP probes through nginx, non-200: {bad_probes}; "
                  f"clients resumed {resumed}/{len(clients)}; closes {sorted(set(map(str, update_closes)))}")
            assert not bad_probes, f"HTTP answers other than 200 during the update: {bad_probes}"
            assert not refused, f"handshakes refused or failed during the update: {refused[:5]}"
            assert resumed == len(clients), "every client sat on an old replica"
            assert set(update_closes) == {1001}

            # Crash: SIGKILL the replica holding the most clients, workers and all. Docker
            # drops a dead container from DNS and `restart:` brings it back at its address.
            counts = [sum(1 for c in clients if topo.replica_of(c.instances[-1]) == i)
                      for i in range(3)]
            victim = counts.index(max(counts))
            victims = [c for c in clients if topo.replica_of(c.instances[-1]) == victim]
            assert victims
            os.killpg(topo.replicas[victim].pid, signal.SIGKILL)  # its session: workers too
            assert await exit_code(topo.replicas[victim], 5) == -signal.SIGKILL
            topo.dns.set([a for a in topo.dns.addresses if a != topo.replicas[victim].host])
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
            total = sum(len(ids) for ids in expected.values())
            print(f"after the update and the crash: {total} messages, each held exactly once "
                  f"by every member of its room (lost 0, duplicated 0)")
            assert total > 300, "too little load"
            errors = [e for c in clients for e in c.errors if e.get("code") != "unavailable"]
            assert not errors, errors[:5]
        finally:
            stop_sending.set()
            stop.set()
            for task in senders:
                task.cancel()
            await asyncio.wait_for(
                asyncio.gather(*tasks, *senders, prober, return_exceptions=True), 10 * SCALE)


async def login_status(session: aiohttp.ClientSession, topo: Topology, username: str,
                       forwarded: str) -> int:
    """One dev sign-in through nginx claiming `forwarded` as the client; the status."""
    async with asyncio.timeout(10 * SCALE), session.post(
        f"{topo.base}/auth/login", json={"username": username, "password": "pw"},
        headers={"Origin": topo.origin, "X-Forwarded-For": forwarded},
    ) as resp:
        return resp.status


async def test_real_client_ip_reaches_the_sign_in_limit(tmp_path: Path, redis_url: str) -> None:
    """Behind the trusted front proxy each client address has its own sign-in limit; from
    anyone else X-Forwarded-For is ignored, so spoofing it dodges nothing."""
    rate = 3
    attempts = 2 * rate + 1  # two windows' worth plus one: a window may roll over meanwhile
    async with topology(tmp_path, redis_url, replicas=1,
                        env={"CHAT_LOGIN_RATE": str(rate)}) as topo:
        front = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(topo.front_proxy, 0)),
            cookie_jar=aiohttp.DummyCookieJar())
        async with front:
            distinct = [await login_status(front, topo, f"ip{n}", f"10.9.8.7, 203.0.113.{n}")
                        for n in range(attempts)]
            assert distinct == [200] * attempts, "one client each: none near its limit"
            same = [await login_status(front, topo, f"same{n}", "203.0.113.200")
                    for n in range(attempts)]
            assert 429 in same, same
        spoofed = [await login_status(topo.session, topo, f"spoof{n}", f"198.51.100.{n}")
                   for n in range(attempts)]
        assert 429 in spoofed, spoofed


async def test_tls_at_nginx_and_metrics_only_on_the_replicas(
    tmp_path: Path, redis_url: str
) -> None:
    """nginx terminates TLS with deploy/tls.conf and a mounted self-signed certificate (a
    Secure cookie, wss), and answers /metrics with 404 however it is spelled."""
    tls_port = free_port()
    https = f"https://127.0.0.1:{tls_port}"
    async with topology(tmp_path, redis_url, replicas=1, tls_port=tls_port,
                        env={"CHAT_COOKIE_SECURE": "1", "CHAT_ALLOWED_ORIGINS": https}) as topo:
        trust = ssl.create_default_context(cafile=tmp_path / "certs" / "tls.crt")
        secure = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust),
                                       cookie_jar=aiohttp.DummyCookieJar())
        async with secure, asyncio.timeout(20 * SCALE):
            async with secure.post(f"{https}/auth/login", headers={"Origin": https},
                                   json={"username": "tls-user", "password": "pw"}) as resp:
                assert resp.status == 200, await resp.text()
                cookie = resp.cookies["__Host-authToken"]  # Secure: prefixed
                assert cookie["secure"] and cookie["httponly"]
            async with secure.ws_connect(
                f"wss://127.0.0.1:{tls_port}/ws", heartbeat=None,
                headers={"Origin": https, "Cookie": f"__Host-authToken={cookie.value}"},
            ) as ws:
                welcome = await ws.receive_json()
                assert welcome["type"] == "welcome", welcome

            for base, session in ((topo.base, topo.session), (https, secure)):
                for path in ("/metrics", "/metrics/", "/%6detrics", "//metrics", "/metrics?x=1"):
                    url = yarl.URL(f"{base}{path}", encoded=True)
                    async with session.get(url) as resp:
                        assert resp.status == 404, f"{url}: {resp.status}"
            async with topo.session.get(f"{topo.replicas[0].url}/metrics") as resp:
                assert resp.status == 200 and "chatserver_" in await resp.text()
