"""An ``H2Pool`` with the gateway's default settings, any of them overridden."""

from __future__ import annotations

from typing import Any

from gateway.config import Settings
from gateway.routing.setup import transport_options
from gateway.upstream.h2.pool import H2Pool
from gateway.upstream.origin import Origin


def h2_pool(url: str, **overrides: Any) -> H2Pool:
    options = transport_options(Settings())
    settings: dict[str, Any] = {
        "max_connections": options.max_connections,
        "connect_timeout": options.connect_timeout,
        "slot_timeout": options.wait_timeout,
        "ping_interval": options.ping_interval,
        "ping_timeout": options.ping_timeout,
        "max_streams_per_connection": options.max_streams_per_connection,
    }
    settings.update(overrides)
    return H2Pool(Origin.parse(url), **settings)
