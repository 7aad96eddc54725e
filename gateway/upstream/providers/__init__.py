"""Providers: build the upstream request, decode its stream into ``Delta``s."""

from __future__ import annotations

from gateway.upstream.providers.anthropic import AnthropicProvider
from gateway.upstream.providers.base import Provider, ProviderDecoder
from gateway.upstream.providers.openai import OpenAIProvider

__all__ = [
    "AnthropicProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderDecoder",
    "get_provider",
]

PROVIDER_NAMES = ("openai", "anthropic")


def get_provider(name: str, *, max_event_bytes: int = 1 << 20) -> Provider:
    """The provider for an UPSTREAM_FORMAT value."""
    if name == "openai":
        return OpenAIProvider(max_event_bytes=max_event_bytes)
    if name == "anthropic":
        return AnthropicProvider(max_event_bytes=max_event_bytes)
    raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDER_NAMES)}")
