"""What a provider is: a request builder, a stream decoder, an error reader.

Providers are sans-IO: they turn the client's OpenAI chat request into an
``UpstreamRequest`` and raw response body bytes into provider-neutral
``Delta``s; the transport moves the bytes. The gateway always streams
upstream (a streaming and a non-streaming client share one upstream call), so
every request a provider builds asks for a stream.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol

from actors.deltas import Delta, StreamInfo
from gateway.errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.base import Headers, ResponseHead, UpstreamRequest
from gateway.upstream.sse_decoder import SSEDecoder, SSEEvent


class ProviderDecoder(Protocol):
    """One response body in, ``Delta``s out, incrementally."""

    def feed(self, data: bytes) -> list[Delta]:
        """Decode the next piece of the body (any byte boundary).

        Raises ``UpstreamError`` subclasses: ``UpstreamStatusError`` for an
        in-stream error event, ``UpstreamProtocolError`` for bytes that make
        no sense. A piece that decodes to deltas before such an error
        returns them, and the error is ``failure`` from then on."""
        ...

    def close(self) -> list[Delta]:
        """The body ended. Raises ``UpstreamProtocolError`` if the stream ended
        without its terminator (``[DONE]`` / ``message_stop``): a truncated
        answer must not pass for a complete one."""
        ...

    @property
    def done(self) -> bool:
        """The terminator was seen; the answer is complete."""
        ...

    @property
    def failure(self) -> UpstreamError | None:
        """The error that ended the body after the deltas ``feed`` last
        returned; raised again by ``feed`` and ``close``."""
        ...


class Provider(Protocol):
    #: "openai" or "anthropic" (the values of UPSTREAM_FORMAT).
    name: str

    def build_request(
        self, chat: Mapping[str, Any], *, base_path: str, api_key: str | None
    ) -> UpstreamRequest:
        """The streaming upstream request for a validated OpenAI chat request.

        ``base_path`` is the path of UPSTREAM_URL (e.g. ``/v1``)."""
        ...

    def decoder(self) -> ProviderDecoder:
        """A fresh decoder for one response body."""
        ...

    def error_from_response(self, head: ResponseHead, body: bytes) -> UpstreamStatusError:
        """The error for a non-2xx response, with the provider's message."""
        ...


def join_path(base_path: str, endpoint: str) -> str:
    """``/v1`` + ``/messages`` -> ``/v1/messages``; tolerant of a trailing slash."""
    return base_path.rstrip("/") + endpoint


@functools.lru_cache(maxsize=64)
def request_head(
    base_path: str, endpoint: str, headers: Headers, auth: tuple[str, str] | None
) -> tuple[str, Headers]:
    """The path and headers of a request to one upstream's ``endpoint``:
    the same for all its requests, so built once (an open stream holds its
    request until the first token, for a retry)."""
    return join_path(base_path, endpoint), headers if auth is None else (*headers, auth)


class EventStreamDecoder(ABC):
    """The shape both providers share: SSE events in, ``Delta``s out, and a
    terminator event that marks a complete answer.

    Subclasses implement ``handle_event``; it may call ``finish()`` when it
    sees the terminator. Anything after the terminator is ignored: the answer
    is complete and a trailing keepalive must not turn it into an error.
    """

    __slots__ = ("_sse", "_done", "_info", "_failure")

    #: How the terminator is named in the truncation error message.
    terminator: str = "its terminator"
    #: Whether an ``error:`` line is an ``error`` event (``SSEDecoder``).
    error_lines: bool = False

    def __init__(self, *, max_event_bytes: int = 1 << 20) -> None:
        self._sse = SSEDecoder(max_event_bytes=max_event_bytes, error_lines=self.error_lines)
        self._done = False
        self._info: StreamInfo | None = None
        self._failure: UpstreamError | None = None

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failure(self) -> UpstreamError | None:
        return self._failure

    def feed(self, data: bytes) -> list[Delta]:
        if self._failure is not None:
            raise self._failure
        if self._done:
            return []
        deltas: list[Delta] = []
        try:
            for event in self._sse.feed(data):
                delta = self.handle_event(event)
                if delta is not None:
                    if self._info is not None:
                        delta, self._info = replace(delta, info=self._info), None
                    deltas.append(delta)
                if self._done:
                    break
        except UpstreamError as exc:
            if not deltas:
                raise
            # One read may hold an answer's last deltas and the error that
            # ends it: they go first, the error after them.
            self._failure = exc
        return deltas

    def close(self) -> list[Delta]:
        if self._failure is not None:
            raise self._failure
        self._sse.close()
        if not self._done:
            raise UpstreamProtocolError(f"upstream stream ended before {self.terminator}")
        return []

    def finish(self) -> None:
        self._done = True

    def announce(self, info: StreamInfo) -> None:
        """Carry ``info`` on the next delta: no delta of its own, so sequence
        numbers count only what the answer says."""
        self._info = info

    @abstractmethod
    def handle_event(self, event: SSEEvent) -> Delta | None:
        """One SSE event -> at most one ``Delta`` (``None``: nothing to show)."""
