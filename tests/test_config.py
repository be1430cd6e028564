"""Configuration: the original design's names, CLI over env, one clear line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatserver.config import ConfigError, load_settings
from tests.support import base_env


def test_original_env_names_are_read(tmp_path: Path) -> None:
    """PORT and the AWS_COGNITO_* names of the original .env work unchanged; CLI wins."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=4000\nAWS_REGION=eu-west-1\nAWS_COGNITO_USER_POOL_ID=eu-west-1_abc\n"
                      "AWS_COGNITO_CLIENT_ID=cid\nAWS_COGNITO_CLIENT_SECRET='s3cret'\n")
    settings = load_settings({}, env_file=dotenv)
    assert settings.port == 4000 and settings.cognito_client_secret == "s3cret"
    assert settings.cognito_issuer == "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_abc"
    assert not settings.dev_auth
    assert load_settings({"PORT": "4001"}, env_file=dotenv).port == 4001
    assert load_settings({"PORT": "4001"}, env_file=dotenv, overrides={"port": 4002}).port == 4002
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"REDIS_URL": "mysql://x"}, "REDIS_URL"),
        ({"CHAT_ALLOWED_ORIGINS": "evil"}, "CHAT_ALLOWED_ORIGINS"),
        ({"CHAT_RATE": "fast"}, "CHAT_RATE"),
        ({"CHAT_COOKIE_SECURE": "maybe"}, "CHAT_COOKIE_SECURE"),
        ({"AWS_COGNITO_USER_POOL_ID": "p"}, "AWS_COGNITO_CLIENT_ID"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], fragment: str) -> None:
    """Each bad value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env, env_file=None)


def test_dev_sign_in_refused_off_loopback() -> None:
    """The dev sign-in on a non-loopback address needs CHAT_DEV_AUTH=1."""
    with pytest.raises(ConfigError, match="CHAT_DEV_AUTH"):
        load_settings({}, env_file=None, overrides={"host": "0.0.0.0"})
    assert load_settings({"CHAT_DEV_AUTH": "1"}, env_file=None, overrides={"host": "0.0.0.0"})


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        ([], {"PORT": "not-a-port"}, "PORT"),
        ([], {"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
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
