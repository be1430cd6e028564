"""The settings loader, no process: every setting declared once, every bad value named,
`.env` read by docker compose's rules, and the generated docs in step with the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatserver import settings_docs
from chatserver.config import ConfigError, Settings, declared, load_settings
from chatserver.config import warnings as config_warnings


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



def _numeric() -> list[tuple[str, str]]:
    """(variable, bad value) for every number setting: not a number, and out of range."""
    cases = []
    for spec in declared():
        meta = spec.metadata
        if meta["kind"] is None:
            continue
        cases += [(meta["env"], "lots"), (meta["env"], str(meta["high"] * 10 + 1)),
                  (meta["env"], str(meta["low"] - 1))]
    return cases


@pytest.mark.parametrize(("name", "raw"), _numeric())
def test_every_number_setting_refuses_bad_values(name: str, raw: str) -> None:
    """Each number setting refuses text and values outside its bounds, naming itself."""
    with pytest.raises(ConfigError, match=name):
        load_settings({name: raw}, env_file=None)


@pytest.mark.parametrize(
    ("name", "raw"),
    [("CHAT_COMPRESS", "2"), ("CHAT_DEV_AUTH", "sure"), ("CHAT_TOKEN_USE", "refresh"),
     ("CHAT_LOG_LEVEL", "LOUD"), ("CHAT_TRUSTED_PROXIES", "10.0.0.0/33"),
     ("CHAT_API_KEYS", "svc:short"), ("CHAT_API_KEYS", "nokey"),
     ("CHAT_ALLOWED_ORIGINS", "https://a.example/path"), ("REDIS_URL", "redis://:6379"),
     ("REDIS_URL", "redis://host:port")],
)
def test_other_settings_refuse_bad_values(name: str, raw: str) -> None:
    """Flags, choices, lists and URLs refuse what they cannot mean, naming the variable."""
    with pytest.raises(ConfigError, match=name):
        load_settings({name: raw}, env_file=None)


def test_cli_redis_url_error_names_the_flag() -> None:
    """A bad --redis-url is reported as the flag, not as REDIS_URL."""
    with pytest.raises(ConfigError, match="--redis-url"):
        load_settings({}, env_file=None, overrides={"redis_url": "http://x"})


def test_values_are_parsed_to_their_types() -> None:
    """Flags, numbers, lists and choices arrive typed."""
    settings = load_settings(
        {"CHAT_COMPRESS": "yes", "CHAT_RATE": "2.5", "CHAT_MAX_ROOMS": "7",
         "CHAT_TRUSTED_PROXIES": "10.0.0.1, 10.1.0.0/16", "CHAT_LOG_LEVEL": "debug",
         "CHAT_ALLOWED_ORIGINS": "https://a.example/, https://b.example", "CHAT_DEV_AUTH": "1"},
        env_file=None,
    )
    assert settings.compress is True and settings.rate_per_second == 2.5
    assert settings.max_rooms == 7 and settings.log_level == "DEBUG"
    assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.1/32", "10.1.0.0/16"]
    assert settings.allowed_origins == ("https://a.example", "https://b.example")


def test_dotenv_is_read_as_docker_compose_reads_it(tmp_path: Path) -> None:
    """Inline comments after unquoted values, quotes, export, ${VAR}: compose's rules."""
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text("<html></html>")
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\n"
        "PORT=4100 # the port\n"
        "export CHAT_REDIS_PREFIX='app #1:'\n"
        'CHAT_DEV_PASSWORD="pass word # not a comment"\n'
        f"HOME_DIR={tmp_path}\n"
        "CHAT_STATIC_DIR=${HOME_DIR}/static\n"
    )
    settings = load_settings({}, env_file=dotenv)
    assert settings.port == 4100
    assert settings.redis_prefix == "app #1:"
    assert settings.dev_password == "pass word # not a comment"
    assert settings.static_dir == f"{tmp_path}/static"


def test_dotenv_line_without_equals_names_file_and_line(tmp_path: Path) -> None:
    """A line that is not KEY=VALUE stops start-up naming the file and the line."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("PORT=4000\nthis is not a setting\n")
    with pytest.raises(ConfigError, match=r"\.env:2"):
        load_settings({}, env_file=dotenv)


def test_every_field_is_declared_with_variable_and_meaning() -> None:
    """Each Settings field but the CLI-only ones has a variable, a doc and a group."""
    cli_only = {f.name for f in dataclasses.fields(Settings) if not f.metadata.get("env")}
    assert cli_only == {"host", "workers"}
    for spec in declared():
        assert spec.metadata["doc"] and spec.metadata["group"], spec.name
    names = [spec.metadata["env"] for spec in declared()]
    assert len(names) == len(set(names))


def test_secrets_stay_out_of_repr() -> None:
    """Secret settings never appear in the Settings repr (and so in no log)."""
    settings = load_settings({"CHAT_API_KEYS": "svc:0123456789abcdef0123",
                              "CHAT_DEV_PASSWORD": "hunter2-hunter2"}, env_file=None)
    assert "0123456789abcdef0123" not in repr(settings)
    assert "hunter2" not in repr(settings)


def test_readme_table_and_env_example_are_generated_from_the_code() -> None:
    """README's configuration table and .env.example match the declared settings
    (regenerate: python -m chatserver.settings_docs --write)."""
    readme = (settings_docs.ROOT / "README.md").read_text()
    assert settings_docs.readme_with_table(readme) == readme
    assert (settings_docs.ROOT / ".env.example").read_text() == settings_docs.env_example()


def test_env_example_loads_as_the_defaults(tmp_path: Path) -> None:
    """.env.example with every line uncommented loads, and the literal defaults hold."""
    lines = [line[2:] for line in settings_docs.env_example().splitlines()
             if line.startswith("# ") and "=" in line.split()[1]]
    dotenv = tmp_path / ".env"
    dotenv.write_text("\n".join(lines) + "\n")
    loaded = load_settings({"AWS_COGNITO_USER_POOL_ID": "", "CHAT_DEV_AUTH": "1"},  # examples
                           env_file=dotenv)
    defaults = load_settings({}, env_file=None)
    for field in ("port", "rate_per_second", "heartbeat", "max_rooms", "token_use"):
        assert getattr(loaded, field) == getattr(defaults, field)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AWS_REGION": "evil.example.com/x"}, "AWS_REGION"),
        ({"CHAT_ALLOWED_ORIGINS": "https://chat.example.com"}, "CHAT_DEV_AUTH=1"),
        ({"AWS_REGION": "us-east-1.attacker.net"}, "AWS_REGION"),
        ({"AWS_COGNITO_USER_POOL_ID": "eu-west-1_abc", "AWS_COGNITO_CLIENT_ID": "c"},
         "AWS_COGNITO_USER_POOL_ID"),  # another region's pool
        ({"AWS_COGNITO_USER_POOL_ID": "us-east-1_a/b", "AWS_COGNITO_CLIENT_ID": "c"},
         "AWS_COGNITO_USER_POOL_ID"),
        ({"AWS_COGNITO_USER_POOL_ID": "us-east-1_ab", "AWS_COGNITO_CLIENT_ID": "a b"},
         "AWS_COGNITO_CLIENT_ID"),
        ({"AWS_COGNITO_JWKS_URL": "file:///etc/passwd"}, "AWS_COGNITO_JWKS_URL"),
        ({"AWS_COGNITO_ENDPOINT": "ftp://x"}, "AWS_COGNITO_ENDPOINT"),
        ({"CHAT_STATIC_DIR": "/"}, "CHAT_STATIC_DIR"),
        ({"CHAT_STATIC_DIR": "/etc"}, "CHAT_STATIC_DIR"),
    ],
)
def test_values_that_would_fail_later_stop_start_up(env: dict[str, str], fragment: str) -> None:
    """A region or pool that is not AWS's shape (it names the host passwords go to), a
    non-http JWKS or endpoint URL, a static dir without the client: refused at start."""
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env, env_file=None)


def test_a_pool_of_the_configured_region_is_accepted() -> None:
    """eu-west-1_AbC123 with AWS_REGION=eu-west-1 loads, and so does the default region."""
    settings = load_settings({"AWS_REGION": "eu-west-1", "AWS_COGNITO_USER_POOL_ID":
                              "eu-west-1_AbC123", "AWS_COGNITO_CLIENT_ID": "abc123"},
                             env_file=None)
    assert settings.cognito_issuer.endswith("eu-west-1.amazonaws.com/eu-west-1_AbC123")


def test_secure_cookies_on_a_plain_http_origin_are_warned_about() -> None:
    """Secure cookies with a plain-http, non-localhost origin start, with a warning."""
    risky = load_settings({"CHAT_ALLOWED_ORIGINS": "http://chat.example.com",
                           "CHAT_DEV_AUTH": "1"}, env_file=None)
    assert any("CHAT_COOKIE_SECURE" in w for w in config_warnings(risky))
    assert config_warnings(load_settings({}, env_file=None)) == []
    local = {"CHAT_ALLOWED_ORIGINS": "http://chat.example.com", "CHAT_COOKIE_SECURE": "0",
             "CHAT_DEV_AUTH": "1"}
    assert config_warnings(load_settings(local, env_file=None)) == []
