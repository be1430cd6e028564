"""A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` nodes on free
ports of 127.0.0.1, joined by `redis-cli --cluster create` as three primaries with one
replica each, stopped by PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import RedisServer, free_port, scaled, started, wait_for

NODE_TIMEOUT_MS = 2000  # how soon a dead primary's replica is promoted
BUS_OFFSET = 10000  # Redis puts a node's cluster bus on its port + 10000


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET > 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            continue
        return port


class ClusterDeployment:
    """Three primaries, three replicas. `url` is the chatserver REDIS_URL for it."""

    def __init__(self, workdir: Path, size: int = 6) -> None:
        self.nodes = [RedisServer(workdir / f"node-{i}", cluster_port()) for i in range(size)]
        for node in self.nodes:
            node.extra = ["--cluster-enabled", "yes", "--cluster-config-file",
                          str(node.workdir / "nodes.conf"),
                          "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed (Debian's redis-tools; .ci/run installs it)")
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=scaled(30))
        wait_for(lambda: all(self._ok(n) for n in self.nodes), 30, "the cluster to be ok")

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        """Its view of the cluster is whole, and a replica has synced (else it could not
        be promoted)."""
        info = node.command("CLUSTER", "INFO")
        if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
            return False
        replication = node.command("INFO", "replication")
        return b"role:master" in replication or b"master_link_status:up" in replication

    def primaries(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None
                and b"role:master" in n.command("INFO", "replication")]

    def flush(self) -> None:
        for node in self.primaries():
            node.command("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster_deployment(workdir: Path) -> ClusterDeployment:
    return started(ClusterDeployment(workdir))
