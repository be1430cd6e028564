"""REDIS_URL schemes, no process: one node, Sentinel and Cluster URLs read into targets,
every malformed one refused with a line that says what to write, and the clients built."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import SentinelConnectionPool

from chatserver.broker.redis.client import POOL_SIZE, command_client, pubsub_client
from chatserver.config import ConfigError, load_settings
from chatserver.redis_urls import RedisTarget, RedisUrlError, parse_target


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380",
                                 "redis://:pw@h/3", "unix:///run/redis.sock"])
def test_single_node_urls_are_kept_as_given(url: str) -> None:
    """redis://, rediss:// and unix:// are one node, connected with the URL as given."""
    assert parse_target(url) == RedisTarget("single", url)


def test_sentinel_url_names_sentinels_master_and_db() -> None:
    """redis+sentinel:// lists the sentinels (default port 26379), the master, the db."""
    target = parse_target("redis+sentinel://u:p%40ss@s1:26380,s2,[::1]:5000/mymaster/2")
    assert target.mode == "sentinel" and target.master == "mymaster" and target.db == 2
    assert target.nodes == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (target.username, target.password) == ("u", "p@ss")
    assert parse_target("redis+sentinel://s1/m").db == 0


def test_cluster_url_lists_seed_nodes() -> None:
    """redis+cluster:// lists seed nodes; database 0 only."""
    target = parse_target("redis+cluster://h1:7000,h2:7001")
    assert target.mode == "cluster" and target.nodes == (("h1", 7000), ("h2", 7001))
    assert parse_target("redis+cluster://h1:7000/0").nodes == (("h1", 7000),)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("mysql://x", "unknown scheme"), ("redis-sentinel://h/m", "unknown scheme"),
     ("localhost:6379", "expected a URL"), ("127.0.0.1", "expected a URL"),
     ("redis://:6379", "no host"), ("redis://h:port", "bad port"), ("redis://h/x", "database"),
     ("redis+sentinel://h1:26379", "master-name"), ("redis+sentinel://h1/m/x", "database"),
     ("redis+sentinel://h1/m/0/extra", "master-name"), ("redis+sentinel://h1,,h2/m", "bad node"),
     ("redis+sentinel://h1:99999/m", "bad port"), ("redis+sentinel:///m", "bad node"),
     ("redis+sentinel://h1/m?x=1", "options"), ("redis+cluster://h1:7000/1", "database 0"),
     ("redis+cluster://h1:x", "bad port"), ("redis+cluster://", "bad node")],
)
def test_malformed_urls_say_what_is_wrong(url: str, fragment: str) -> None:
    """Each malformed URL or unknown scheme raises an error naming the problem."""
    with pytest.raises(RedisUrlError, match=fragment):
        parse_target(url)


def test_settings_refuse_a_bad_url_in_one_line_without_the_password() -> None:
    """REDIS_URL's error is one line naming the variable, the password masked."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"REDIS_URL": "redis+sentinel://u:secret@h1/"}, env_file=None)
    message = str(caught.value)
    assert message.startswith("REDIS_URL=") and "\n" not in message
    assert "secret" not in message and "master-name" in message


def test_cluster_prefix_may_not_pick_the_slot() -> None:
    """On a cluster, a key prefix holding { or } is refused (it would pick the hash slot)."""
    env = {"REDIS_URL": "redis+cluster://h1:7000", "CHAT_REDIS_PREFIX": "a{b}:"}
    with pytest.raises(ConfigError, match="CHAT_REDIS_PREFIX"):
        load_settings(env, env_file=None)
    assert load_settings({**env, "REDIS_URL": "redis://h1"}, env_file=None)


def test_settings_accept_a_sentinel_url() -> None:
    """A Sentinel URL is a valid REDIS_URL and --redis-url."""
    url = "redis+sentinel://127.0.0.1:26379/mymaster"
    assert load_settings({"REDIS_URL": url}, env_file=None).redis_url == url
    assert load_settings({}, env_file=None, overrides={"redis_url": url}).redis_url == url


async def test_sentinel_url_builds_clients_of_the_named_primary() -> None:
    """Both clients of a Sentinel URL ask its sentinels for the master (no connection
    is made here); the command pool stays bounded and blocking; closing closes all."""
    url = "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/3"
    commands, sub = command_client(url), pubsub_client(url)
    try:
        for client in (commands, sub):
            pool = client.connection_pool
            assert isinstance(pool, SentinelConnectionPool) and pool.is_master
            assert pool.service_name == "mymaster"
            assert pool.connection_kwargs["db"] == 3
            assert pool.connection_kwargs["password"] == "pw"
            ports = [s.connection_pool.connection_kwargs["port"]
                     for s in pool.sentinel_manager.sentinels]
            assert sorted(ports) == [26379, 26380]
        assert isinstance(commands.connection_pool, BlockingConnectionPool)
        assert commands.connection_pool.max_connections == POOL_SIZE
    finally:
        await commands.aclose()
        await sub.aclose()


async def test_single_node_url_builds_plain_clients() -> None:
    """redis:// stays one node, connected with the URL as given."""
    commands = command_client("redis://127.0.0.1:6390/2")
    try:
        pool = commands.connection_pool
        assert not isinstance(pool, SentinelConnectionPool)
        assert isinstance(pool, BlockingConnectionPool)
        assert (pool.connection_kwargs["port"], pool.connection_kwargs["db"]) == (6390, 2)
    finally:
        await commands.aclose()
