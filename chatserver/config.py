"""Settings: every setting declared once (variable, type, default, bounds, meaning) as a
field of one frozen dataclass, read from the environment, a `.env` file and CLI flags.

Validation happens here (each value) and in config_checks.py (values together), once,
at start-up: a bad value raises `ConfigError` naming the variable, and the CLI turns
that into one line and exit status 2. The README's table
and `.env.example` are generated from the same fields (chatserver/settings_docs.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config_checks import STATIC_DIR, checked
from .config_checks import warnings as warnings
from .config_parsers import (
    ApiKey,
    Network,
    parse_api_keys,
    parse_client_id,
    parse_http_url,
    parse_networks,
    parse_one_of,
    parse_origins,
    parse_redis_url,
    parse_region,
    parse_value,
    read_dotenv,
)
from .config_parsers import (
    ConfigError as ConfigError,
)

DEFAULT_PORT = 3020
T = TypeVar("T")


def setting(
    env: str | None,
    default: T,
    doc: str,
    *,
    group: str = "",
    low: float | None = None,
    high: float | None = None,
    parse: Callable[[str, str], Any] | None = None,
    shown: str | None = None,
    example: str | None = None,
    secret: bool = False,
    kind: type[int] | type[float] | None = None,
) -> T:
    """A Settings field. `env`: its variable (None: CLI only); `parse(raw, env)` for
    values that are not a plain number, flag or text; `shown`: the default as the docs
    say it; `example`: a value for .env.example when the default is empty; `kind`: int
    or float for a number whose default is None (derived from another setting)."""
    if kind is None and isinstance(default, int | float) and not isinstance(default, bool):
        kind = type(default)
    meta = {"env": env, "doc": doc, "group": group, "low": low, "high": high,
            "parse": parse, "shown": shown, "example": example, "kind": kind}
    return dataclasses.field(default=default, repr=not secret, metadata=meta)


# ----------------------------------------------------------------- settings

SERVER, COGNITO, BROWSER, ROOMS, DEV, LIMITS, TIMING = (
    "server", "AWS Cognito (unset pool: the built-in dev sign-in)", "browser security",
    "room permissions", "dev sign-in (only without a Cognito pool)", "limits",
    "timing and history",
)


@dataclass(frozen=True)
class Settings:
    host: str = setting(None, "127.0.0.1", "bind address (--host)")
    workers: int = setting(None, 1, "worker processes (--workers)")
    port: int = setting("PORT", DEFAULT_PORT, "listening port", group=SERVER, low=1, high=65535)
    redis_url: str | None = setting(
        "REDIS_URL", None, "Redis for several workers/replicas: `redis://host:6379/0` "
        "(or `rediss://`) one node; `redis+sentinel://h1:26379,h2:26379/<master>[/db]` the "
        "primary Sentinel names, failovers followed; `redis+cluster://h1:7000,h2:7001` a "
        "Redis Cluster from seed nodes; unset: in-process broker, one worker",
        group=SERVER, parse=parse_redis_url, shown="unset",
        example="redis://127.0.0.1:6379/0")
    redis_prefix: str = setting(
        "CHAT_REDIS_PREFIX", "chat:", "Redis key prefix; give each deployment sharing a "
        "Redis its own", group=SERVER)
    log_level: str = setting(
        "CHAT_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR; logs never hold tokens, "
        "cookies or message bodies at INFO; connects are a counted line a second at INFO, "
        "one line each at DEBUG", group=SERVER,
        parse=parse_one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    metrics_token: str | None = setting(
        "CHAT_METRICS_TOKEN", None, "bearer token `/metrics` requires; unset: only direct "
        "requests from loopback or private addresses (never through a proxy)", group=SERVER,
        shown="unset", secret=True)
    static_dir: str = setting(
        "CHAT_STATIC_DIR", STATIC_DIR, "the browser client's files (the Docker image sets "
        "`/app/static`)", group=SERVER, shown="`static/` of the checkout")
    aws_region: str = setting("AWS_REGION", "us-east-1", "Cognito region", group=COGNITO,
                              parse=parse_region)
    cognito_pool_id: str | None = setting(
        "AWS_COGNITO_USER_POOL_ID", None, "the user pool; unset: dev sign-in", group=COGNITO,
        shown="unset", example="eu-west-1_AbCdEf123")
    cognito_client_id: str | None = setting(
        "AWS_COGNITO_CLIENT_ID", None, "app client id (`aud` of ID tokens, `client_id` of "
        "access tokens)", group=COGNITO, shown="", parse=parse_client_id)
    cognito_client_secret: str | None = setting(
        "AWS_COGNITO_CLIENT_SECRET", None, "app client secret, for SECRET_HASH",
        group=COGNITO, shown="unset", secret=True)
    cognito_jwks_url: str | None = setting(
        "AWS_COGNITO_JWKS_URL", None, "where to fetch the JWKS (emulators, tests); the issuer "
        "stays exact", group=COGNITO, shown="the pool's", parse=parse_http_url)
    cognito_endpoint: str | None = setting(
        "AWS_COGNITO_ENDPOINT", None, "InitiateAuth endpoint (LocalStack, moto)",
        group=COGNITO, shown="the region's", parse=parse_http_url)
    password_rules: str = setting(
        "AWS_COGNITO_PASSWORD_RULES", "at least 8 characters, with upper and lower case "
        "letters, a number and a symbol", "the pool's password policy, shown on the "
        "new-password form (Cognito's default policy)", group=COGNITO)
    totp_issuer: str = setting(
        "CHAT_TOTP_ISSUER", "chatserver", "the issuer an authenticator app shows for the TOTP "
        "set up at sign-in", group=COGNITO)
    token_use: str = setting(
        "CHAT_TOKEN_USE", "access", "which Cognito token the cookie holds: `access` or `id`",
        group=COGNITO, parse=parse_one_of("access", "id"))
    token_leeway: float = setting(
        "CHAT_TOKEN_LEEWAY", 5.0, "seconds of clock leeway on exp/nbf", group=COGNITO,
        low=0, high=300)
    allowed_origins: tuple[str, ...] = setting(
        "CHAT_ALLOWED_ORIGINS", (), "Origin allowlist for `/ws` and cookie POSTs",
        group=BROWSER, parse=parse_origins, shown="`http://127.0.0.1:PORT,http://localhost:PORT`",
        example="https://chat.example.com")
    cookie_secure: bool = setting(
        "CHAT_COOKIE_SECURE", True, "0 drops `Secure` for plain-http local use (`make run` "
        "does)", group=BROWSER)
    legacy_cookies: str = setting(
        "CHAT_LEGACY_COOKIES", "auto", "also read the original design's `authToken` and "
        "`refreshToken` names: `1`, `0`, or `auto` (only where no sibling host can plant "
        "them: every allowed origin an IP or localhost)", group=BROWSER,
        parse=parse_one_of("auto", "1", "0"))
    trusted_proxies: tuple[Network, ...] = setting(
        "CHAT_TRUSTED_PROXIES", (), "IPs/CIDRs whose `X-Forwarded-For` is believed",
        group=BROWSER, parse=parse_networks, shown="none", example="10.213.47.0/24")
    api_keys: tuple[ApiKey, ...] = setting(
        "CHAT_API_KEYS", (), "API keys, `name:key[:room-glob],...` (keys of 16+ characters; "
        "a glob scopes the key to matching rooms)",
        group=BROWSER, parse=parse_api_keys, shown="none", secret=True,
        example="announcer:change-me-to-a-long-random-string")
    room_rules: str | None = setting(
        "CHAT_ROOM_RULES", None, "room rules, `<glob> read=<who> write=<who>; ...` (who: "
        "`open`, `members`, `group:<name>`, `none`); unset: every room open", group=ROOMS,
        shown="unset", example="lobby read=open write=open; team-* read=members write=members")
    room_rules_file: str | None = setting(
        "CHAT_ROOM_RULES_FILE", None, "the same rules, one a line, from a file", group=ROOMS,
        shown="unset")
    direct_messages: str = setting(
        "CHAT_DIRECT_MESSAGES", "everyone", "who may send a user direct messages: `everyone`, "
        "or `shared-room` (users who share a room)", group=ROOMS,
        parse=parse_one_of("everyone", "shared-room"))
    login_rate_per_minute: int = setting(
        "CHAT_LOGIN_RATE", 10, "sign-in attempts per minute per client IP and per username",
        group=BROWSER, low=1, high=1_000_000)
    dev_auth_explicit: bool = setting(
        "CHAT_DEV_AUTH", False, "1 allows the dev sign-in beyond this host: a non-loopback "
        "bind, a non-local allowed origin, or through a proxy (forwarding headers)",
        group=DEV)
    dev_password: str | None = setting(
        "CHAT_DEV_PASSWORD", None, "the dev sign-in's password, if any", group=DEV,
        shown="unset", secret=True)
    dev_key_file: str | None = setting(
        "CHAT_DEV_KEY_FILE", None, "PEM of the dev signing key; unset: shared through Redis, "
        "else made at start", group=DEV, shown="unset")
    dev_token_ttl: int = setting(
        "CHAT_DEV_TOKEN_TTL", 900, "dev access token lifetime, seconds", group=DEV,
        low=10, high=86400)
    max_message_bytes: int = setting(
        "CHAT_MAX_MESSAGE_BYTES", 64 * 1024, "largest frame; bigger closes 1009",
        group=LIMITS, low=256, high=16 * 1024 * 1024)
    max_text_chars: int = setting(
        "CHAT_MAX_TEXT_CHARS", 4000, "longest message text; longer gets `too_large`",
        group=LIMITS, low=1, high=1024 * 1024)
    rate_per_second: float = setting(
        "CHAT_RATE", 10.0, "per-connection token bucket, messages a second (0 = off)",
        group=LIMITS, low=0, high=1e9)
    rate_burst: int = setting(
        "CHAT_BURST", 20, "the bucket's burst; a flood past it closes 1008", group=LIMITS,
        low=1, high=1_000_000_000)
    user_rate: float | None = setting(
        "CHAT_USER_RATE", None, "messages a second for all of one user's connections on a "
        "worker (0 = off)", group=LIMITS, low=0, high=1e9, kind=float,
        shown="2x `CHAT_RATE`")
    user_burst: int | None = setting(
        "CHAT_USER_BURST", None, "that bucket's burst", group=LIMITS, low=1,
        high=1_000_000_000, kind=int, shown="2x `CHAT_BURST`")
    backlog_bytes: int = setting(
        "CHAT_BACKLOG_BYTES", 1024 * 1024, "unsent bytes a client may hold before 1013",
        group=LIMITS, low=4096, high=1 << 30)
    max_rooms: int = setting(
        "CHAT_MAX_ROOMS", 50, "rooms per connection", group=LIMITS, low=1, high=10000)
    user_rooms_per_hour: int = setting(
        "CHAT_USER_ROOMS_PER_HOUR", 200, "rooms a user may open in an hour that nobody on "
        "the worker is in (each may create room state in Redis; the lobby is exempt); 0: "
        "no limit", group=LIMITS, low=0, high=1_000_000_000)
    rooms_per_hour: int = setting(
        "CHAT_ROOMS_PER_HOUR", 20000, "the same, for all users of the deployment together",
        group=LIMITS, low=0, high=1_000_000_000)
    max_connections: int = setting(
        "CHAT_MAX_CONNECTIONS", 10000, "open WebSockets per worker", group=LIMITS,
        low=1, high=10_000_000)
    max_connections_per_user: int = setting(
        "CHAT_MAX_CONNECTIONS_PER_USER", 20, "open WebSockets per user on a worker",
        group=LIMITS, low=1, high=100000)
    max_handshakes: int = setting(
        "CHAT_MAX_HANDSHAKES", 256, "WebSocket handshakes in flight per worker; past it an "
        "upgrade is answered 503 + Retry-After at once (shed, not queued into timeouts)",
        group=LIMITS, low=1, high=1_000_000)
    shed_lag: float = setting(
        "CHAT_SHED_LAG", 0.1, "seconds this worker's event loop may run late before new "
        "upgrades are answered 503 + Retry-After (a saturated worker serves the clients it "
        "holds first); 0: off", group=LIMITS, low=0, high=60)
    head_timeout: float = setting(
        "CHAT_HEAD_TIMEOUT", 10.0, "seconds a new connection has to send its request head",
        group=LIMITS, low=0.5, high=600)
    half_open_per_ip: int = setting(
        "CHAT_HALF_OPEN_PER_IP", 256, "connections per client address still without a "
        "request head (trusted proxies exempt)", group=LIMITS, low=1, high=1_000_000)
    compress: bool = setting(
        "CHAT_COMPRESS", False, "permessage-deflate (off: CPU per frame, and it leaks "
        "lengths)", group=LIMITS)
    heartbeat: float = setting(
        "CHAT_HEARTBEAT", 20.0, "seconds between pings; a peer silent for a whole beat "
        "after one is dropped (keep the proxy's read timeout above it)", group=TIMING,
        low=0, high=3600)
    grace: float = setting(
        "CHAT_GRACE", 10.0, "shutdown grace period, seconds", group=TIMING, low=0, high=600)
    history_maxlen: int = setting(
        "CHAT_HISTORY_MAXLEN", 1000, "messages kept per room (`XADD MAXLEN ~`)",
        group=TIMING, low=10, high=10_000_000)
    room_ttl: int = setting(
        "CHAT_ROOM_TTL", 7 * 24 * 3600, "seconds a room's history and epoch are kept after "
        "its last message or join (refreshed by use); 0: forever", group=TIMING, low=0,
        high=10 * 365 * 24 * 3600, shown="604800 (7 days)")
    presence_ttl: float = setting(
        "CHAT_PRESENCE_TTL", 30.0, "seconds before a dead instance's members disappear",
        group=TIMING, low=3, high=3600)
    presence_handoff: float = setting(
        "CHAT_PRESENCE_HANDOFF", 10.0, "seconds a shutting-down worker's members stay present, "
        "so clients that reconnect elsewhere meanwhile cause no leave/join events; 0: they "
        "leave at once", group=TIMING, low=0, high=3600)
    presence_event_limit: int = setting(
        "CHAT_PRESENCE_EVENT_LIMIT", 100, "rooms with more members send no join/leave "
        "events (`members` still answers)", group=TIMING, low=0, high=1_000_000)

    @property
    def per_user_rate(self) -> float:
        return 2 * self.rate_per_second if self.user_rate is None else self.user_rate

    @property
    def per_user_burst(self) -> int:
        return 2 * self.rate_burst if self.user_burst is None else self.user_burst

    @property
    def dev_auth(self) -> bool:
        """The dev issuer replaces Cognito when no user pool is configured."""
        return not self.cognito_pool_id

    @property
    def cognito_issuer(self) -> str:
        return f"https://cognito-idp.{self.aws_region}.amazonaws.com/{self.cognito_pool_id}"

    def with_overrides(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def declared() -> list[dataclasses.Field[Any]]:
    """The settings read from the environment, in the order of the docs."""
    return [f for f in dataclasses.fields(Settings) if f.metadata.get("env")]


# ------------------------------------------------------------------ loading


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
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    values: dict[str, Any] = {}
    for spec in declared():
        raw = env.get(spec.metadata["env"], "").strip()
        if raw:
            values[spec.name] = parse_value(spec, raw)
    cli_url = cli.pop("redis_url", None)
    if cli_url:  # checked here, so the error names the flag, not REDIS_URL
        values["redis_url"] = parse_redis_url(str(cli_url), "--redis-url")
    return checked(Settings(**values).with_overrides(**cli))
