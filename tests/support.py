"""Test support: a real redis-server, real `chatserver` processes, dev sign-in clients.

Fixtures in conftest.py build on these; tests import the helpers from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Timing constants in tests scale with this, so a slow CI machine is not flaky.
SCALE = float(os.environ.get("CHAT_TEST_TIMEOUT_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * SCALE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ------------------------------------------------------------------- redis


class Deployment(Protocol):
    """A set of servers started and stopped together (a cluster, a Sentinel set)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


D = TypeVar("D", bound=Deployment)


def started(deployment: D) -> D:
    """Start it; if that fails half way, stop whatever did start before raising."""
    try:
        deployment.start()
    except BaseException:
        deployment.stop()
        raise
    return deployment


class RedisServer:
    """A private redis-server; kill() and start() again on the same port for outages."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server options, after the defaults

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command (inline protocol) and return the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
            return sock.recv(65536)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)


# ------------------------------------------------------------------ servers


class ServerProcess:
    """A real `chatserver` command; `url` is http://127.0.0.1:<port>."""

    def __init__(self, args: list[str], env: dict[str, str], port: int, workers: int,
                 cwd: Path, log_path: Path) -> None:
        self.args, self.env, self.port, self.workers = args, env, port, workers
        self.cwd, self.log_path = cwd, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def origin(self) -> str:
        return self.url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait: bool = True) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        """Until every worker answers /healthz (each connection lands on some worker)."""
        seen: set[str] = set()

        def all_up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatserver exited with {self.proc.returncode}:\n{self.log()}")
            instance = self.instance_answering()
            if instance:
                seen.add(instance)
            return len(seen) >= self.workers

        wait_for(all_up, timeout, f"{self.workers} workers on port {self.port}")

    def instance_answering(self) -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            # workers are in the command's session; none may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """The machine's environment without any chatserver settings, plus `extra`."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("CHAT_", "AWS_", "REDIS_", "PROMETHEUS_")) and k != "PORT"}
    keep["CHAT_COOKIE_SECURE"] = "0"
    keep.update(extra)
    return keep


# ------------------------------------------------------------------ clients


def cookie_session(token: str | None = None) -> aiohttp.ClientSession:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    session = aiohttp.ClientSession(cookie_jar=jar)
    if token is not None:
        session.cookie_jar.update_cookies({"authToken": token})
    return session


async def sign_in(server: ServerProcess, username: str) -> aiohttp.ClientSession:
    """A session holding the cookies of a dev sign-in."""
    session = cookie_session()
    async with session.post(f"{server.url}/auth/login", json={"username": username,
                            "password": ""}, headers={"Origin": server.origin}) as response:
        assert response.status == 200, await response.text()
    return session


async def open_ws(session: aiohttp.ClientSession, server: ServerProcess,
                  query: str = "", **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(server.ws_url + query, headers={"Origin": server.origin},
                                    **kwargs)


async def receive_until(ws: aiohttp.ClientWebSocketResponse, predicate: Callable[[dict[str, Any]], bool],
                        timeout: float = 10) -> dict[str, Any]:
    """The first JSON frame matching predicate; frames before it are dropped."""
    async with asyncio.timeout(scaled(timeout)):
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"socket ended: {msg.type} {msg.data} {msg.extra}")
            frame: dict[str, Any] = json.loads(msg.data)
            if predicate(frame):
                return frame


def of_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") == kind and all(f.get(k) == v for k, v in fields.items())


async def close_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> tuple[int | None, str]:
    """Read until the server closes; return (close code, reason)."""
    async with asyncio.timeout(scaled(timeout)):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
                return ws.close_code, str(msg.extra or "")
            if msg.type == aiohttp.WSMsgType.ERROR:
                return ws.close_code, str(msg.data)
