"""REDIS_URL read into what to connect to: one node (`redis://`, `rediss://`, `unix://`),
a primary found through Sentinel (`redis+sentinel://`), or a Redis Cluster
(`redis+cluster://`). Pure: no redis-py here, so the settings loader can use it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlparse

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379
MASTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")

Mode = Literal["single", "sentinel", "cluster"]
Node = tuple[str, int]


class RedisUrlError(ValueError):
    """The URL cannot mean a Redis deployment; the message says what is wrong."""


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is. `url` is the text as given (single mode connects with it);
    `nodes` are the sentinels or the cluster's seed nodes."""

    mode: Mode
    url: str
    nodes: tuple[Node, ...] = ()
    master: str = ""  # the Sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_target(url: str) -> RedisTarget:
    """The target a URL names, or RedisUrlError saying what to write instead."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise RedisUrlError("expected a URL like redis://host:6379/0")
    if scheme in SINGLE_SCHEMES:
        return _single(url, scheme)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise RedisUrlError(
            f"unknown scheme {scheme!r}: expected redis://, rediss://, unix://, "
            "redis+sentinel://h1:26379,h2:26379/master or redis+cluster://h1:7000,h2:7001")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise RedisUrlError(f"{scheme}:// takes no ?options")
    username, password, hosts = _userinfo(netloc)
    default_port = SENTINEL_PORT if scheme == SENTINEL_SCHEME else CLUSTER_PORT
    nodes = tuple(_node(item, default_port) for item in hosts.split(","))
    parts = [part for part in path.split("/") if part]
    if scheme == CLUSTER_SCHEME:
        if parts not in ([], ["0"]):
            raise RedisUrlError("a cluster has only database 0: redis+cluster://h1:7000,h2:7001")
        return RedisTarget("cluster", url, nodes, username=username, password=password)
    if not parts or len(parts) > 2 or not MASTER_NAME.fullmatch(parts[0]):
        raise RedisUrlError("expected redis+sentinel://h1:26379,h2:26379/<master-name>[/db]")
    return RedisTarget("sentinel", url, nodes, master=parts[0],
                       db=_db(parts[1] if len(parts) == 2 else "0"),
                       username=username, password=password)


def _single(url: str, scheme: str) -> RedisTarget:
    parsed = urlparse(url)
    if scheme != "unix":
        if not parsed.hostname:
            raise RedisUrlError("no host")
        try:
            parsed.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise RedisUrlError("bad port") from None
        path = parsed.path.strip("/")
        if path:
            _db(path)
    elif not parsed.path:
        raise RedisUrlError("expected unix:///path/to/redis.sock")
    return RedisTarget("single", url)


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None, unquote(password) if colon else None, hosts)


def _node(item: str, default_port: int) -> Node:
    item = item.strip()
    host, port_text = item, ""
    if item.startswith("["):
        end = item.find("]")
        host, rest = item[: end + 1], item[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise RedisUrlError(f"bad node {item!r}: expected host:port")
            port_text = rest[1:]
    elif ":" in item:
        host, _, port_text = item.rpartition(":")
    if not host or not HOST.fullmatch(host):
        raise RedisUrlError(f"bad node {item!r}: expected host:port")
    if not port_text:
        return host.strip("[]"), default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise RedisUrlError(f"bad port in {item!r}")
    return host.strip("[]"), int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"bad database {text!r}: expected a number")
    return int(text)
