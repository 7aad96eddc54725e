"""Every duration setting is finite and at most a day.

Each is handed to an asyncio timer, a socket timeout or a Redis expiry,
whose limits a value such as 1e30 s or 2**63 ms passes: the start must stop
with a line naming the variable, not serve and then fail every claim or
connection (the Redis side: tests/integration/test_cluster_member.py).
"""

from __future__ import annotations

import pytest

from gateway.config import MAX_DURATION_MS, ConfigError, Settings

REDIS = {"REDIS_URL": "redis://127.0.0.1:6379/0"}

#: Each duration in whole milliseconds, with the least it takes.
MILLISECONDS = {
    "UPSTREAM_CONNECT_TIMEOUT_MS": 1, "UPSTREAM_FIRST_TOKEN_TIMEOUT_MS": 1,
    "UPSTREAM_IDLE_TIMEOUT_MS": 1, "ERROR_TTL_MS": 0, "QUEUE_TIMEOUT_MS": 1,
    "FIRST_TOKEN_PING_INTERVAL_MS": 0, "CLUSTER_LEASE_MS": 1000, "CLUSTER_REDIS_TIMEOUT_MS": 1,
}
#: Each duration in seconds (a number), with the least it takes.
SECONDS = {
    "PING_INTERVAL_S": 0.01, "DRAIN_TIMEOUT_S": 0.0, "CLIENT_IDLE_TIMEOUT_S": 0.1,
    "CLIENT_HEADER_TIMEOUT_S": 0.1, "CLIENT_BODY_TIMEOUT_S": 0.1, "STREAM_MAX_LAG_S": 0.1,
}


def refused(variable: str, value: str) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(REDIS | {variable: value})
    assert raised.value.variable == variable
    assert "\n" not in str(raised.value)
    return raised.value


@pytest.mark.parametrize("variable", sorted(MILLISECONDS))
@pytest.mark.parametrize("value", [
    str(MAX_DURATION_MS + 1), str(2**63 - 1), str(10**23), "1e30", "inf", "nan", "-1", "1.5",
])
def test_a_millisecond_duration_past_a_day_or_not_a_whole_number_stops_the_start(variable, value):
    # 2**63 - 1: Redis refuses it as an expiry; 10**23: not even a 64-bit integer.
    assert "<= 86400000" in str(refused(variable, value))


@pytest.mark.parametrize("variable", sorted(SECONDS))
@pytest.mark.parametrize("value", ["86400.001", "1e30", "inf", "-inf", "nan", "-1"])
def test_a_duration_in_seconds_past_a_day_or_infinite_stops_the_start(variable, value):
    assert "<= 86400" in str(refused(variable, value))


@pytest.mark.parametrize("variable", sorted(MILLISECONDS))
def test_a_millisecond_duration_from_its_least_to_a_day_is_taken(variable):
    field = variable.lower()
    for value in (MILLISECONDS[variable], MAX_DURATION_MS):
        settings = Settings.from_env(REDIS | {variable: str(value)})
        assert getattr(settings, field) == value
    refused(variable, str(MILLISECONDS[variable] - 1))


@pytest.mark.parametrize("variable", sorted(SECONDS))
def test_a_duration_in_seconds_from_its_least_to_a_day_is_taken(variable):
    field = variable.lower()
    for value in (SECONDS[variable], 86400.0):
        assert getattr(Settings.from_env(REDIS | {variable: str(value)}), field) == value
    refused(variable, str(SECONDS[variable] - 0.001))
