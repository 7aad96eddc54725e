"""Cluster mode's internal hop serves any stream by its key: it listens
where only the members can reach it."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings, cluster_listen_host

REDIS = {"REDIS_URL": "redis://127.0.0.1:6379/0"}


@pytest.mark.parametrize(("host", "advertised", "listens_on"), [
    ("10.0.0.5", None, "127.0.0.1"),
    ("0.0.0.0", None, "127.0.0.1"),
    ("::", None, "::1"),
    ("0.0.0.0", "http://127.0.0.1:9100", "127.0.0.1"),
    ("0.0.0.0", "http://[::1]:9100", "::1"),
    ("0.0.0.0", "http://localhost:9100", "localhost"),
], ids=["a host address", "every interface", "every IPv6 interface", "advertised on loopback",
        "advertised on IPv6 loopback", "advertised on localhost"])
def test_members_on_one_host_meet_on_loopback(host, advertised, listens_on):
    # Whatever GATEWAY_HOST is: no other host has any business there.
    assert cluster_listen_host(host, advertised) == listens_on
    env = REDIS | {"GATEWAY_HOST": host} | ({} if advertised is None else
                                           {"CLUSTER_ADVERTISE_URL": advertised})
    assert Settings.from_env(env).cluster_secret == ""


def test_members_on_several_hosts_listen_on_the_gateway_host_with_a_secret():
    env = REDIS | {"GATEWAY_HOST": "0.0.0.0", "CLUSTER_ADVERTISE_URL": "http://10.0.0.5:9100"}
    assert cluster_listen_host("0.0.0.0", env["CLUSTER_ADVERTISE_URL"]) == "0.0.0.0"
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert raised.value.variable == "CLUSTER_SECRET"
    assert Settings.from_env(env | {"CLUSTER_SECRET": "s"}).cluster_secret == "s"


@pytest.mark.parametrize("secret", ["two\nlines", "a\rb", "a bell \x07", "del \x7f"],
                         ids=["a line feed", "a carriage return", "a control character", "DEL"])
def test_a_secret_no_header_can_carry_is_a_start_up_error_that_hides_it(secret):
    """The secret goes in an Authorization header (RFC 9110 section 5.5: no
    control character but a tab): aiohttp refuses to send any other, so
    every request that follows another member would fail."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | {"CLUSTER_SECRET": secret})
    assert raised.value.variable == "CLUSTER_SECRET"
    assert secret not in str(raised.value)


def test_a_secret_with_spaces_tabs_or_beyond_ascii_is_taken():
    secret = "a shared\tsecret, é"
    assert Settings.from_env(REDIS | {"CLUSTER_SECRET": secret}).cluster_secret == secret


@pytest.mark.parametrize("url", ["https://10.0.0.5:9000", "10.0.0.5:9000", "http://user:pw@10.0.0.5",
                                 "http://10.0.0.5:abc", "http://10.0.0.5:70000", "http://:9000"])
def test_a_bad_advertised_address_stops_the_start_naming_it(url):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | {"CLUSTER_ADVERTISE_URL": url})
    assert raised.value.variable == "CLUSTER_ADVERTISE_URL"


@pytest.mark.parametrize("url", [
    "redis://:pass-CANARY@127.0.0.1:6379/0?socket_timout=1",  # a typo of socket_timeout
    "rediss://:pass-CANARY@127.0.0.1:6379/0?ssl_cert_reqs=sometimes",
    "redis://:pass-CANARY@127.0.0.1:6379/0?protocol=4",
], ids=["an unknown option", "a bad TLS option", "a protocol redis-py does not speak"])
def test_a_redis_url_whose_connection_redis_py_would_refuse_stops_the_start(url):
    # redis-py reads the options only when it opens a connection: each
    # claim would then fail with a traceback, and the stop too.
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"REDIS_URL": url})
    assert raised.value.variable == "REDIS_URL"
    assert "\n" not in str(raised.value) and "CANARY" not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/gateway", "redis://127.0.0.1:6379/1/2",
                                 "rediss://127.0.0.1:6379/-1", "redis://127.0.0.1:0/0",
                                 "redis://127.0.0.1:pass-CANARY/0"])
def test_a_redis_url_with_no_usable_database_or_port_stops_the_start(url):
    # redis-py would use database 0 for "/gateway", and 12 for "/1/2"; port
    # 0 is no address (every claim would find Redis down); a password
    # written where the port goes is not quoted.
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"REDIS_URL": url})
    assert raised.value.variable == "REDIS_URL"
    assert "CANARY" not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379", "redis://127.0.0.1:6379/",
                                 "redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/15/",
                                 "unix:///run/redis.sock?db=2"])
def test_a_redis_url_with_a_database_number_or_none_is_taken(url):
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["http://10.0.0.5:9100/cluster", "http://10.0.0.5:9100?x=1",
                                 "http://10.0.0.5:0"])
def test_an_advertised_address_with_what_no_member_would_use_stops_the_start(url):
    # Members use the listener's own paths: a path or query would be
    # dropped; port 0 is no address (and worker i would bind port i).
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | {"CLUSTER_ADVERTISE_URL": url, "CLUSTER_SECRET": "s"})
    assert raised.value.variable == "CLUSTER_ADVERTISE_URL"


@pytest.mark.parametrize("url", ["http://:s-CANARY@10.0.0.5:9100", "http://10.0.0.5:9100?token=CANARY",
                                 "http://10.0.0.5:9100/#CANARY"])
def test_a_refused_advertised_address_is_shown_without_what_may_be_a_secret(url):
    # The cluster secret written as a password or a token, as UPSTREAM_URL's
    # user, password and query are never shown.
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | {"CLUSTER_ADVERTISE_URL": url, "CLUSTER_SECRET": "s"})
    assert raised.value.variable == "CLUSTER_ADVERTISE_URL"
    assert "CANARY" not in str(raised.value) and "10.0.0.5:9100" in str(raised.value)


def test_each_workers_advertised_port_must_be_a_port():
    # Worker i binds PORT+i: the socket layer takes 65536 as port 0, a random port.
    env = REDIS | {"CLUSTER_ADVERTISE_URL": "http://127.0.0.1:65534", "GATEWAY_WORKERS": "3"}
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    assert raised.value.variable == "CLUSTER_ADVERTISE_URL"
    assert "PORT at most 65533" in str(raised.value)
    assert Settings.from_env(env | {"GATEWAY_WORKERS": "2"}).workers == 2
    assert Settings.from_env(env | {"CLUSTER_ADVERTISE_URL": "http://127.0.0.1/"}).workers == 3
