"""The Anthropic provider's stream decoding and error reading, fed whole, split
at every byte boundary and at random. Fixtures follow the event streams of the
Anthropic API reference ("Streaming Messages": text, extended thinking, tool
use, error events)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.deltas import Delta, StreamInfo, ToolCallDelta, Usage
from gateway.errors import UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.providers import AnthropicProvider
from tests.unit.splits import decode_all, every_split, head, split_at

# -- fixtures -------------------------------------------------------------------

MESSAGE_START = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL",'
    b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5",'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
)
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'

TEXT_STREAM = (
    MESSAGE_START + b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":", w\xc3\xb6rld \xf0\x9f\x8c\x8d"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n' + MESSAGE_STOP
)
TEXT_DELTAS = [
    Delta(text="Hello"),
    Delta(text=", wörld 🌍"),
    Delta(finish_reason="stop", usage=Usage(prompt_tokens=25, completion_tokens=15, cached_tokens=0,
                                            cache_write_tokens=0)),
]

THINKING_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01","type":"message",'
    b'"role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,'
    b'"usage":{"input_tokens":40,"cache_creation_input_tokens":5,'
    b'"cache_read_input_tokens":10,"output_tokens":1}}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"thinking","thinking":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
    b'"thinking":"Let me solve this step by step:\\n\\n1. First break down 27 * 453"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
    b'"thinking":"\\n2. 453 = 400 + 50 + 3"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta",'
    b'"signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"text_delta","text":"27 \xc3\x97 453 = 12,231"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},'
    b'"usage":{"output_tokens":120}}\n\n' + MESSAGE_STOP
)
THINKING_DELTAS = [
    Delta(reasoning="Let me solve this step by step:\n\n1. First break down 27 * 453"),
    Delta(reasoning="\n2. 453 = 400 + 50 + 3"),
    Delta(text="27 × 453 = 12,231"),
    Delta(finish_reason="length", usage=Usage(prompt_tokens=55, completion_tokens=120, cached_tokens=10,
                                              cache_write_tokens=5)),
]

TOOL_STREAM = (
    MESSAGE_START + b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Okay, let\'s check the weather for San Francisco, CA:"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
    b'"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"location\\":"}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
    b'"partial_json":" \\"San Francisco, CA\\", \\"unit\\": \\"fahrenheit\\"}"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
    b'"id":"toolu_02","name":"get_time","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":2,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"tz\\": \\"PST\\"}"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":2}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":89}}\n\n' + MESSAGE_STOP
)
TOOL_DELTAS = [
    Delta(text="Okay, let's check the weather for San Francisco, CA:"),
    Delta(tool_calls=(ToolCallDelta(0, id="toolu_01T1x1fJ34qAmk2tNTrN7Up6", name="get_weather"),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments='{"location":'),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments=' "San Francisco, CA", "unit": "fahrenheit"}'),)),
    Delta(tool_calls=(ToolCallDelta(1, id="toolu_02", name="get_time"),)),
    Delta(tool_calls=(ToolCallDelta(1, arguments='{"tz": "PST"}'),)),
    Delta(finish_reason="tool_calls", usage=Usage(prompt_tokens=25, completion_tokens=89, cached_tokens=0,
                                                  cache_write_tokens=0)),
]

#: A tool without parameters: its input is {}, streamed as one empty fragment.
NO_INPUT_TOOL_STREAM = (
    MESSAGE_START + b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use",'
    b'"id":"toolu_03","name":"get_time","input":{}}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
    b'"usage":{"output_tokens":12}}\n\n' + MESSAGE_STOP
)
NO_INPUT_TOOL_DELTAS = [
    Delta(tool_calls=(ToolCallDelta(0, id="toolu_03", name="get_time"),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments="{}"),)),
    Delta(finish_reason="tool_calls", usage=Usage(prompt_tokens=25, completion_tokens=12, cached_tokens=0,
                                                  cache_write_tokens=0)),
]

STREAMS = {
    "text": (TEXT_STREAM, TEXT_DELTAS),
    "thinking": (THINKING_STREAM, THINKING_DELTAS),
    "tool-use": (TOOL_STREAM, TOOL_DELTAS),
    "tool-use-without-input": (NO_INPUT_TOOL_STREAM, NO_INPUT_TOOL_DELTAS),
    "crlf": (TEXT_STREAM.replace(b"\n", b"\r\n"), TEXT_DELTAS),
}

# -- helpers --------------------------------------------------------------------


def decode(chunks: list[bytes]) -> list[Delta]:
    """The answer's deltas, without the model that message_start names
    (carried by the first delta; tested apart)."""
    return [replace(d, info=None) for d in decode_all(AnthropicProvider(), chunks)]








# -- decoding -------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "expected"), STREAMS.values(), ids=STREAMS.keys())
def test_stream_decodes_identically_at_every_split(stream: bytes, expected: list[Delta]) -> None:
    for chunks in every_split(stream):
        assert decode(chunks) == expected


@settings(max_examples=200, deadline=None)
@given(stream_and_expected=st.sampled_from(list(STREAMS.values())), data=st.data())
def test_stream_decodes_identically_in_random_pieces(
    stream_and_expected: tuple[bytes, list[Delta]], data: st.DataObject
) -> None:
    stream, expected = stream_and_expected
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert decode(split_at(stream, cuts)) == expected


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
     ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"),
     ("pause_turn", "stop"), ("refusal", "content_filter"), ("some_future_reason", "stop")],
)  # fmt: skip
def test_stop_reasons_map_to_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    event = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"'
        + stop_reason.encode()
        + b'"},"usage":{"output_tokens":3}}\n\n'
    )
    assert decode([MESSAGE_START + event + MESSAGE_STOP]) == [
        Delta(
            finish_reason=finish_reason,
            usage=Usage(prompt_tokens=25, completion_tokens=3, cached_tokens=0, cache_write_tokens=0),
        )
    ]


def test_the_stop_sequence_that_ended_the_answer_is_kept() -> None:
    event = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"stop_sequence","stop_sequence":"END"},"usage":{"output_tokens":3}}\n\n'
    )
    (delta,) = decode([MESSAGE_START + event + MESSAGE_STOP])
    assert (delta.finish_reason, delta.stop_sequence) == ("stop", "END")


def test_events_without_an_event_line_are_read_by_their_type() -> None:
    stream = (
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'data: {"type":"message_stop"}\n\n'
    )
    assert decode([stream]) == [Delta(text="hi")]


def test_unknown_events_and_block_types_are_ignored() -> None:
    stream = (
        MESSAGE_START + b"event: some_future_event\ndata: not even json\n\n"
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"redacted_thinking","data":"EmwKAhgBEgy3va3pzix"}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"citations_delta","citation":{"type":"char_location"}}}\n\n'
        + MESSAGE_STOP
    )
    assert decode([stream]) == []


def test_message_stop_ends_the_stream_and_later_bytes_are_ignored() -> None:
    decoder = AnthropicProvider().decoder()
    assert decoder.feed(MESSAGE_START) == []
    assert not decoder.done
    assert decoder.feed(MESSAGE_STOP + b"event: error\ndata: {}\n\n") == []
    assert decoder.done
    assert decoder.close() == []


@pytest.mark.parametrize("cut", [0, len(MESSAGE_START), len(TEXT_STREAM) - 1, 300])
def test_truncated_stream_raises_at_close(cut: int) -> None:
    decoder = AnthropicProvider().decoder()
    decoder.feed(TEXT_STREAM[:cut])
    with pytest.raises(UpstreamProtocolError, match="before message_stop"):
        decoder.close()


@pytest.mark.parametrize(
    ("error_type", "upstream_status", "status"),
    [("overloaded_error", 529, 502), ("api_error", 500, 502), ("rate_limit_error", 429, 429),
     ("invalid_request_error", 400, 400), ("brand_new_error", 500, 502)],
)  # fmt: skip
def test_error_event_raises_with_the_status_of_its_type(
    error_type: str, upstream_status: int, status: int
) -> None:
    error_event = (
        b'event: error\ndata: {"type": "error", "error": {"type": "'
        + error_type.encode()
        + b'", "message": "Overloaded"}}\n\n'
    )
    decoder = AnthropicProvider().decoder()
    before_block_stop = TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_stop")]
    assert decoder.feed(before_block_stop) == [
        replace(TEXT_DELTAS[0], info=StreamInfo(model="claude-sonnet-4-5")), TEXT_DELTAS[1]
    ]
    with pytest.raises(UpstreamStatusError) as caught:
        decoder.feed(error_event)
    error = caught.value
    assert (error.upstream_status, error.status) == (upstream_status, status)
    assert (error.message, error.code) == ("Overloaded", error_type)
    assert error.retryable == (upstream_status == 429 or upstream_status >= 500)


def test_deltas_read_with_an_error_event_come_before_it() -> None:
    """One read may hold an answer's last deltas and the error that ends it:
    ``feed`` returns the deltas, the error is ``failure`` and ``feed`` and
    ``close`` raise it."""
    error_event = (
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
        b'"message": "Overloaded"}}\n\n'
    )
    decoder = AnthropicProvider().decoder()
    before_block_stop = TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_stop")]
    assert decoder.feed(before_block_stop + error_event) == [
        replace(TEXT_DELTAS[0], info=StreamInfo(model="claude-sonnet-4-5")), TEXT_DELTAS[1]
    ]
    assert isinstance(decoder.failure, UpstreamStatusError)
    assert (decoder.failure.upstream_status, decoder.failure.code) == (529, "overloaded_error")
    with pytest.raises(UpstreamStatusError):
        decoder.feed(MESSAGE_STOP)
    with pytest.raises(UpstreamStatusError):
        decoder.close()
    assert not decoder.done


@pytest.mark.parametrize(
    "event",
    [
        b"event: content_block_delta\ndata: {not json\n\n",
        b"event: message_start\ndata: []\n\n",
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":7}}\n\n',
        # tool input for a block that never started as a tool_use block
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":3,'
        b'"delta":{"type":"input_json_delta","partial_json":"{}"}}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start",'
        b'"content_block":{"type":"tool_use","id":"t","name":"f"}}\n\n',
    ],
)
def test_malformed_events_are_protocol_errors(event: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        AnthropicProvider().decoder().feed(event)


def test_usage_in_message_delta_may_update_the_input_count() -> None:
    event = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"input_tokens":30,"cache_read_input_tokens":2,"output_tokens":4}}\n\n'
    )
    assert decode([MESSAGE_START + event + MESSAGE_STOP]) == [
        Delta(finish_reason="stop", usage=Usage(prompt_tokens=32, completion_tokens=4, cached_tokens=2,
                                                cache_write_tokens=0))
    ]


# -- error responses --------------------------------------------------------------


def test_rate_limit_response_keeps_message_type_and_retry_after() -> None:
    body = (
        b'{"type":"error","error":{"type":"rate_limit_error","message":"Number of request '
        b'tokens has exceeded your per-minute rate limit"},"request_id":"req_011CSHoEeqs5C35K"}'
    )
    error = AnthropicProvider().error_from_response(head(429, ("retry-after", "30")), body)
    assert error.message == "Number of request tokens has exceeded your per-minute rate limit"
    assert (error.status, error.code, error.retry_after) == (429, "rate_limit_error", "30")


def test_overloaded_response_is_a_retryable_502() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    error = AnthropicProvider().error_from_response(head(529), body)
    assert (error.status, error.upstream_status, error.retryable) == (502, 529, True)
    assert (error.message, error.code, error.retry_after) == (
        "Overloaded",
        "overloaded_error",
        None,
    )


def test_unparsable_error_response_falls_back_to_text_or_phrase() -> None:
    provider = AnthropicProvider()
    error = provider.error_from_response(head(401), b"invalid x-api-key")
    # The upstream refusing our key is an upstream error, not the client's 401.
    assert (error.status, error.message, error.code) == (502, "invalid x-api-key",
                                                         "upstream_auth_error")
    assert provider.error_from_response(head(404), b"").message == "Not Found"
    assert provider.error_from_response(head(404), b'{"error":3}').message == '{"error":3}'
