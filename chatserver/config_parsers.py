"""Parsers of configuration: a `.env` file as docker compose reads it, and a variable's
text into its typed value, or a ConfigError that names the variable."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .redis_urls import RedisUrlError, parse_target

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""


def parse_redis_url(value: str, name: str) -> str:
    """A URL of one node, a Sentinel service or a cluster (redis_urls.parse_target)."""
    try:
        parse_target(value)
    except RedisUrlError as exc:
        shown = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", value)  # no password in logs
        raise ConfigError(f"{name}={shown!r}: {exc}") from None
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


ApiKey = tuple[str, str, str]  # (service name, key, room glob it may touch)
ROOM_GLOB = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,64}")


def parse_api_keys(raw: str, name: str) -> tuple[ApiKey, ...]:
    """`name:key` (every room) or `name:key:glob` (rooms matching the glob); keys of 16+
    characters, without `:`."""
    keys = []
    for item in parse_items(raw):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0] or len(parts[1]) < 16:
            raise ConfigError(
                f"{name}: expected name:key or name:key:room-glob, keys of 16+ characters")
        service, key, glob = parts[0], parts[1], parts[2] if len(parts) == 3 else "*"
        if not ROOM_GLOB.fullmatch(glob):
            raise ConfigError(f"{name}: {glob!r} is not a room glob like team-*")
        keys.append((service, key, glob))
    return tuple(keys)


def parse_one_of(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        value = raw.lower() if choices[0].islower() else raw.upper()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r}: expected {', '.join(choices)}")
        return value

    return parse


def read_dotenv(path: Path) -> dict[str, str]:
    """A `.env` file read as docker compose reads it (python-dotenv: `#` comments, inline
    ` # ` comments on unquoted values, quotes, `export`, `${VAR}` interpolation)."""
    if not path.is_file():
        return {}
    with path.open() as stream:
        for binding in parse_stream(stream):
            if binding.error:
                raise ConfigError(f"{path}:{binding.original.line}: expected KEY=VALUE")
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def parse_value(spec: dataclasses.Field[Any], raw: str) -> Any:
    """One variable's text turned into the field's value, or ConfigError naming it."""
    name, meta, default = spec.metadata["env"], spec.metadata, spec.default
    if meta["parse"] is not None:
        return meta["parse"](raw, name)
    if isinstance(default, bool):
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
    kind = meta["kind"]
    if kind is not None:
        word = "a whole number" if kind is int else "a number"
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: not {word}") from None
        if not meta["low"] <= value <= meta["high"]:
            raise ConfigError(f"{name}={value}: must be between {meta['low']} and {meta['high']}")
        return value
    return raw
