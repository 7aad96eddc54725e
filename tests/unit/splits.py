"""Cutting a byte stream every way a network can: the incremental decoders'
tests feed each of these and expect the same result as the whole."""

from __future__ import annotations

from collections.abc import Iterator

from actors.deltas import Delta
from gateway.upstream.base import ResponseHead
from gateway.upstream.providers.base import Provider


def every_split(stream: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and cut in two at every byte boundary."""
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(len(stream) + 1):  # the ends too: an empty read is legal
        yield [stream[:cut], stream[cut:]]


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def head(status: int, *headers: tuple[str, str]) -> ResponseHead:
    return ResponseHead(status=status, headers=headers, http_version="HTTP/2")


def decode_all(provider: Provider, chunks: list[bytes]) -> list[Delta]:
    """Feed ``chunks`` in order to a fresh decoder; its deltas, and it must
    have seen the provider's end of stream."""
    decoder = provider.decoder()
    deltas: list[Delta] = []
    for chunk in chunks:
        deltas += decoder.feed(chunk)
    deltas += decoder.close()
    assert decoder.done
    return deltas
