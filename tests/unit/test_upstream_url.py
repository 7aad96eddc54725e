"""An upstream's URL, from UPSTREAM_URL or a routing file's ``url``: taken
as written, or refused at start with a line naming where it came from."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, Settings
from gateway.routing.config import RoutingConfigError, parse_routing
from gateway.upstream.origin import Origin


def _file(url: str) -> str:
    return f'[[upstream]]\nname = "a"\nurl = "{url}"\n'


@pytest.mark.parametrize("url", ["http://127.0.0.1:0/v1", "https://api.example.com:0/v1"])
def test_port_0_is_refused_rather_than_taken_for_the_default_port(url):
    # Not "no port": the scheme's default (80 or 443) is another upstream.
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"UPSTREAM_URL": url})
    assert raised.value.variable == "UPSTREAM_URL"
    with pytest.raises(RoutingConfigError, match=r"line 3: upstream\[0\]\.url: "):
        parse_routing(_file(url), {})


@pytest.mark.parametrize(("url", "port"), [
    ("http://127.0.0.1:8000/v1", 8000), ("http://127.0.0.1/v1", 80),
    ("https://api.example.com/v1", 443), ("https://[::1]:8443/v1", 8443),
])
def test_a_port_or_none_is_taken(url, port):
    settings = Settings.from_env({"UPSTREAM_URL": url})
    assert settings.upstream_url == url
    (upstream,) = parse_routing(_file(url), {}).upstreams
    assert upstream.url == url
    assert Origin.parse(url).port == port


@pytest.mark.parametrize("url", [
    "https://example.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-06-01",
    "https://generativelanguage.example.com/v1beta/openai?key=key-CANARY",
    "http://127.0.0.1:8000/v1#token=CANARY",
])
def test_a_query_or_fragment_is_refused_rather_than_dropped(url):
    # Requests go to the URL's path + /chat/completions: a query (an
    # api-version, a key) or a fragment never reached the upstream.
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"UPSTREAM_URL": url})
    assert raised.value.variable == "UPSTREAM_URL"
    assert "CANARY" not in str(raised.value)
    with pytest.raises(RoutingConfigError, match=r"line 3: upstream\[0\]\.url: ") as refused:
        parse_routing(_file(url), {})
    assert "CANARY" not in str(refused.value)
