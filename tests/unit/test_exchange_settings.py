"""EXCHANGE_LOG_* and GATEWAY_ADMIN_KEYS as the gateway reads them."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings
from gateway.exchanges.postgres import safe_description
from gateway.exchanges.store import postgres_pool_options, sqlite_path


def test_the_log_is_off_unless_a_url_is_given():
    settings = Settings.from_env({})
    assert settings.exchange_log_url is None
    assert (settings.exchange_log_content, settings.exchange_log_queue) == (False, 10_000)
    assert settings.exchange_log_queue_bytes == 64 * 1_048_576
    assert Settings.from_env({"EXCHANGE_LOG_QUEUE_BYTES": "2097152"}).exchange_log_queue_bytes == 2_097_152
    assert settings.gateway_admin_keys == ()


@pytest.mark.parametrize("url", [
    "sqlite:///.gateway/exchanges.db",
    "sqlite:////var/lib/llm-gateway/exchanges.db",
    "postgresql://gateway@db.internal:5432/gateway",
    "postgres://gateway:secret@127.0.0.1/gateway?statement_cache_size=0",
])
def test_accepted_urls(url):
    settings = Settings.from_env({"EXCHANGE_LOG_URL": url, "EXCHANGE_LOG_CONTENT": "1",
                                  "GATEWAY_ADMIN_KEYS": "a, b"})
    assert settings.exchange_log_url == url
    assert settings.exchange_log_content is True
    assert settings.gateway_admin_keys == ("a", "b")
    # A password in the URL stays out of the settings' repr (start-up logs).
    assert "secret" not in repr(settings)


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://x.db", "sqlite:///", "sqlite:///dir/",
                                 "sqlite:///:memory:", "postgresql:///nohost", "exchanges.db",
                                 "postgresql://db.internal/gw?statement_cache_size=off"])
def test_refused_urls_name_the_variable(url):
    """Each refused at start, with the forms allowed. ``:memory:`` too: the
    writer's connection and the reader's would each get a database of their
    own, the log written where nothing can read it, and lost at exit."""
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"EXCHANGE_LOG_URL": url})
    assert raised.value.variable == "EXCHANGE_LOG_URL"
    assert "sqlite:///" in str(raised.value)


def test_a_refused_url_is_not_echoed_for_it_may_hold_a_password():
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"EXCHANGE_LOG_URL": "postgresql://user:hunter2-secret@/db"})
    assert "hunter2" not in str(raised.value)


def test_sqlite_paths_are_relative_with_three_slashes_absolute_with_four():
    assert sqlite_path("sqlite:///.gateway/exchanges.db") == ".gateway/exchanges.db"
    assert sqlite_path("sqlite:////var/lib/x.db") == "/var/lib/x.db"


def test_a_postgres_url_is_described_without_its_credentials():
    described = safe_description("postgresql://gateway:secret@db.internal:5432/gw")
    assert described == "postgresql db.internal:5432/gw"


def test_the_statement_cache_size_is_the_pools_and_leaves_the_url():
    # asyncpg would send it to the server as a run-time setting, refused there.
    assert postgres_pool_options(
        "postgresql://gw:secret@db.internal:6432/gw?sslmode=require&statement_cache_size=0"
    ) == ("postgresql://gw:secret@db.internal:6432/gw?sslmode=require", {"statement_cache_size": 0})
    # Without it the URL is passed on as written, its other options as encoded.
    plain = "postgresql://gw@/gw?host=%2Fvar%2Frun%2Fpostgresql&sslmode=prefer"
    assert postgres_pool_options(plain) == (plain, {})
