"""The chatserver command with bad configuration: exit 2 and one clear line (the settings
loader itself is unit-tested in tests/unit/test_settings.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import RedisServer, base_env


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        ([], {"PORT": "not-a-port"}, "PORT"),
        ([], {"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
        ([], {"REDIS_URL": "redis+sentinel://127.0.0.1:26379"}, "master-name"),
        (["--redis-url", "redis+sentinel://h:1,,h:2/m"], {}, "--redis-url"),
        (["--workers", "2"], {}, "REDIS_URL"),
        (["--host", "0.0.0.0"], {}, "CHAT_DEV_AUTH"),
    ],
)
def test_cli_exits_2_with_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                   fragment: str) -> None:
    """A bad start-up value: exit status 2 and a single line on stderr, no traceback."""
    result = subprocess.run([sys.executable, "-m", "chatserver", *args], env=base_env(env),
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_url_at_a_plain_node_exits_2(tmp_path: Path, redis_server: RedisServer) -> None:
    """redis+cluster:// pointed at a node with cluster mode off: exit 2, one line."""
    url = f"redis+cluster://127.0.0.1:{redis_server.port}"
    result = subprocess.run([sys.executable, "-m", "chatserver", "--redis-url", url],
                            env=base_env({}), cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cluster mode off" in lines[0], result.stderr
