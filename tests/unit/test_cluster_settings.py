"""Cluster mode's settings: the internal hop needs CLUSTER_SECRET wherever
another host could reach it."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings, cluster_listen_host

REDIS = {"REDIS_URL": "redis://127.0.0.1:6379/0"}


@pytest.mark.parametrize(("env", "listens_on"), [
    ({"GATEWAY_HOST": "10.0.0.5"}, "10.0.0.5"),
    ({"GATEWAY_HOST": "0.0.0.0", "CLUSTER_ADVERTISE_URL": "http://127.0.0.1:9100"}, "0.0.0.0"),
    ({"GATEWAY_HOST": "127.0.0.1", "CLUSTER_ADVERTISE_URL": "http://10.0.0.5:9100"}, "127.0.0.1"),
], ids=["a host address", "every interface, advertised on loopback", "advertised to others"])
def test_a_hop_other_hosts_can_reach_needs_a_secret(env, listens_on):
    assert cluster_listen_host(env["GATEWAY_HOST"], env.get("CLUSTER_ADVERTISE_URL")) == listens_on
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | env)
    assert raised.value.variable == "CLUSTER_SECRET"
    assert Settings.from_env(REDIS | env | {"CLUSTER_SECRET": "s"}).cluster_secret == "s"


@pytest.mark.parametrize(("host", "listens_on"), [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("::1", "::1"),
])
def test_a_hop_only_this_host_can_reach_needs_none(host, listens_on):
    # Without an advertised address the members are on this host: a
    # wildcard GATEWAY_HOST puts the hop on loopback.
    assert cluster_listen_host(host, None) == listens_on
    assert Settings.from_env(REDIS | {"GATEWAY_HOST": host}).cluster_secret == ""


def test_without_redis_there_is_no_hop_to_guard():
    assert Settings.from_env({"GATEWAY_HOST": "10.0.0.5"}).redis_url is None
