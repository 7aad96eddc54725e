"""The seam between the two protocol front ends and the simulated model.

Each front end (HTTP/2 on h2, HTTP/1.1 on aiohttp) turns a request into a
``SimRequest`` and offers a ``ResponseSink`` to write the answer through, so
the per-request script (generate.py) and the routes (app.py) are written once
and behave the same over both protocols. Failure injection is part of the
sink because what "reset this response" means differs: RST_STREAM on HTTP/2,
closing the connection on HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl

from gateway.sim.log import Record

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class SimRequest:
    method: str
    #: The path without the query string.
    path: str
    query: Mapping[str, str]
    #: Lower-case names; the last value wins for repeated names.
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    def from_target(
        cls, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> SimRequest:
        """From a request target (``/path?query``), as HTTP/2's ``:path`` carries it."""
        path, _, query = target.partition("?")
        return cls(method, path, dict(parse_qsl(query)), headers, body)

    @property
    def has_credentials(self) -> bool:
        return "authorization" in self.headers or "x-api-key" in self.headers


class PeerGone(Exception):
    """The client went away (reset the stream, closed the connection) while
    we were answering it: there is nobody left to write to."""


class ResponseSink(Protocol):
    """Where one response goes. Writes wait for the peer's flow control and
    raise ``PeerGone`` once the peer has left."""

    @property
    def http_version(self) -> str:
        """ "HTTP/2" or "HTTP/1.1". """
        ...

    @property
    def connection_id(self) -> int:
        """The connection the request came over (numbered by the server)."""
        ...

    def track(self, record: Record) -> None:
        """End ``record`` as disconnect/reset at the very moment the peer
        leaves, timed in the protocol's own callback (cancel latency is
        measured from it)."""
        ...

    async def send_head(
        self, status: int, headers: Headers, *, content_length: int | None = None
    ) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def finish(self, data: bytes = b"") -> None:
        """Send the last bytes and end the response."""
        ...

    def reset(self) -> None:
        """Abandon this response: RST_STREAM(INTERNAL_ERROR) / abort the connection."""
        ...

    def kill(self) -> None:
        """Abort the whole TCP connection, and every response on it."""
        ...

    def goaway(self, *, refuse: bool) -> None:
        """Announce the connection's end. ``refuse``: this request is not
        answered at all (HTTP/2: GOAWAY below its stream id; HTTP/1.1: the
        connection closes). Otherwise it is served, then the connection closes."""
        ...


async def respond(sink: ResponseSink, status: int, headers: Headers, body: bytes) -> None:
    """A whole response with a known length."""
    await sink.send_head(status, headers, content_length=len(body))
    await sink.finish(body)
