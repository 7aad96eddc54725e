"""An OpenAI-style HTTP/2 upstream (h2c) whose first connection breaks the
protocol once; later connections answer every request in full ("t0 t1 t2 "
and ``data: [DONE]``).

- ``bad_head=[...]``: the first request on connection 1 is answered with
  its head and its first chunk, and held; the second gets a response head
  with exactly these fields, malformed (RFC 9113 §8.1.1). Once the client
  has reset that stream, the first answer is finished.
- ``connection_error=True``: once ``hold`` requests have arrived on
  connection 1, unanswered, it sends a frame HTTP/2 forbids (SETTINGS on a
  stream, §6.5), a connection error (§5.4.1), and answers nothing more.

The RST_STREAMs the peer receives are recorded with their error codes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.integration.peer_server import cancel_and_wait, serving

#: SETTINGS on stream 1: a connection error of type PROTOCOL_ERROR (RFC 9113 §6.5).
SETTINGS_ON_A_STREAM = b"\x00\x00\x00\x04\x00\x00\x00\x00\x01"
TOKENS = 3


def chunk(text: str) -> bytes:
    payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def answer_text() -> str:
    return "".join(f"t{i} " for i in range(TOKENS))


@dataclass
class MalformedPeer:
    port: int
    connections: int = 0
    #: Requests received, on any connection.
    requests: int = 0
    #: (connection, stream id, error code) of each RST_STREAM received.
    resets: list[tuple[int, int, int]] = field(default_factory=list)


@asynccontextmanager
async def malformed_h2_peer(
    *, bad_head: list[tuple[str, str]] | None = None, connection_error: bool = False, hold: int = 2
) -> AsyncIterator[MalformedPeer]:

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.connections += 1
        number = peer.connections
        first = number == 1
        # Outbound validation off: the malformed head goes out as given.
        config = h2.config.H2Configuration(
            client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        answers: set[asyncio.Task[None]] = set()
        held: list[int] = []
        malformed_reset = asyncio.Event()

        def flush() -> None:
            if not writer.is_closing():
                writer.write(conn.data_to_send())

        async def answer(stream_id: int, *, wait_for_reset: bool = False) -> None:
            conn.send_headers(stream_id, [(":status", "200"), ("content-type", "text/event-stream")])
            for i in range(TOKENS):
                conn.send_data(stream_id, chunk(f"t{i} "))
                flush()
                if wait_for_reset and i == 0:
                    await malformed_reset.wait()
            conn.send_data(stream_id, b"data: [DONE]\n\n", end_stream=True)
            flush()

        def start(stream_id: int, *, wait_for_reset: bool = False) -> None:
            task = asyncio.create_task(answer(stream_id, wait_for_reset=wait_for_reset))
            answers.add(task)
            task.add_done_callback(answers.discard)

        try:
            while data := await reader.read(65_536):
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    if isinstance(event, h2.events.StreamReset):
                        assert event.stream_id is not None and event.error_code is not None
                        peer.resets.append((number, event.stream_id, event.error_code))
                        if len(held) == 2 and event.stream_id == held[1]:
                            malformed_reset.set()
                    if not isinstance(event, h2.events.RequestReceived):
                        continue
                    assert event.stream_id is not None
                    peer.requests += 1
                    if not first or not (bad_head or connection_error):
                        start(event.stream_id)
                        continue
                    held.append(event.stream_id)
                    if bad_head is not None and len(held) == 1:
                        start(event.stream_id, wait_for_reset=True)
                    elif bad_head is not None and len(held) == 2:
                        conn.send_headers(event.stream_id, bad_head)
                    elif connection_error and len(held) == hold:
                        flush()
                        writer.write(SETTINGS_ON_A_STREAM)
                flush()
        except ConnectionError:
            pass
        finally:
            await cancel_and_wait(answers)
            writer.close()

    async with serving(serve) as port:
        peer = MalformedPeer(port)
        yield peer
