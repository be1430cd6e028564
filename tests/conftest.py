"""Fixtures: a real redis-server on a free port, real `chatserver` processes, and the
dev signing key. Every process started here is stopped by its PID at teardown.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from chatserver.auth.dev import DevIssuer, new_private_key_pem
from tests.cluster_support import ClusterDeployment, start_cluster_deployment
from tests.sentinel_support import SentinelDeployment, start_sentinel_deployment
from tests.support import RedisServer, ServerProcess, base_env, free_port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests that kill Redis use make_redis instead."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied for this test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    started: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def sentinel_deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SentinelDeployment]:
    """One primary, replica and three sentinels for the session; tests that fail it over
    use make_sentinel instead."""
    deployment = start_sentinel_deployment(tmp_path_factory.mktemp("sentinel"))
    yield deployment
    deployment.stop()


@pytest.fixture
def sentinel_url(sentinel_deployment: SentinelDeployment) -> str:
    """The session Sentinel deployment's REDIS_URL, its primary emptied for this test."""
    sentinel_deployment.flush()
    return sentinel_deployment.url


@pytest.fixture
def make_sentinel(tmp_path: Path) -> Iterator[Callable[[], SentinelDeployment]]:
    """Factory: a Sentinel deployment of this test's own, stopped at teardown."""
    started: list[SentinelDeployment] = []

    def make() -> SentinelDeployment:
        deployment = start_sentinel_deployment(tmp_path / f"sentinel-{len(started)}")
        started.append(deployment)
        return deployment

    yield make
    for deployment in started:
        deployment.stop()


@pytest.fixture(scope="session")
def cluster_deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ClusterDeployment]:
    """Three primaries and three replicas for the session."""
    deployment = start_cluster_deployment(tmp_path_factory.mktemp("cluster"))
    yield deployment
    deployment.stop()


@pytest.fixture
def cluster_url(cluster_deployment: ClusterDeployment) -> str:
    """The session cluster's REDIS_URL, its primaries emptied for this test."""
    cluster_deployment.flush()
    return cluster_deployment.url


@pytest.fixture(scope="session")
def dev_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("devkey") / "dev-key.pem"
    path.write_bytes(new_private_key_pem())
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def dev_issuer(dev_key_file: Path) -> DevIssuer:
    """Mints tokens that servers started with CHAT_DEV_KEY_FILE=dev_key_file accept."""
    return DevIssuer(dev_key_file.read_bytes())


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: make_server(workers=1, redis_url=None, env={}, start=True)."""
    started: list[ServerProcess] = []

    def make(*, workers: int = 1, redis_url: str | None = None, env: dict[str, str] | None = None,
             port: int | None = None, start: bool = True, extra_args: list[str] | None = None
             ) -> ServerProcess:
        port = port or free_port()
        args = [sys.executable, "-m", "chatserver", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), *(extra_args or [])]
        if redis_url:
            args += ["--redis-url", redis_url]
        server = ServerProcess(args, base_env(env or {}), port, workers, tmp_path,
                               tmp_path / f"chatserver-{port}.log")
        started.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
async def sessions() -> AsyncIterator[list[aiohttp.ClientSession]]:
    """Collects client sessions a test opens, and closes them."""
    opened: list[aiohttp.ClientSession] = []
    yield opened
    for session in opened:
        await session.close()
