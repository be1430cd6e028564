"""Checks of settings taken together, at start-up: what one value's parser cannot see."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .config_parsers import POOL_ID, ConfigError
from .permissions import load_rules
from .redis_urls import parse_target

if TYPE_CHECKING:
    from .config import Settings

STATIC_DIR = str(Path(__file__).resolve().parent.parent / "static")


def checked(settings: Settings) -> Settings:
    """The settings with their defaults filled in, or ConfigError for values that do
    not go together (or would fail later, at the worst moment)."""
    if settings.workers < 1 or settings.workers > 256:
        raise ConfigError(f"--workers {settings.workers}: must be between 1 and 256")
    if settings.workers > 1 and not settings.redis_url:
        raise ConfigError(
            f"--workers {settings.workers} needs REDIS_URL (or --redis-url): "
            "workers share broadcasts through Redis"
        )
    cluster = settings.redis_url and parse_target(settings.redis_url).mode == "cluster"
    if cluster and ("{" in settings.redis_prefix or "}" in settings.redis_prefix):
        raise ConfigError(f"CHAT_REDIS_PREFIX={settings.redis_prefix!r}: on a cluster it may "
                          "not hold { or }, which pick a key's hash slot")
    if not settings.dev_auth and not settings.cognito_client_id:
        raise ConfigError("AWS_COGNITO_CLIENT_ID is required when AWS_COGNITO_USER_POOL_ID is set")
    if settings.cognito_pool_id:
        pool = POOL_ID.fullmatch(settings.cognito_pool_id)
        if pool is None or pool.group(1) != settings.aws_region:
            raise ConfigError(
                f"AWS_COGNITO_USER_POOL_ID={settings.cognito_pool_id!r}: expected "
                f"{settings.aws_region}_<id> (a pool id starts with its AWS_REGION)"
            )
    index = Path(settings.static_dir) / "index.html"
    if settings.static_dir != STATIC_DIR and not index.is_file():
        raise ConfigError(
            f"CHAT_STATIC_DIR={settings.static_dir!r}: no index.html there; it must hold the "
            "browser client (everything in it is served)"
        )
    load_rules(settings.room_rules, settings.room_rules_file)  # a bad rule stops start-up
    if settings.dev_auth and not is_loopback(settings.host) and not settings.dev_auth_explicit:
        raise ConfigError(
            f"--host {settings.host}: the dev sign-in lets anyone sign in; set "
            "AWS_COGNITO_USER_POOL_ID, or CHAT_DEV_AUTH=1 to allow it on a non-loopback address"
        )
    exposed = [o for o in settings.allowed_origins if not is_loopback(urlparse(o).hostname or "")]
    if settings.dev_auth and exposed and not settings.dev_auth_explicit:
        raise ConfigError(
            f"CHAT_ALLOWED_ORIGINS has {', '.join(exposed)}: a page there could use the dev "
            "sign-in, which lets anyone sign in (a proxy in front of a loopback server "
            "exposes it too); set AWS_COGNITO_USER_POOL_ID, or CHAT_DEV_AUTH=1 to allow it"
        )
    if not settings.allowed_origins:
        settings = settings.with_overrides(
            allowed_origins=(
                f"http://127.0.0.1:{settings.port}",
                f"http://localhost:{settings.port}",
            )
        )
    return settings


def warnings(settings: Settings) -> list[str]:
    """Settings that start but will not work as meant; the CLI logs each once."""
    found = []
    plain = [o for o in settings.allowed_origins
             if o.startswith("http://") and urlparse(o).hostname not in ("localhost", "127.0.0.1")]
    if settings.cookie_secure and plain:
        found.append(
            f"CHAT_COOKIE_SECURE=1 with plain-http origins {', '.join(plain)}: browsers drop "
            "Secure cookies on http (except localhost), so sign-in will not stick there; "
            "serve https or set CHAT_COOKIE_SECURE=0 for local use"
        )
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
