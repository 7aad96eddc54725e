"""GATEWAY_API_KEYS and GATEWAY_ADMIN_KEYS as the gateway reads them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_keys_are_comma_separated_and_trimmed() -> None:
    settings = Settings.from_env(
        {"GATEWAY_API_KEYS": " sk-one-key , sk-two-key ,", "GATEWAY_ADMIN_KEYS": "sk-admin-key"}
    )
    assert settings.gateway_api_keys == ("sk-one-key", "sk-two-key")
    assert settings.gateway_admin_keys == ("sk-admin-key",)


@pytest.mark.parametrize("variable", ["GATEWAY_API_KEYS", "GATEWAY_ADMIN_KEYS"])
@pytest.mark.parametrize("key", ["sk two words", "sk-clé-1234", "sk-tab\tkey"])
def test_a_key_no_client_can_send_stops_the_start(variable: str, key: str) -> None:
    """A client's key is printable ASCII without spaces (RFC 7235's token68,
    what the gateway accepts in Authorization or x-api-key): a configured key
    that is not could never match, and every request would be a 401."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({variable: f"sk-good-key,{key}"})
    assert refused.value.variable == variable
    assert key not in str(refused.value)
    assert "printable ASCII without spaces" in str(refused.value)


def test_the_gateway_names_the_variable_and_not_the_key() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    # Port 0: a gateway that started after all takes no port another one needs.
    env |= {"GATEWAY_PORT": "0", "GATEWAY_API_KEYS": "sk-good-key,sk secret words"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "llm-stream-gateway: GATEWAY_API_KEYS='(hidden)' is not valid: comma-separated keys, "
        "each printable ASCII without spaces (what a client can send)"
    ]
