"""Redis URLs in Go's forms and the client each chooses, and the hash tags that keep our keys
in the slot of Go's queue list (no server needed)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from machinery import RedisConfig
from machinery._drivers.redis import RedisConnector, parse_redis_url, tagged
from machinery.backends.redis import REVOKED_KEYS, WORKERS_INFO_KEY, WORKERS_KEY
from machinery.brokers._redis_delayed import route
from machinery.brokers.redis import dead_key, heartbeats_key, processing_prefix
from machinery.errors import ConfigError


@pytest.mark.parametrize("queue", ["machinery_tasks", "orders", "q{tagged}x", "a{b"])
def test_our_keys_share_the_slot_of_gos_queue(queue: str) -> None:
    slot = key_slot(queue.encode())
    for key in (processing_prefix(queue) + "worker:1", heartbeats_key(queue), dead_key(queue)):
        assert key_slot(key.encode()) == slot, key
    assert len({key_slot(key.encode()) for key in REVOKED_KEYS}) == 1
    assert key_slot(WORKERS_KEY.encode()) == key_slot(WORKERS_INFO_KEY.encode())


def test_a_queue_name_no_tag_can_follow_is_refused_on_a_cluster() -> None:
    assert tagged("p:", "a}b") == "p:{a}b}"  # off a cluster the name is just a name
    with pytest.raises(ConfigError, match="rename the queue"):
        tagged("p:", "a}b", strict=True)


def test_cluster_urls_and_config_choose_the_client() -> None:
    address = parse_redis_url("redis://user:secret@10.0.0.1:7000,10.0.0.2:7001,10.0.0.3/0")
    assert address.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("10.0.0.3", 6379))
    assert (address.username, address.password) == ("user", "secret")
    assert RedisConnector("redis://h1:1,h2:2", RedisConfig()).topology == "cluster"
    assert RedisConnector("redis://h1:1", RedisConfig(cluster_enabled=True)).topology == "cluster"
    assert RedisConnector("redis://h1:1,h2:2", RedisConfig(master_name="m")).topology == "sentinel"
    assert RedisConnector("rediss://h1:1", RedisConfig()).address.tls
    assert RedisConnector("redis://h1:1", RedisConfig()).topology == "single"


def test_sentinel_urls_and_config() -> None:
    connector = RedisConnector("rediss://:secret@s1:26379,s2:26380/2", RedisConfig(master_name="mymaster"))
    assert connector.topology == "sentinel" and not connector.cluster
    assert connector.address.nodes == (("s1", 26379), ("s2", 26380))
    assert (connector.address.password, connector.address.db, connector.address.tls) == ("secret", 2, True)


def test_the_delayed_mover_in_steps_routes_as_the_script_does() -> None:
    assert route(b'{"RoutingKey":"orders","Priority":7}', "default") == ("orders", 7)
    assert route(b'{"routingkey":"lower","Priority":12}', "default") == ("lower", 9)
    assert route(b'{"RoutingKey":"","Priority":0}', "default") == ("default", 0)
    assert route(b"not json", "default") == ("default", 0)
