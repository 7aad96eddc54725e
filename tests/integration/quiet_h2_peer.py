"""A bare HTTP/2 server that answers each request with a head (and, if
asked, one DATA frame), or not at all, and then says nothing: for the
deadlines of the h2 client and the source. It may grant no stream window
(SETTINGS_INITIAL_WINDOW_SIZE 0, RFC 9113 §6.5.2, and never a
WINDOW_UPDATE), take one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS),
and refuse its first requests (RST_STREAM(REFUSED_STREAM), §8.7). It may
serve only its first ``serve_connections`` connections and turn the later
ones away, as a server at its connection limit does: ``turn_away="close"``
closes them at once, ``"silent"`` accepts them and never sends its preface.
The RST_STREAMs it receives are counted, and the writes (TCP segments) its
served connections received."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from gateway.config import Settings
from tests.loopback import data_segments_received


@dataclass
class QuietPeer:
    port: int
    #: Stream ids the client reset, in order.
    resets: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    #: Stream ids of the requests received, refused or not, in order.
    requests: list[int] = field(default_factory=list)
    #: Connections accepted, served or turned away.
    connections: int = 0
    #: Set with each turned-away connection once it has ended.
    turned_away: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    #: The sockets of the connections it serves.
    sockets: list[socket.socket] = field(default_factory=list)

    def segments_received(self) -> int:
        """The client's writes (TCP segments with data) its served
        connections have received so far."""
        return sum(data_segments_received(sock) for sock in self.sockets)


@asynccontextmanager
async def quiet_h2_peer(
    *,
    head: bool = True,
    first_data: bytes | None = None,
    initial_window_size: int | None = None,
    max_concurrent_streams: int | None = None,
    refuse_first: int = 0,
    serve_connections: int | None = None,
    turn_away: Literal["close", "silent"] = "close",
) -> AsyncIterator[QuietPeer]:
    """Serve until the block ends; the caller closes its client first (the
    peer then reads the end of the connection and stops)."""
    peer_done = asyncio.Event()
    resets: asyncio.Queue[int] = asyncio.Queue()
    requests: list[int] = []
    settings: dict[int, int] = {}
    if initial_window_size is not None:
        settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window_size
    if max_concurrent_streams is not None:
        settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = max_concurrent_streams
    refused = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refused
        peer.connections += 1
        number = peer.connections
        if serve_connections is not None and number > serve_connections:
            try:
                if turn_away == "silent":
                    while await reader.read(65_536):
                        pass  # until the client gives up on it
            except ConnectionError:
                pass
            finally:
                writer.close()
                peer.turned_away.put_nowait(number)
            return
        peer.sockets.append(writer.get_extra_info("socket"))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        if settings:
            # In the first SETTINGS frame: in force from the client's first stream.
            conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65_536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        assert event.stream_id is not None
                        requests.append(event.stream_id)
                    if isinstance(event, h2.events.RequestReceived) and refused < refuse_first:
                        assert event.stream_id is not None
                        refused += 1
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    elif isinstance(event, h2.events.RequestReceived) and head:
                        assert event.stream_id is not None
                        conn.send_headers(event.stream_id, [(":status", "200")])
                        if first_data is not None:
                            conn.send_data(event.stream_id, first_data)
                    elif isinstance(event, h2.events.StreamReset):
                        assert event.stream_id is not None
                        resets.put_nowait(event.stream_id)
                writer.write(conn.data_to_send())
        finally:
            writer.close()
            peer_done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    peer = QuietPeer(server.sockets[0].getsockname()[1], resets, requests)
    try:
        yield peer
        await asyncio.wait_for(peer_done.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


def gateway_settings(peer: QuietPeer, **overrides: Any) -> Settings:
    """A gateway's settings with ``peer`` as its one upstream, over h2c."""
    return Settings(
        host="127.0.0.1",
        port=0,
        upstream_url=f"http://127.0.0.1:{peer.port}/v1",
        upstream_protocol="h2c",
        **overrides,
    )
