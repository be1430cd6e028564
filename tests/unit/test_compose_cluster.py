"""deploy/compose.cluster.yml on top of docker-compose.yml, read as files (no Docker
here): the app's REDIS_URL names the cluster's nodes, the create command joins exactly
those nodes, and addresses, ports and dependencies agree. The default stays one Redis."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: in the `test` extras

from chatserver.redis_urls import parse_target

ROOT = Path(__file__).resolve().parents[2]


class Override(dict[str, Any]):
    """A mapping tagged `!override`: compose replaces the base's value with it."""


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that knows compose's `!override` tag."""


def _override(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Override:
    return Override(loader.construct_mapping(node, deep=True))


ComposeLoader.add_constructor("!override", _override)


def load(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict)
    return data


def merge(base: Any, extra: Any) -> Any:
    """Compose's merge for what these files use: mappings merge key by key, `!override`
    replaces, any other value of the later file wins."""
    if isinstance(extra, Override):
        return dict(extra)
    if isinstance(base, dict) and isinstance(extra, dict):
        merged = dict(base)
        for key, value in extra.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return extra


def interpolate(value: str) -> str:
    """`${VAR:-default}` as compose resolves it with no .env."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The merged configuration, as `docker compose -f docker-compose.yml -f
    deploy/compose.cluster.yml config` would give it."""
    merged: dict[str, Any] = merge(load(ROOT / "docker-compose.yml"),
                                   load(ROOT / "deploy/compose.cluster.yml"))
    return merged


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = config["services"]
    return result


def cluster_nodes(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running redis-server in cluster mode, by name."""
    return {name: service for name, service in services.items()
            if "redis-server" in service.get("command", [])
            and option(service["command"], "--cluster-enabled") == "yes"}


def test_default_compose_stays_one_redis() -> None:
    """docker-compose.yml alone: the app on the one `redis` service, no cluster node."""
    services = load(ROOT / "docker-compose.yml")["services"]
    target = parse_target(services["chatserver"]["environment"]["REDIS_URL"])
    assert target.mode == "single" and target.url.startswith("redis://redis:")
    assert "redis" in services["chatserver"]["depends_on"]
    assert not cluster_nodes(services)


def test_redis_url_seeds_are_cluster_nodes_on_their_ports(services: dict[str, Any]) -> None:
    """REDIS_URL is a redis+cluster:// URL whose every seed is a node service, at the
    port that node listens on; no key prefix with braces (they pick the slot)."""
    env = services["chatserver"]["environment"]
    target = parse_target(env["REDIS_URL"])
    nodes = cluster_nodes(services)
    assert target.mode == "cluster" and len(target.nodes) >= 2
    for host, port in target.nodes:
        assert host in nodes, f"seed {host} is no cluster node service"
        assert option(nodes[host]["command"], "--port") == str(port)
    assert not set(env.get("CHAT_REDIS_PREFIX", "")) & set("{}")


def test_create_joins_exactly_the_nodes_at_their_addresses(config: dict[str, Any],
                                                           services: dict[str, Any]) -> None:
    """The init service's `--cluster create` names every node's fixed address and port
    once, with enough nodes for three primaries and their replicas; addresses sit in the
    `chat` subnet, outside the replicas' range, clear of the gateway and nginx."""
    nodes = cluster_nodes(services)
    script = " ".join(services["redis-cluster-init"]["command"])
    created = re.search(r"--cluster create ((?:\S+:\d+\s+)+)--cluster-replicas (\d+)", script)
    assert created is not None, script
    endpoints = created.group(1).split()
    replicas = int(created.group(2))
    addresses = {name: node["networks"]["chat"]["ipv4_address"] for name, node in nodes.items()}
    expected = {f"{addresses[n]}:{option(node['command'], '--port')}" for n, node in nodes.items()}
    assert sorted(endpoints) == sorted(expected) and len(set(endpoints)) == len(endpoints)
    assert len(endpoints) // (replicas + 1) >= 3  # Redis wants three primaries at least
    network = config["networks"]["chat"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(network["subnet"]), ipaddress.ip_network(network["ip_range"])
    taken = {network["gateway"], services["nginx"]["networks"]["chat"]["ipv4_address"]}
    for address in addresses.values():
        ip = ipaddress.ip_address(address)
        assert ip in subnet and ip not in dynamic and address not in taken, address
    for host, port in re.findall(r"-h (\S+) -p (\d+)", script):  # what it checks for `ok`
        assert f"{host}:{port}" in expected


def test_nodes_start_before_the_app_and_keep_their_state(config: dict[str, Any],
                                                         services: dict[str, Any]) -> None:
    """The init waits for every node's health check (a ping on its own port), the app
    for the init only (not the one-node redis, which is not started), and every node
    keeps nodes.conf and its AOF in a volume of its own."""
    nodes = cluster_nodes(services)
    init = services["redis-cluster-init"]
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in nodes}
    assert services["chatserver"]["depends_on"] == {
        "redis-cluster-init": {"condition": "service_completed_successfully"}}
    assert services["redis"].get("profiles")  # only with --profile: not by default
    volumes = []
    for node in nodes.values():
        command = [interpolate(part) for part in node["command"]]
        assert node["healthcheck"]["test"][-3:] == ["-p", option(command, "--port"), "ping"]
        [volume] = node["volumes"]
        name, _, mount = volume.partition(":")
        assert option(command, "--cluster-config-file").startswith(mount + "/")
        assert name in config["volumes"]
        volumes.append(name)
    assert len(set(volumes)) == len(nodes)
