"""Settings: one frozen dataclass read from the environment, a `.env` file and CLI flags.

Validation happens here, once, at start-up: a bad value raises `ConfigError` naming the
variable, and the CLI turns that into one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_PORT = 3020


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    redis_url: str | None = None
    redis_prefix: str = "chat:"
    # Cognito; no pool id means the built-in dev issuer.
    aws_region: str = "us-east-1"
    cognito_pool_id: str | None = None
    cognito_client_id: str | None = None
    cognito_client_secret: str | None = field(default=None, repr=False)
    cognito_jwks_url: str | None = None
    cognito_endpoint: str | None = None
    token_use: str = "access"
    token_leeway: float = 5.0
    # Dev sign-in.
    dev_auth_explicit: bool = False
    dev_password: str | None = field(default=None, repr=False)
    dev_key_file: str | None = None
    dev_token_ttl: int = 900
    # HTTP and cookies.
    allowed_origins: tuple[str, ...] = ()
    cookie_secure: bool = True
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    login_rate_per_minute: int = 10
    static_dir: str = str(Path(__file__).resolve().parent.parent / "static")
    # WebSocket limits.
    max_message_bytes: int = 64 * 1024
    max_text_chars: int = 4000
    rate_per_second: float = 10.0
    rate_burst: int = 20
    heartbeat: float = 20.0
    backlog_bytes: int = 1024 * 1024
    max_rooms: int = 50
    max_connections: int = 10000
    max_connections_per_user: int = 20
    compress: bool = False
    # History, presence, lifecycle.
    history_maxlen: int = 1000
    presence_ttl: float = 30.0
    presence_event_limit: int = 100
    grace: float = 10.0
    log_level: str = "INFO"

    @property
    def dev_auth(self) -> bool:
        """The dev issuer replaces Cognito when no user pool is configured."""
        return not self.cognito_pool_id

    @property
    def cognito_issuer(self) -> str:
        return f"https://cognito-idp.{self.aws_region}.amazonaws.com/{self.cognito_pool_id}"

    def with_overrides(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class _Reader:
    """Typed access to the merged environment, with errors that name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name, "").strip()
        return value or default

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: not a whole number") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value}: must be between {low} and {high}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: not a number") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={value}: must be between {low} and {high}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")

    def items(self, name: str) -> list[str]:
        raw = self.text(name) or ""
        return [item.strip() for item in raw.split(",") if item.strip()]


def _redis_url(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name}={value!r}: expected redis://host:port/db, rediss:// or unix://")
    if parsed.scheme != "unix":
        if not parsed.hostname:
            raise ConfigError(f"{name}={value!r}: no host")
        try:
            parsed.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ConfigError(f"{name}={value!r}: bad port") from None
    return value


def _origins(items: list[str], name: str) -> tuple[str, ...]:
    for origin in items:
        parsed = urlparse(origin)
        is_origin = parsed.scheme in ("http", "https") and parsed.path in ("", "/")
        if not is_origin or not parsed.netloc:
            raise ConfigError(f"{name}: {origin!r} is not an origin like https://chat.example.com")
    return tuple(origin.rstrip("/") for origin in items)


def _networks(
    items: list[str], name: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _api_keys(items: list[str], name: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        service, sep, key = item.partition(":")
        if not sep or not service or len(key) < 16:
            raise ConfigError(f"{name}: expected name:key pairs with keys of 16+ characters")
        pairs.append((service, key))
    return tuple(pairs)


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: Path | None = Path(".env"),
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build validated Settings: `.env` < environment < CLI overrides."""
    env: dict[str, str] = {}
    if env_file is not None:
        env.update(read_dotenv(env_file))
    env.update(os.environ if environ is None else environ)
    read = _Reader(env)
    cli = dict(overrides or {})

    port = cli.pop("port", None)
    if port is None:
        port = read.integer("PORT", DEFAULT_PORT, 1, 65535)
    cli_redis_url = cli.pop("redis_url", None)
    redis_url = str(cli_redis_url) if cli_redis_url else read.text("REDIS_URL")
    token_use = read.text("CHAT_TOKEN_USE", "access")
    if token_use not in ("access", "id"):
        raise ConfigError(f"CHAT_TOKEN_USE={token_use!r}: expected access or id")
    log_level = (read.text("CHAT_LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"CHAT_LOG_LEVEL={log_level!r}: expected DEBUG, INFO, WARNING or ERROR")

    settings = Settings(
        port=int(port),  # type: ignore[call-overload]
        redis_url=_redis_url(redis_url, "--redis-url" if cli_redis_url else "REDIS_URL"),
        redis_prefix=read.text("CHAT_REDIS_PREFIX", "chat:") or "chat:",
        aws_region=read.text("AWS_REGION", "us-east-1") or "us-east-1",
        cognito_pool_id=read.text("AWS_COGNITO_USER_POOL_ID"),
        cognito_client_id=read.text("AWS_COGNITO_CLIENT_ID"),
        cognito_client_secret=read.text("AWS_COGNITO_CLIENT_SECRET"),
        cognito_jwks_url=read.text("AWS_COGNITO_JWKS_URL"),
        cognito_endpoint=read.text("AWS_COGNITO_ENDPOINT"),
        token_use=token_use,
        token_leeway=read.number("CHAT_TOKEN_LEEWAY", 5.0, 0, 300),
        dev_auth_explicit=read.flag("CHAT_DEV_AUTH", False),
        dev_password=read.text("CHAT_DEV_PASSWORD"),
        dev_key_file=read.text("CHAT_DEV_KEY_FILE"),
        dev_token_ttl=read.integer("CHAT_DEV_TOKEN_TTL", 900, 10, 86400),
        allowed_origins=_origins(read.items("CHAT_ALLOWED_ORIGINS"), "CHAT_ALLOWED_ORIGINS"),
        cookie_secure=read.flag("CHAT_COOKIE_SECURE", True),
        trusted_proxies=_networks(read.items("CHAT_TRUSTED_PROXIES"), "CHAT_TRUSTED_PROXIES"),
        api_keys=_api_keys(read.items("CHAT_API_KEYS"), "CHAT_API_KEYS"),
        login_rate_per_minute=read.integer("CHAT_LOGIN_RATE", 10, 1, 1_000_000),
        static_dir=read.text("CHAT_STATIC_DIR", Settings.static_dir) or Settings.static_dir,
        max_message_bytes=read.integer("CHAT_MAX_MESSAGE_BYTES", 64 * 1024, 256, 16 * 1024 * 1024),
        max_text_chars=read.integer("CHAT_MAX_TEXT_CHARS", 4000, 1, 1024 * 1024),
        rate_per_second=read.number("CHAT_RATE", 10.0, 0, 1e9),
        rate_burst=read.integer("CHAT_BURST", 20, 1, 1_000_000_000),
        heartbeat=read.number("CHAT_HEARTBEAT", 20.0, 0, 3600),
        backlog_bytes=read.integer("CHAT_BACKLOG_BYTES", 1024 * 1024, 4096, 1 << 30),
        max_rooms=read.integer("CHAT_MAX_ROOMS", 50, 1, 10000),
        max_connections=read.integer("CHAT_MAX_CONNECTIONS", 10000, 1, 10_000_000),
        max_connections_per_user=read.integer("CHAT_MAX_CONNECTIONS_PER_USER", 20, 1, 100000),
        compress=read.flag("CHAT_COMPRESS", False),
        history_maxlen=read.integer("CHAT_HISTORY_MAXLEN", 1000, 10, 10_000_000),
        presence_ttl=read.number("CHAT_PRESENCE_TTL", 30.0, 3, 3600),
        presence_event_limit=read.integer("CHAT_PRESENCE_EVENT_LIMIT", 100, 0, 1_000_000),
        grace=read.number("CHAT_GRACE", 10.0, 0, 600),
        log_level=log_level,
    )
    settings = settings.with_overrides(**{k: v for k, v in cli.items() if v is not None})
    return _checked(settings)


def _checked(settings: Settings) -> Settings:
    if settings.workers < 1 or settings.workers > 256:
        raise ConfigError(f"--workers {settings.workers}: must be between 1 and 256")
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"--workers {settings.workers} needs REDIS_URL (or --redis-url): "
            "workers share broadcasts through Redis"
        )
    if not settings.dev_auth and not settings.cognito_client_id:
        raise ConfigError("AWS_COGNITO_CLIENT_ID is required when AWS_COGNITO_USER_POOL_ID is set")
    if settings.dev_auth and not _is_loopback(settings.host) and not settings.dev_auth_explicit:
        raise ConfigError(
            f"--host {settings.host}: the dev sign-in lets anyone sign in; set "
            "AWS_COGNITO_USER_POOL_ID, or CHAT_DEV_AUTH=1 to allow it on a non-loopback address"
        )
    if not settings.allowed_origins:
        settings = settings.with_overrides(
            allowed_origins=(
                f"http://127.0.0.1:{settings.port}",
                f"http://localhost:{settings.port}",
            )
        )
    return settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
