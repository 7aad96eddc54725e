"""The recorder: one ``Exchange`` per upstream call, built as the answer streams.

The gateway makes a ``Call`` for every request (``Recorder.call()``), binds
its ``open_source`` to it and subscribes with ``Call.open``; only the
leader's is ever opened by its actor. The upstream source shows the call
each read's deltas as it decodes them (the call is its ``on_deltas``), so
each delta is seen once whatever the number of readers, and the stream's
read path gains no frame. Tokens are counted there, as they are reported,
whether the exchange log is on or not.

With the log on, ``joined()`` adds each subscription's request id to the
call of its stream, and ``stream_ended()``, the registry's port, called in
the tick the actor's stream ends (complete, failed, cancelled), builds the
record and hands it on. Nothing here awaits or touches a database.

Without content only lengths and a running SHA-256 of the answer are kept,
so a call holds no copy of the text it relays.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from actors.deltas import Delta
from actors.deltas import Usage as DeltaUsage
from actors.messages import Abandoned, Completed, Failed, Shutdown, StreamEnd, StreamEnded
from actors.ports import OpenSource, Source
from actors.subscription import Subscription
from gateway.errors import GatewayError, UpstreamStatusError, for_client
from gateway.exchanges.record import Exchange, Usage, joined, request_messages, utf8
from gateway.redact import redact

log = structlog.get_logger("gateway")

#: Tokens counted: (model, upstream, prompt tokens, completion tokens).
TokenMeter = Callable[[str, str, int, int], None]


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def new_exchange_id() -> str:
    return "xchg_" + secrets.token_hex(12)


class Recorder:
    """Calls by stream id, from the leader's subscription to the stream's end."""

    def __init__(
        self,
        *,
        upstream: str,
        keep_content: bool,
        on_exchange: Callable[[Exchange], None] | None,
        tokens: TokenMeter,
        record_failed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.keep_content = keep_content
        #: None: the exchange log is off (tokens are still counted).
        self._on_exchange = on_exchange
        self._tokens = tokens
        #: Counts a record lost to a failure of the recorder itself.
        self._record_failed = record_failed
        self._clock = clock
        self._process = process_name()
        self._calls: dict[int, Call] = {}

    @property
    def recording(self) -> bool:
        return self._on_exchange is not None

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    def call(self, body: Mapping[str, Any], model: str, upstream: str | None = None) -> Call:
        """A call for this request, to ``upstream`` (by name; default: the
        gateway's one upstream); ``bind()`` its opener before subscribing."""
        return Call(self, body, model, self.upstream if upstream is None else upstream)

    def joined(self, call: Call, subscription: Subscription, key_id: str | None) -> None:
        """A subscription was made with ``call`` as its opener: a leader's
        call is its stream's; a follower joins the call of the stream it
        reads (none for a remembered failure, whose call has ended)."""
        if subscription.role != "leader":
            # Never opened: let go of the opener now (it refers back to the
            # call) rather than leave a cycle to the garbage collector.
            call._open = None
            call._body = None
        if self._on_exchange is None:
            return  # tokens only: the call counts them itself, as they come
        if subscription.role == "leader":
            self._calls[subscription.stream_id] = call
            target: Call | None = call
        else:
            target = self._calls.get(subscription.stream_id)
        if target is not None:
            target.request_ids.append(subscription.request_id)
            if key_id is not None and key_id not in target.api_key_ids:
                target.api_key_ids.append(key_id)

    def stream_ended(self, event: StreamEnded) -> None:
        """The registry's port: the stream ``event.stream_id`` has ended."""
        call = self._calls.pop(event.stream_id, None)
        if call is None or call.started_at is None or self._on_exchange is None:
            return  # never reached the upstream (queue timeout, cancelled while queued)
        if call.failed:
            return  # its record is lost, and was counted when it failed
        try:
            self._on_exchange(call.finish(event.end, self._clock()))
        except Exception as exc:
            # Called from inside the actor's end: a bug here must not break it.
            self.failed(exc)

    def failed(self, exc: Exception) -> None:
        """The recorder failed on a call: its record is lost, never its
        stream. One line with the error's type and place only (its message
        may quote the text it failed on), and the drop counted."""
        log.error("exchange record failed; the exchange is dropped",
                  error=type(exc).__name__, at=_place(exc))
        self._record_failed()


class Call:
    """One upstream call in the making: its request, then what came back.

    Every open stream holds one, so it stays small: without the log (tokens
    only) it is its slots; the answer's parts and the subscribers' ids are
    allocated only when recording.
    """

    __slots__ = (
        "_recorder",
        "_open",
        "_body",
        "model",
        "resolved_model",
        "upstream",
        "started_at",
        "created",
        "ttft_s",
        "usage",
        "finish_reason",
        "messages",
        "answer",
        "request_ids",
        "api_key_ids",
        "failed",
    )

    def __init__(
        self, recorder: Recorder, body: Mapping[str, Any], model: str, upstream: str
    ) -> None:
        self._recorder = recorder
        self._open: OpenSource | None = None
        self._body: Mapping[str, Any] | None = body
        self.model = model
        self.resolved_model: str | None = None
        self.upstream = upstream
        self.started_at: float | None = None
        self.created = 0.0
        self.ttft_s: float | None = None
        self.usage: DeltaUsage | None = None
        self.finish_reason: str | None = None
        self.messages: tuple[Mapping[str, Any], ...] = ()
        self.answer: Answer | None = None
        recording = recorder.recording
        self.request_ids: list[str] = [] if recording else _NONE
        self.api_key_ids: list[str] = [] if recording else _NONE
        #: The recorder failed on this call: it leaves no record.
        self.failed = False

    def bind(self, open_source: OpenSource) -> None:
        """The opener ``open()`` calls: one whose source reports its deltas
        when called (``__call__``)."""
        self._open = open_source

    async def open(self) -> Source:
        """The actor's ``open_source``: the upstream call starts here."""
        recorder = self._recorder
        assert self._open is not None and self._body is not None, "open() once"
        if recorder.recording:
            self.started_at = recorder._clock()
            self.created = time.time()
            self.messages = request_messages(self._body, keep_content=recorder.keep_content)
            self.answer = Answer(recorder.keep_content)
        # Neither the prompt nor the opener (which holds it) is needed any more.
        self._body = None
        open_source, self._open = self._open, None
        return await open_source()

    def attempt(self, upstream: str) -> None:
        """An attempt at ``upstream`` starts (routing may try several before
        the first token): what an earlier one decoded is not the answer."""
        self.upstream = upstream
        self.usage = None
        self.finish_reason = None
        self.resolved_model = None
        if self.answer is not None:
            self.answer = Answer(self._recorder.keep_content)

    def __call__(self, deltas: Sequence[Delta]) -> None:
        """The source's ``on_deltas``: the deltas of one upstream read, once,
        as they are decoded. (The call itself, not a bound method: one
        object less held by every open stream.) Called from the source's
        read: whatever fails here fails the record, never the stream."""
        try:
            self._see(deltas)
        except Exception as exc:
            if not self.failed:
                self.failed = True
                self.answer = None  # tokens are still counted; the answer is not kept
                self._recorder.failed(exc)

    def _see(self, deltas: Sequence[Delta]) -> None:
        answer = self.answer
        for delta in deltas:
            if delta.usage is not None:
                self._count(delta.usage)
            if answer is None:
                continue
            if delta.finish_reason:
                self.finish_reason = delta.finish_reason
            if delta.info is not None and delta.info.model and self.resolved_model is None:
                self.resolved_model = delta.info.model
            if self.ttft_s is None and delta.is_content and self.started_at is not None:
                self.ttft_s = self._recorder._clock() - self.started_at
            answer.add(delta)

    def _count(self, usage: DeltaUsage) -> None:
        """Tokens as they are reported. Reports are running totals (an
        Anthropic stream may send several ``message_delta`` usages), so each
        counts what it adds to the last."""
        last = self.usage
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        if last is not None:
            prompt -= last.prompt_tokens
            completion -= last.completion_tokens
        self.usage = usage
        if prompt > 0 or completion > 0:
            self._recorder._tokens(self.model, self.upstream, max(prompt, 0), max(completion, 0))

    def finish(self, end: StreamEnd, now: float) -> Exchange:
        assert self.started_at is not None
        recorder = self._recorder
        outcome, finish_reason, error = _ending(end, self.finish_reason, recorder.keep_content)
        answer = self.answer
        return Exchange(
            id=new_exchange_id(),
            created=self.created,
            model=self.model,
            upstream=self.upstream,
            process=recorder._process,
            messages=self.messages + ((answer.message(),) if answer is not None else ()),
            outcome=outcome,
            finish_reason=finish_reason,
            error=error,
            usage=None if self.usage is None else Usage(self.usage.prompt_tokens,
                                                        self.usage.completion_tokens),
            ttft_ms=None if self.ttft_s is None else round(self.ttft_s * 1000, 2),
            duration_ms=round((now - self.started_at) * 1000, 2),
            subscribers=len(self.request_ids),
            request_ids=tuple(self.request_ids),
            api_key_ids=tuple(self.api_key_ids),
            resolved_model=self.resolved_model,
        )


_HIGH_SURROGATE_FIRST, _HIGH_SURROGATE_LAST = "\ud800", "\udbff"

#: What a call that records nothing holds for its subscriber lists (never
#: appended to: ``Recorder.joined`` checks ``recording`` first).
_NONE: list[str] = []


class Answer:
    """The assistant's answer so far: its text (or only its length and a
    running SHA-256), reasoning, tool calls."""

    __slots__ = ("_keep", "_text", "_length", "_hash", "_high", "_reasoning",
                 "_reasoning_length", "_tool_calls")

    def __init__(self, keep_content: bool) -> None:
        self._keep = keep_content
        self._text: list[str] = []
        self._length = 0
        self._hash = None if keep_content else hashlib.sha256()
        #: A high surrogate that ended the last text: its pair may open the next.
        self._high = ""
        self._reasoning: list[str] = []
        self._reasoning_length = 0
        self._tool_calls: dict[int, dict[str, Any]] = {}

    def add(self, delta: Delta) -> None:
        if delta.text:
            if self._hash is None:
                self._text.append(delta.text)
            else:
                self._count_text(self._hash, delta.text)
        if delta.reasoning:
            self._reasoning_length += len(delta.reasoning)
            if self._keep:
                self._reasoning.append(delta.reasoning)
        for fragment in delta.tool_calls:
            # A custom tool's input is kept as its arguments, its kind as the type.
            call = self._tool_calls.setdefault(
                fragment.index,
                {"id": None, "type": fragment.kind, "function": {"name": "", "arguments": ""}},
            )
            if fragment.id is not None:
                call["id"] = fragment.id
            if self._keep:
                if fragment.name is not None:
                    call["function"]["name"] += fragment.name
                call["function"]["arguments"] += fragment.arguments

    def _count_text(self, digest: Any, text: str) -> None:
        """Length and hash of the answer as a client reads it: a surrogate
        pair split across deltas is its one character."""
        if not self._high:
            try:
                data = text.encode()  # the common case: no surrogate in it
            except UnicodeEncodeError:
                pass
            else:
                self._length += len(text)
                digest.update(data)
                return
        text = self._high + text
        self._high = ""
        if _HIGH_SURROGATE_FIRST <= text[-1] <= _HIGH_SURROGATE_LAST:
            text, self._high = text[:-1], text[-1]
        text = joined(text)
        self._length += len(text)
        digest.update(utf8(text))

    def message(self) -> dict[str, Any]:
        message: dict[str, Any]
        if self._hash is None:
            message = {"role": "assistant", "content": joined("".join(self._text))}
            if self._reasoning:
                message["reasoning"] = "".join(self._reasoning)
            if self._tool_calls:
                message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
            return message
        # A high surrogate still held is a lone one: it counts as it is.
        digest = self._hash.copy()
        digest.update(utf8(self._high))
        message = {"role": "assistant", "content": None, "length": self._length + len(self._high),
                   "sha256": digest.hexdigest()}
        if self._reasoning_length:
            message["reasoning_length"] = self._reasoning_length
        if self._tool_calls:
            message["tool_call_count"] = len(self._tool_calls)
        return message


def _place(exc: BaseException) -> str:
    """``file.py:line`` where ``exc`` was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def _ending(
    end: StreamEnd, finish_reason: str | None, keep_content: bool
) -> tuple[str, str | None, dict[str, str] | None]:
    """(outcome, finish reason, error) of a stream's end."""
    match end:
        case Completed():
            return "complete", finish_reason or "stop", None
        case Abandoned():
            return "cancelled", "cancelled", None
        case Failed(error=exc) | Shutdown(reason=exc):
            if isinstance(exc, GatewayError):
                return "failed", None, {"code": exc.code, "message": _error_message(exc, keep_content)}
            return "failed", None, {"code": "internal_error", "message": type(exc).__name__}
    raise AssertionError(f"unknown stream end {end!r}")


def _error_message(exc: GatewayError, keep_content: bool) -> str:
    """A failure's message as the database may hold it. An upstream's error
    body can quote our key (a provider echoing it) or the prompt (a
    validation error's ``input_value=...``): never a configured secret, and
    with content off none of the upstream's text, only what a client is told
    of the cause (for an error status, the status). Any other failure is
    told as a client is told it: the transport's own text names the
    upstream's address (``cannot connect to 10.0.0.5:443``)."""
    if isinstance(exc, UpstreamStatusError):
        if keep_content:
            return redact(exc.message)
        return f"the upstream answered {exc.upstream_status}"
    return for_client(exc).message
