"""A small OpenAI-style HTTP/2 upstream (h2c) that fails on purpose.

Each request is answered with ``tokens`` chat-completion chunks ("t0 ",
"t1 ", ...) and ``data: [DONE]``. Two kinds of misbehaviour:

- ``refuse_first=K``: the first K requests get RST_STREAM(REFUSED_STREAM)
  (RFC 9113 §8.7), unprocessed.
- ``goaway_after=N``: a connection serves N requests (nginx's
  ``keepalive_requests``, hypercorn's ``keep_alive_max_requests``). At the
  arrival of request N + 1 it sends GOAWAY. ``goaway_style="rfc"``: with the
  Nth stream as last-stream-id, so that request and any after it are above
  it and never answered (RFC 9113 §6.8); once its first N answers are done
  it closes the connection. ``goaway_style="hypercorn"``: as hypercorn does,
  through h2's ``close_connection()``, whose last-stream-id covers every
  request received, and with h2's state closed the answers in flight are
  dropped: the connection closes under them.
- ``goaway_at_once=K``: the first K connections send their SETTINGS and
  GOAWAY(NO_ERROR, last-stream-id 0) in one write, as a server shutting
  down may do with the connections it still accepts, and serve nothing.
- ``fault``: after ``tokens_before_fault`` chunks of an answer, and once the
  test sets ``go``, the connection ``kill``s (TCP abort), sends a GOAWAY with
  an error code and closes (``goaway_error``), breaks the protocol (a
  SETTINGS frame on a stream, RFC 9113 §6.5: ``protocol_error``), or goes
  ``silent``: it reads and writes nothing more, answers no PING, and keeps
  the socket open.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from tests.integration.peer_server import cancel_and_wait, serving

Fault = Literal["kill", "goaway_error", "protocol_error", "silent"]


def chunk(text: str) -> bytes:
    payload = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def answer_text(tokens: int) -> str:
    return "".join(f"t{i} " for i in range(tokens))


@dataclass
class FaultyPeer:
    port: int
    #: Set to let a fault happen (set from the start unless asked otherwise).
    go: asyncio.Event
    #: Requests received, across connections, answered or not.
    requests: int = 0
    connections: int = 0
    goaways: int = 0
    #: Requests above a GOAWAY's last-stream-id: never answered.
    unanswered: int = 0
    #: Requests refused with RST_STREAM(REFUSED_STREAM).
    refused: int = 0
    #: Set when a fault has happened.
    faulted: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def faulty_h2_peer(
    *,
    tokens: int = 5,
    token_gap_s: float = 0.001,
    refuse_first: int = 0,
    goaway_after: int | None = None,
    goaway_style: Literal["rfc", "hypercorn"] = "rfc",
    goaway_at_once: int = 0,
    fault: Fault | None = None,
    tokens_before_fault: int = 2,
    wait_for_go: bool = False,
) -> AsyncIterator[FaultyPeer]:
    go = asyncio.Event()
    if not wait_for_go:
        go.set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        if peer.connections <= goaway_at_once:
            conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=0)
            peer.goaways += 1
            writer.write(conn.data_to_send())
            try:
                # Closed once the client has closed: closing with its preface
                # unread would reset the connection, GOAWAY and all.
                while await reader.read(65_536):
                    pass
            except ConnectionError:
                pass
            finally:
                writer.close()
            return
        writer.write(conn.data_to_send())
        answers: set[asyncio.Task[None]] = set()
        served = 0
        last_id: int | None = None
        stopped = asyncio.Event()  # the fault ended this connection

        def flush() -> None:
            if not writer.is_closing():
                writer.write(conn.data_to_send())

        def maybe_close() -> None:
            if last_id is not None and not answers and not writer.is_closing():
                conn.close_connection(ErrorCodes.NO_ERROR, last_stream_id=last_id)
                flush()
                writer.close()

        async def misbehave() -> None:
            await go.wait()
            if fault == "kill":
                writer.transport.abort()
            elif fault == "goaway_error":
                frame = GoAwayFrame(0, last_stream_id=max(conn.streams, default=0))
                frame.error_code = ErrorCodes.INTERNAL_ERROR
                writer.write(frame.serialize())
                writer.close()
            elif fault == "protocol_error":
                writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x01")  # SETTINGS on stream 1
            peer.faulted.set()
            stopped.set()

        async def answer(stream_id: int) -> None:
            conn.send_headers(stream_id, [(":status", "200"), ("content-type", "text/event-stream")])
            for i in range(tokens):
                if fault is not None and i == tokens_before_fault:
                    await misbehave()
                    return
                conn.send_data(stream_id, chunk(f"t{i} "))
                flush()
                await asyncio.sleep(token_gap_s)
            conn.send_data(stream_id, b"data: [DONE]\n\n", end_stream=True)
            flush()

        def answered(task: asyncio.Task[None]) -> None:
            answers.discard(task)
            maybe_close()

        try:
            while not stopped.is_set() and (data := await reader.read(65_536)):
                if stopped.is_set():
                    if fault == "silent":
                        await asyncio.Event().wait()  # reads nothing more, answers no PING
                    break
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    if not isinstance(event, h2.events.RequestReceived):
                        continue
                    assert event.stream_id is not None
                    peer.requests += 1
                    if last_id is not None:
                        peer.unanswered += 1
                        continue
                    if peer.refused < refuse_first:
                        peer.refused += 1
                        conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                        continue
                    if goaway_after is not None and served == goaway_after and goaway_style == "hypercorn":
                        conn.close_connection()
                        flush()
                        peer.goaways += 1
                        stopped.set()
                        break
                    if goaway_after is not None and served == goaway_after:
                        # This request arrived after the connection's quota:
                        # GOAWAY names the last one served, below it.
                        last_id = event.stream_id - 2
                        peer.goaways += 1
                        peer.unanswered += 1
                        flush()
                        writer.write(GoAwayFrame(0, last_stream_id=last_id).serialize())
                        continue
                    served += 1
                    task = asyncio.create_task(answer(event.stream_id))
                    answers.add(task)
                    task.add_done_callback(answered)
                if not stopped.is_set():
                    flush()
                maybe_close()
        except ConnectionError:
            pass
        finally:
            await cancel_and_wait(answers)
            writer.close()

    async with serving(serve) as port:
        peer = FaultyPeer(port, go)
        yield peer
