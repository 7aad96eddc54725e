"""A Redis URL in logs (gateway/cluster/directory.py, gateway/app.py): its
password, in the userinfo or as redis-py's ``password`` query parameter,
never appears."""

from __future__ import annotations

import pytest

from gateway.app import make_app
from gateway.cluster.directory import redis_location
from gateway.config import Settings
from gateway.redact import redact

PASSWORD = "hunter2-redis-password"


@pytest.mark.parametrize(("url", "logged"), [
    (f"redis://:{PASSWORD}@10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    (f"redis://default:{PASSWORD}@10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    (f"redis://10.0.0.5:6379/0?password={PASSWORD}", "redis://10.0.0.5:6379/0?password=[redacted]"),
    (f"rediss://10.0.0.5:6380/1?socket_timeout=1&password={PASSWORD}&db=1",
     "rediss://10.0.0.5:6380/1?socket_timeout=1&password=[redacted]&db=1"),
    (f"unix:///run/redis.sock?db=2&password={PASSWORD}", "unix:///run/redis.sock?db=2&password=[redacted]"),
    ("redis://10.0.0.5:6379/0?password=p@ss", "redis://10.0.0.5:6379/0?password=[redacted]"),
])
def test_the_logged_redis_location_has_no_password(url: str, logged: str):
    assert redis_location(url) == logged


def test_a_redis_password_in_the_query_is_kept_out_of_every_log_line():
    """The log processor and the error boundary redact the configured
    secrets (gateway/redact.py): a password given as a query parameter is one."""
    url = f"redis://10.0.0.5:6379/0?password={PASSWORD}"
    make_app(Settings(host="127.0.0.1", port=0, upstream_url="http://127.0.0.1:9/v1", redis_url=url))
    assert PASSWORD not in redact(f"connecting to {url} failed")
