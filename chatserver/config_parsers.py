"""Parsers of setting values: a variable's text in, the typed value out, or a
ConfigError that names the variable."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlparse

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""


def parse_redis_url(value: str, name: str) -> str:
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


AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
POOL_ID = re.compile(r"([a-z]{2}(?:-[a-z]+)+-[0-9]{1,2})_[0-9A-Za-z]{1,55}")
CLIENT_ID = re.compile(r"[\w+]{1,128}")


def parse_region(raw: str, name: str) -> str:
    # The region becomes a host name that passwords are sent to: only a region's shape.
    if not AWS_REGION.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r}: not an AWS region like eu-west-1")
    return raw


def parse_client_id(raw: str, name: str) -> str:
    if not CLIENT_ID.fullmatch(raw):
        raise ConfigError(f"{name}={raw!r}: not a Cognito app client id")
    return raw


def parse_http_url(raw: str, name: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name}={raw!r}: expected an http:// or https:// URL")
    return raw


def parse_items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_origins(raw: str, name: str) -> tuple[str, ...]:
    items = parse_items(raw)
    for origin in items:
        parsed = urlparse(origin)
        is_origin = parsed.scheme in ("http", "https") and parsed.path in ("", "/")
        if not is_origin or not parsed.netloc:
            raise ConfigError(f"{name}: {origin!r} is not an origin like https://chat.example.com")
    return tuple(origin.rstrip("/") for origin in items)


def parse_networks(raw: str, name: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in parse_items(raw))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def parse_api_keys(raw: str, name: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in parse_items(raw):
        service, sep, key = item.partition(":")
        if not sep or not service or len(key) < 16:
            raise ConfigError(f"{name}: expected name:key pairs with keys of 16+ characters")
        pairs.append((service, key))
    return tuple(pairs)


def parse_one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        value = raw.lower() if choices[0].islower() else raw.upper()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r}: expected {', '.join(choices)}")
        return value

    return parse
