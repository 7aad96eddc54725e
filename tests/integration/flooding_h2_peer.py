"""HTTP/2 upstreams (h2c) that do not read what the client sends.

``flooding_h2_peer``: its first connection, at its first request, stops
reading and sends ``count`` copies of ``frame`` (PING or SETTINGS, each of
which asks for an acknowledgement: RFC 9113 §6.7, §6.5.3) in one write, as
a flooding peer does (§10.5), after the response head and a first chunk if
``after_first_token``; it then holds the connection open and says nothing.
Later connections answer every request in full ("t0 t1 t2 " and
``data: [DONE]``).

``deaf_h2_peer``: grants the client all the send window HTTP/2 allows
(§6.9) and reads nothing until the test sets ``listen``; meanwhile the test
may send it ``pings`` to send. Then it reads everything, answers each
request with a 200 head that ends the stream, and counts the PING ACKs it
gets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import PingFrame

from tests.integration.peer_server import serving

TOKENS = 3
#: The largest flow-control window (RFC 9113 §6.9.1).
MAX_WINDOW = 2**31 - 1


def chunk(text: str) -> bytes:
    payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@dataclass
class FloodingPeer:
    port: int
    connections: int = 0
    requests: int = 0
    #: Set once the flood is written.
    flooded: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def flooding_h2_peer(
    *, frame: bytes, count: int, after_first_token: bool
) -> AsyncIterator[FloodingPeer]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.connections += 1
        floods = peer.connections == 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65_536):
                for event in conn.receive_data(data):
                    if not isinstance(event, h2.events.RequestReceived):
                        continue
                    assert event.stream_id is not None
                    peer.requests += 1
                    head = [(":status", "200"), ("content-type", "text/event-stream")]
                    conn.send_headers(event.stream_id, head)
                    if floods:
                        if after_first_token:
                            conn.send_data(event.stream_id, chunk("t0 "))
                        writer.write(conn.data_to_send() + frame * count)
                        peer.flooded.set()
                        await asyncio.Event().wait()  # reads nothing more, until cancelled
                    for i in range(TOKENS):
                        conn.send_data(event.stream_id, chunk(f"t{i} "))
                    conn.send_data(event.stream_id, b"data: [DONE]\n\n", end_stream=True)
                writer.write(conn.data_to_send())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async with serving(serve) as port:
        peer = FloodingPeer(port)
        yield peer


@dataclass
class DeafPeer:
    port: int
    #: Set by the test: read what the client sent, and answer.
    listen: asyncio.Event = field(default_factory=asyncio.Event)
    #: PINGs to send while deaf (each a frame's worth of bytes).
    pings: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    #: Request body bytes received.
    body_bytes: int = 0
    #: One item per PING ACK received.
    ping_acks: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)


@asynccontextmanager
async def deaf_h2_peer() -> AsyncIterator[DeafPeer]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW}
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(MAX_WINDOW - 65_535)
        writer.write(conn.data_to_send())

        async def send_pings() -> None:
            while True:
                writer.write(await peer.pings.get())

        sender = asyncio.create_task(send_pings())
        try:
            await peer.listen.wait()
            sender.cancel()
            while data := await reader.read(1 << 20):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        assert event.stream_id is not None and event.data is not None
                        peer.body_bytes += len(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                    elif isinstance(event, h2.events.PingAckReceived):
                        assert event.ping_data is not None
                        peer.ping_acks.put_nowait(event.ping_data)
                    elif isinstance(event, h2.events.StreamEnded):
                        assert event.stream_id is not None
                        conn.send_headers(event.stream_id, [(":status", "200")], end_stream=True)
                writer.write(conn.data_to_send())
        except ConnectionError:
            pass
        finally:
            sender.cancel()
            with suppress(asyncio.CancelledError):
                await sender
            writer.close()

    async with serving(serve) as port:
        peer = DeafPeer(port)
        yield peer


def ping(number: int) -> bytes:
    return PingFrame(0, opaque_data=number.to_bytes(8, "big")).serialize()
