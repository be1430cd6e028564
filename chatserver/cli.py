"""The `chatserver` command: settings, then one worker in-process or N supervised workers.

Workers are child processes of this command (no daemonizing), each binding the port
with SO_REUSEPORT so the kernel spreads connections evenly; a worker that dies is
restarted; SIGTERM/SIGINT drain every worker within the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .broker.redis.client import cluster_mode_refused
from .config import ConfigError, Settings, load_settings
from .config import warnings as config_warnings
from .observability import setup_logging
from .redis_urls import parse_target

log = logging.getLogger("chatserver")

WORKER_ENV = "CHATSERVER_WORKER"
CRASH_WINDOW = 5.0  # a worker dying sooner than this after its start counts as a crash loop
MAX_QUICK_CRASHES = 5
ACCEPT_WHILE_DRAINING = 1.0  # seconds a draining worker still accepts (and answers 503)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chatserver", description="WebSocket chat server (aiohttp + Redis)"
    )
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=None, help="port (default $PORT or 3020)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    parser.add_argument("--redis-url", default=None, help="Redis URL (default $REDIS_URL)")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    return parser.parse_args(argv)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 1 and 65535")
    return port


def _check_cluster(url: str | None) -> None:
    """A cluster URL pointed at a node with cluster mode off stops start-up (ConfigError)."""
    target = parse_target(url) if url else None
    if target is not None and target.mode == "cluster":
        refused = cluster_mode_refused(target)
        if refused is not None:
            raise ConfigError(f"REDIS_URL (or --redis-url): {refused}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {"host": args.host, "port": args.port, "workers": args.workers,
                 "redis_url": args.redis_url}
    try:
        settings = load_settings(env_file=Path(args.env_file), overrides=overrides)
        if not os.environ.get(WORKER_ENV):  # once, in the command, not in every worker
            _check_cluster(settings.redis_url)
    except ConfigError as exc:
        print(f"chatserver: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.log_level)
    if not os.environ.get(WORKER_ENV):
        for warning in config_warnings(settings):
            log.warning("configuration: %s", warning)
    if os.environ.get(WORKER_ENV) or settings.workers == 1:
        sys.exit(run_worker(settings, reuse_port=bool(os.environ.get(WORKER_ENV))))
    sys.exit(Supervisor(settings, sys.argv[1:] if argv is None else argv).run())


# ------------------------------------------------------------------- worker


def run_worker(settings: Settings, *, reuse_port: bool) -> int:
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            runner.run(serve(settings, reuse_port=reuse_port))
        except OSError as exc:
            reason = exc.strerror or exc
            log.error("cannot serve on %s:%s: %s", settings.host, settings.port, reason)
            return 1
    return 0


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    from .app import ENDPOINT, create_app  # the supervisor never needs the app
    from .guard import HeadGuard
    from .observability import Metrics

    if settings.dev_auth:
        log.warning(
            "DEV SIGN-IN IS ON: anyone can sign in with any username "
            "(set AWS_COGNITO_USER_POOL_ID and AWS_COGNITO_CLIENT_ID for Cognito)"
        )
    metrics = Metrics()
    app = await create_app(settings, metrics=metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=settings.grace)
    await runner.setup()
    loop = asyncio.get_running_loop()
    listener: asyncio.Server | None = None
    closing: asyncio.Task[None] | None = None
    try:
        assert runner.server is not None  # made by setup()
        guard = HeadGuard(runner.server, timeout=settings.head_timeout,
                          per_ip=settings.half_open_per_ip, exempt=settings.trusted_proxies,
                          half_open=metrics.half_open, dropped=metrics.half_open_dropped)
        listener = await loop.create_server(guard, settings.host, settings.port,
                                            reuse_port=reuse_port, backlog=1024)
        log.info("listening on http://%s:%s (pid %d)", settings.host, settings.port, os.getpid())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        # Close every socket 1001 now, so its client reconnects to another instance at
        # once, and refuse upgrades (503: a proxy retries them elsewhere); keep accepting
        # a moment, so connections already in the accept queue are answered, not reset.
        log.info("draining: closing sockets with 1001")
        closing = asyncio.create_task(app[ENDPOINT].drain())
        await asyncio.sleep(min(ACCEPT_WHILE_DRAINING, settings.grace / 4))
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()  # on_shutdown: the drain again, done within CHAT_GRACE
        if closing is not None:
            await closing


# --------------------------------------------------------------- supervisor


class Supervisor:
    """Runs N worker processes, restarts the ones that die, stops them all on a signal."""

    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        self.argv = argv
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self.stopping = False
        self.metrics_dir = tempfile.mkdtemp(prefix="chatserver-metrics-")

    def run(self) -> int:
        try:
            holder = self._hold_port()
        except OSError as exc:
            log.error("cannot bind %s:%s: %s", self.settings.host, self.settings.port, exc)
            return 1
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for _ in range(self.settings.workers):
                self._spawn()
            return self._watch()
        finally:
            self._stop_all()
            holder.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _hold_port(self) -> socket.socket:
        """Fail once, here, if the port is taken (by anyone, another chatserver included:
        the probe does not set SO_REUSEPORT), then hold it bound without listening."""
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((self.settings.host, self.settings.port))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.settings.port))
        return sock

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _spawn(self) -> None:
        env = dict(os.environ, **{WORKER_ENV: "1", "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir})
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatserver", *self.argv],
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.children[proc.pid] = (proc, time.monotonic())
        log.info("worker %d started", proc.pid)

    def _watch(self) -> int:
        quick_crashes = 0
        while not self.stopping:
            time.sleep(0.1)
            for pid, (proc, started) in list(self.children.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                del self.children[pid]
                _mark_dead(pid, self.metrics_dir)
                log.warning("worker %d exited with status %s; restarting it", pid, code)
                quick = time.monotonic() - started < CRASH_WINDOW
                quick_crashes = quick_crashes + 1 if quick else 0
                if quick_crashes >= MAX_QUICK_CRASHES:
                    log.error("workers keep dying at start-up; giving up")
                    return 1
                if quick:
                    time.sleep(min(0.2 * 2**quick_crashes, 5.0))
                self._spawn()
        return 0

    def _stop_all(self) -> None:
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace + 2.0
        for proc, _ in self.children.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the supervisor is killed, so none is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _mark_dead(pid: int, metrics_dir: str) -> None:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
