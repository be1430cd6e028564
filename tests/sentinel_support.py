"""A real Sentinel deployment for tests: a primary, one replica (`--replicaof`) and three
sentinels (`redis-server <conf> --sentinel`), on free ports of 127.0.0.1, stopped by PID.

Sentinel's timings are set low (down after 1 s, failover timeout 3 s) so a test's
failover takes seconds; everything else is Redis's defaults.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import RedisServer, free_port, started, stop_process, wait_for

MASTER = "chatmaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def resp_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command in RESP; the raw reply (small replies only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
        sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
        return sock.recv(65536)


class SentinelProcess:
    """One sentinel; its config file is its own (Sentinel rewrites it)."""

    def __init__(self, workdir: Path, primary_port: int) -> None:
        self.port = free_port()
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\ndir {workdir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen([binary, str(self.conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def master_state(self) -> dict[str, str]:
        """SENTINEL MASTER <name> as a dict; empty when the sentinel does not answer."""
        try:
            reply = resp_command(self.port, "SENTINEL", "MASTER", MASTER)
        except OSError:
            return {}
        lines = [line for line in reply.decode(errors="replace").split("\r\n")
                 if line and line[0] not in "*$"]
        return dict(zip(lines[::2], lines[1::2], strict=False))

    def primary_port(self) -> int | None:
        try:
            reply = resp_command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        except OSError:
            return None
        lines = [line for line in reply.decode().split("\r\n") if line and line[0] not in "*$"]
        return int(lines[1]) if len(lines) == 2 else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)


class SentinelDeployment:
    """Primary + replica + three sentinels. `url` is the chatserver REDIS_URL for it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(workdir / "replica")
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    def start(self) -> None:
        for server in self.nodes:
            server.workdir.mkdir(parents=True, exist_ok=True)
            server.start()
        wait_for(lambda: b"master_link_status:up" in self.replica.command("INFO", "replication"),
                 10, "the replica to sync")
        self.sentinels = [SentinelProcess(self.workdir, self.primary.port) for _ in range(3)]
        for sentinel in self.sentinels:
            sentinel.start()
        # A failover needs every sentinel to know the replica and its two peers.
        wait_for(lambda: all(self._ready(s) for s in self.sentinels), 20,
                 "sentinels to see the replica and each other")

    @staticmethod
    def _ready(sentinel: SentinelProcess) -> bool:
        state = sentinel.master_state()
        return state.get("num-slaves") == "1" and state.get("num-other-sentinels") == "2"

    def current_primary(self) -> RedisServer:
        """The node the sentinels name as primary now."""
        ports = {s.primary_port() for s in self.sentinels} - {None}
        (port,) = ports
        return next(node for node in self.nodes if node.port == port)

    def wait_promoted(self, old: RedisServer, timeout: float = 20) -> tuple[RedisServer, float]:
        """Until every sentinel names another node and that node says it is a master;
        returns it and the seconds waited."""
        started = time.monotonic()

        def promoted() -> bool:
            ports = {s.primary_port() for s in self.sentinels}
            if len(ports) != 1 or ports == {old.port} or None in ports:
                return False
            node = next(n for n in self.nodes if n.port in ports)
            return b"role:master" in node.command("INFO", "replication")

        wait_for(promoted, timeout, "a replica to be promoted")
        return self.current_primary(), time.monotonic() - started

    def flush(self) -> None:
        self.current_primary().command("FLUSHALL")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.nodes:
            server.stop()


def start_sentinel_deployment(workdir: Path) -> SentinelDeployment:
    return started(SentinelDeployment(workdir))

