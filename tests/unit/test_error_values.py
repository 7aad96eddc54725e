"""What the gateway passes on from a provider's error (its code, its
Retry-After) and from a bad setting: only what is what it claims to be,
never a configured secret."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings
from gateway.errors import UpstreamStatusError, provider_code, retry_after_value
from gateway.redact import SECRETS

KEY = "sk-errors-CANARY-0123456789"


@pytest.fixture(autouse=True)
def configured_key() -> None:
    SECRETS.add(KEY)


@pytest.mark.parametrize("code", ["context_length_exceeded", "rate_limit_error", "model.not-found"])
def test_a_providers_identifier_code_is_passed_on(code):
    assert provider_code(code) == code
    assert UpstreamStatusError(400, "too long", code=code).code == code


@pytest.mark.parametrize("code", [f"code_Bearer {KEY}", KEY, "two words", "", "x" * 65, "é_code"])
def test_any_other_code_becomes_the_status(code):
    assert provider_code(code) is None
    error = UpstreamStatusError(400, "refused", code=code)
    assert (error.code, error.cause) == ("upstream_400", "upstream_400")


def test_the_metric_cause_is_the_status_whatever_the_code():
    assert UpstreamStatusError(429, "slow", code="rate_limit_exceeded").cause == "upstream_429"
    assert UpstreamStatusError(401, "no", code="invalid_api_key").cause == "upstream_auth_error"


@pytest.mark.parametrize(("value", "kept"), [
    ("7", "7"), (" 120 ", "120"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"),
    (f"7 {KEY}", None), ("soon", None), ("-1", None), ("7\r\nX-Injected: 1", None), (None, None),
])
def test_retry_after_is_kept_only_as_seconds_or_a_date(value, kept):
    assert retry_after_value(value) == kept
    assert UpstreamStatusError(429, "slow", retry_after=value).headers() == (
        {} if kept is None else {"Retry-After": kept})


def test_a_bad_upstream_url_is_shown_without_its_user_and_password():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"UPSTREAM_URL": "htp://user-CANARY:pass-CANARY@127.0.0.1:8000/v1"})
    assert "CANARY" not in str(raised.value)
    assert "htp://[redacted]@127.0.0.1:8000/v1" in str(raised.value)


@pytest.mark.parametrize(("variable", "url"), [
    ("EXCHANGE_LOG_URL", "postgresql://gw:pass-CANARY@db:99999/gw"),
    ("REDIS_URL", "redis://:pass-CANARY@127.0.0.1:abc/0"),
    ("REDIS_URL", "redis://:pass-CANARY@127.0.0.1:6379/0?socket_timeout=soon"),
])
def test_a_url_its_library_would_refuse_stops_the_start_unechoed(variable, url):
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({variable: url})
    assert raised.value.variable == variable
    assert "CANARY" not in str(raised.value)
