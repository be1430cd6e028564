"""A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` nodes on free
ports of 127.0.0.1, joined by `redis-cli --cluster create` as three primaries with one
replica each, stopped by PID; and moving one hash slot between primaries the way
`redis-cli --cluster reshard` does, one step at a time so a test can act in between."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

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

    def owner(self, key: str) -> RedisServer:
        """The primary serving `key`'s slot, as the first primary sees the slot map."""
        slot = self.keyslot(key)
        for low, high, (_host, port, *_), *_ in cluster_command(
                self.primaries()[0], "CLUSTER", "SLOTS"):
            if low <= slot <= high:
                return next(n for n in self.nodes if n.port == int(port))
        raise AssertionError(f"no primary serves slot {slot}")

    def keyslot(self, key: str) -> int:
        return int(cluster_command(self.nodes[0], "CLUSTER", "KEYSLOT", key))

    def flush(self) -> None:
        for node in self.primaries():
            node.command("FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster_deployment(workdir: Path) -> ClusterDeployment:
    return started(ClusterDeployment(workdir))


def cluster_command(node: RedisServer, *args: Any) -> Any:
    """One command to one node (CLUSTER SETSLOT and the like address a node, not a key),
    its reply decoded."""
    with redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True,
                     socket_timeout=scaled(5)) as client:
        return client.execute_command(*args)


def node_id(node: RedisServer) -> str:
    return str(cluster_command(node, "CLUSTER", "MYID"))


def begin_migration(slot: int, source: RedisServer, target: RedisServer) -> None:
    """Mark the slot importing on the target and migrating on the source: the source
    still serves the keys it holds and sends ASK for the ones it does not."""
    cluster_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
    cluster_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))


def move_keys(slot: int, source: RedisServer, target: RedisServer) -> int:
    """MIGRATE every key of the slot to the target, in batches; how many moved."""
    moved = 0
    while keys := cluster_command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
        cluster_command(source, "MIGRATE", "127.0.0.1", target.port, "", 0,
                        int(scaled(5000)), "KEYS", *keys)
        moved += len(keys)
    return moved


def assign_slot(slot: int, target: RedisServer, primaries: list[RedisServer]) -> None:
    """End the migration: the target owns the slot, told to the target first (it bumps
    its config epoch), then the source and every other primary, as redis-cli does."""
    owner = node_id(target)
    for node in sorted(primaries, key=lambda n: n is not target):
        cluster_command(node, "CLUSTER", "SETSLOT", slot, "NODE", owner)
