"""Issue 14's idle figure: what 10,000 idle authenticated connections cost one worker.

Starts a private redis-server and `chatserver --workers 1` (dev key, Redis broker,
default heartbeat and presence), opens N connections with `chatserver-loadtest connect
--hold`, waits until all are open, then measures for --seconds: the worker's CPU time
(/proc, user + system), and the Redis commands it caused (INFO commandstats). Prints one
JSON line: microseconds of CPU per connection per second, Redis commands per connection
per minute, and the RSS per connection.

    .venv/bin/python bench/idle_cost.py --connections 10000 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_calls(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines():
        if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info", "cmdstat_ping")):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_connections(url: str) -> int:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("chatserver_connections "):
            return int(float(line.split()[1]))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--profile", type=Path, help="also write py-spy's collapsed stacks of "
                        "the window here (py-spy must be installed; the figures then include "
                        "its sampling)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="idle-cost-"))
    key = work / "dev-key.pem"
    subprocess.run([BIN / "python", "-c", "import sys; from chatserver.auth.dev import "
                    "new_private_key_pem as k; sys.stdout.buffer.write(k())"],
                   stdout=key.open("wb"), check=True)
    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "AWS_", "REDIS"))}
    env.update(CHAT_DEV_KEY_FILE=str(key), CHAT_COOKIE_SECURE="0", CHAT_LOG_LEVEL="WARNING",
               CHAT_MAX_CONNECTIONS=str(args.connections + 100),
               REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    server = subprocess.Popen([BIN / "chatserver", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=work)
    url = f"http://127.0.0.1:{port}"
    load = None
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        hold = args.seconds + 60
        load = subprocess.Popen(
            [BIN / "chatserver-loadtest", "connect", "--url", url, "--clients",
             str(args.connections), "--procs", "2", "--private-key", str(key), "--hold",
             str(hold), "--deadline", str(hold + 120), "--json", "--no-progress"],
            stdout=subprocess.DEVNULL, cwd=work)
        deadline = time.monotonic() + 120
        while open_connections(url) < args.connections:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {open_connections(url)} connections opened")
            time.sleep(0.5)
        time.sleep(2)  # the connect burst's own work (presence batches) is done
        cpu0, calls0, t0 = cpu_seconds(server.pid), redis_calls(redis_port), time.monotonic()
        if args.profile:
            subprocess.run(["py-spy", "record", "-p", str(server.pid), "-d", str(int(args.seconds)),
                            "-r", "200", "--format", "raw", "-o", str(args.profile)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            time.sleep(args.seconds)
        cpu1, calls1, t1 = cpu_seconds(server.pid), redis_calls(redis_port), time.monotonic()
        elapsed, n = t1 - t0, args.connections
        print(json.dumps({
            "connections": n, "seconds": round(elapsed, 1),
            "cpu_us_per_conn_per_s": round((cpu1 - cpu0) / elapsed / n * 1e6, 3),
            "worker_cpu_pct": round((cpu1 - cpu0) / elapsed * 100, 2),
            "redis_commands_per_conn_per_min": round((calls1 - calls0) / n / (elapsed / 60), 4),
            "redis_commands": calls1 - calls0,
            "rss_mb": round(rss_mb(server.pid), 1),
        }))
    finally:
        for proc in (load, server, redis):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
