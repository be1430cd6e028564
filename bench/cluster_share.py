"""What each Redis process spends per 1,000 publishes, on one node and on a cluster of
three primaries (a replica each): the same `chatserver --workers 2` and the same room
traffic (bench/room_load.py) against each, every process on 127.0.0.1 and stopped by PID.

    .venv/bin/python bench/cluster_share.py [--rooms 30] [--rate 20] [--duration 15]

Redis CPU is read from each process's INFO cpu (used_cpu_user + used_cpu_sys, the whole
process) right before the first publish and after the last delivery; idle cost (pings,
presence refreshes, the cluster bus) is measured the same way over --idle seconds with
every socket open, and reported apart. One JSON line per mode on stdout, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test fixtures' Redis and chatserver starters

from bench.room_load import Load, Result, run_load  # noqa: E402
from chatserver.auth.dev import DevIssuer, new_private_key_pem  # noqa: E402
from tests.cluster_support import ClusterDeployment, start_cluster_deployment  # noqa: E402
from tests.support import RedisServer, ServerProcess, base_env, free_port, started  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def redis_info(node: RedisServer, section: str) -> dict[str, str]:
    info = node.command("INFO", section).decode()
    return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)


def redis_cpu(node: RedisServer) -> float:
    """CPU seconds the process has used (INFO cpu: user + sys)."""
    fields = redis_info(node, "cpu")
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def redis_reads(node: RedisServer) -> int:
    """Reads from clients so far: about one per pipeline a worker sent (INFO stats)."""
    return int(redis_info(node, "stats")["total_reads_processed"])


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the chatserver command and workers)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / TICK  # utime, stime
        todo += [int(child) for child in children]
    return total


class Single:
    """One redis-server, no replica."""

    name = "one node"

    def __init__(self, workdir: Path) -> None:
        self.node = RedisServer(workdir)
        self.url = self.node.url

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def roles(self, rooms: list[str]) -> list[tuple[str, RedisServer, list[str]]]:
        return [("node", self.node, rooms)]


class Cluster:
    """Three primaries with a replica each (tests/cluster_support.py)."""

    name = "cluster 3x2"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.deployment: ClusterDeployment | None = None

    @property
    def url(self) -> str:
        assert self.deployment is not None
        return self.deployment.url

    def start(self) -> None:
        self.deployment = start_cluster_deployment(self.workdir)

    def stop(self) -> None:
        if self.deployment is not None:
            self.deployment.stop()

    def roles(self, rooms: list[str]) -> list[tuple[str, RedisServer, list[str]]]:
        assert self.deployment is not None
        primaries = self.deployment.primaries()
        owned: dict[int, list[str]] = {node.port: [] for node in primaries}
        for room in rooms:
            owned[self.deployment.owner(f"chat:{{{room}}}:history").port].append(room)
        rows = [("primary", node, owned[node.port]) for node in primaries]
        rows += [("replica", node, []) for node in self.deployment.nodes
                 if node not in primaries]
        return rows


def start_server(url: str, workdir: Path, key_file: Path, workers: int) -> ServerProcess:
    port = free_port()
    args = [sys.executable, "-m", "chatserver", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--redis-url", url]
    # CHAT_RATE=0: a publisher at 20/s is past the per-socket default of 10/s.
    env = base_env({"CHAT_DEV_KEY_FILE": str(key_file), "CHAT_RATE": "0",
                    "CHAT_LOG_LEVEL": "WARNING"})
    server = ServerProcess(args, env, port, workers, workdir, workdir / f"chatserver-{port}.log")
    server.start()
    return server


def measure(mode: Single | Cluster, args: argparse.Namespace, workdir: Path,
            issuer: DevIssuer, key_file: Path) -> dict[str, Any]:
    rooms = [f"room-{n}" for n in range(args.rooms)]
    load = Load(rooms, args.subscribers, args.rate, args.duration)
    started(mode)
    server = None
    try:
        server = start_server(mode.url, workdir, key_file, args.workers)
        roles = mode.roles(rooms)
        marks: dict[str, Any] = {}

        async def ready() -> None:  # every socket open: the idle window, then the start
            idle0 = [redis_cpu(node) for _, node, _ in roles]
            await asyncio.sleep(args.idle)  # a window of time, not a wait for an event
            marks["idle"] = [(redis_cpu(n) - c) / args.idle for (_, n, _), c in
                             zip(roles, idle0, strict=True)]
            marks["redis"] = [redis_cpu(node) for _, node, _ in roles]
            marks["reads"] = [redis_reads(node) for _, node, _ in roles]
            marks["server"] = tree_cpu(server.pid)
            marks["start"] = time.monotonic()

        async def done() -> None:  # the last delivery in, no socket closed yet
            marks["redis_after"] = [redis_cpu(node) for _, node, _ in roles]
            marks["reads_after"] = [redis_reads(node) for _, node, _ in roles]
            marks["server_cpu"] = tree_cpu(server.pid) - marks["server"]
            marks["window"] = time.monotonic() - marks["start"]

        result: Result = asyncio.run(asyncio.wait_for(run_load(
            server.ws_url, server.origin, issuer.mint, load, ready, done), args.duration + 120))
    finally:
        if server is not None:
            server.stop()
        mode.stop()
    publishes = sum(result.acked.values())
    rows = []
    for (role, node, owned), before, after, idle, reads in zip(
            roles, marks["redis"], marks["redis_after"], marks["idle"],
            [b - a for a, b in zip(marks["reads"], marks["reads_after"], strict=True)],
            strict=True):
        own = sum(result.acked[room] for room in owned)
        cpu = after - before
        net = cpu - idle * marks["window"]  # what the publishes cost beyond idling
        rows.append({"role": role, "port": node.port, "rooms": len(owned),
                     "publishes": own, "cpu_s": round(cpu, 3),
                     "idle_ms_per_s": round(idle * 1000, 2),
                     "ms_per_1000_own": round(cpu / own * 1e6, 1) if own else None,
                     "net_ms_per_1000_own": round(net / own * 1e6, 1) if own else None,
                     "ms_per_1000_all": round(cpu / publishes * 1e6, 1),
                     "reads_per_1000_own": round(reads / own * 1000) if own else None})
    return {"mode": mode.name, "rooms": args.rooms, "subscribers": args.subscribers,
            "rate": args.rate, "duration": args.duration, "workers": args.workers,
            "publishes": publishes, "seconds": round(result.seconds, 2),
            "window_s": round(marks["window"], 2),
            "publishes_per_s": round(publishes / result.seconds, 1),
            "deliveries_per_s": round(result.deliveries / result.seconds, 1),
            "refused": result.refused, "lost": result.lost, "duplicates": result.duplicates,
            "chatserver_cpu_s": round(marks["server_cpu"], 2), "redis": rows}


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| mode | process | rooms | publishes | CPU s | ms CPU / 1,000 own publishes "
             "(net of idle) | ms CPU / 1,000 of all | idle ms/s | reads / 1,000 own |",
             "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        for row in record["redis"]:
            own = "" if row["ms_per_1000_own"] is None else (
                f"{row['ms_per_1000_own']} ({row['net_ms_per_1000_own']})")
            lines.append(f"| {record['mode']} | {row['role']} :{row['port']} | {row['rooms']} "
                         f"| {row['publishes']} | {row['cpu_s']} | {own} "
                         f"| {row['ms_per_1000_all']} | {row['idle_ms_per_s']} "
                         f"| {row['reads_per_1000_own'] or ''} |")
    lines += ["", "| mode | publishes/s | deliveries/s | refused | lost | duplicates "
              "| chatserver CPU s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['mode']} | {r['publishes_per_s']} | {r['deliveries_per_s']} "
                     f"| {r['refused']} | {r['lost']} | {r['duplicates']} "
                     f"| {r['chatserver_cpu_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=30)
    parser.add_argument("--subscribers", type=int, default=3,
                        help="per room, besides its publisher")
    parser.add_argument("--rate", type=float, default=20.0, help="publishes/s per room")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of publishing")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle window")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="single,cluster")
    args = parser.parse_args()
    # SIGTERM unwinds like an error, so every server this started is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.duration > 120 or args.rooms * (args.subscribers + 1) > 2000:
        parser.error("keep it short: at most 120 s and 2,000 sockets (a shared machine)")
    records = []
    with tempfile.TemporaryDirectory(prefix="cluster-share-") as tmp:
        workdir = Path(tmp)
        key_file = workdir / "dev-key.pem"
        key_file.write_bytes(new_private_key_pem())
        key_file.chmod(0o600)
        issuer = DevIssuer(key_file.read_bytes())
        for name in args.modes.split(","):
            mode_dir = workdir / name
            mode_dir.mkdir()
            mode: Single | Cluster = Single(mode_dir) if name == "single" else Cluster(mode_dir)
            record = measure(mode, args, mode_dir, issuer, key_file)
            print(json.dumps(record), flush=True)
            records.append(record)
    print(table(records))


if __name__ == "__main__":
    main()
