"""The OpenAI-compatible provider: the request it builds, the Deltas it decodes
(fed whole, split at every byte boundary and at random), the errors it raises.

Fixtures follow the documented chat.completion.chunk stream (OpenAI API
reference) and the variants of compatible servers (DeepSeek/vLLM reasoning
fields, vLLM's numeric error code, OpenRouter's comment keepalives)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.deltas import (
    CUSTOM,
    FUNCTION_CALL,
    Delta,
    Logprobs,
    StreamInfo,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from gateway.errors import UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.providers import OpenAIProvider, get_provider
from tests.unit.splits import decode_all, every_split, head, split_at

# -- fixtures -------------------------------------------------------------------

_HEAD = (
    b'data: {"id":"chatcmpl-AB12","object":"chat.completion.chunk","created":1727000000,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_1bb46167f9",'
)

TEXT_STREAM = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":"Gr\xc3\xbc\xc3\x9fe"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":", \xe4\xb8\x96\xe7\x95\x8c '
    b'\\ud83d\\udc4b\\n"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":null}\n\n'
    + _HEAD + b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,'
    b'"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)  # fmt: skip
TEXT_DELTAS = [
    # The model that served the answer rides on the first delta: no delta of its own.
    Delta(
        text="Grüße",
        info=StreamInfo(model="gpt-4o-mini-2024-07-18", system_fingerprint="fp_1bb46167f9"),
    ),
    Delta(text=", 世界 👋\n"),
    Delta(finish_reason="stop"),
    Delta(usage=Usage(prompt_tokens=9, completion_tokens=12, cached_tokens=0)),
]

TOOL_STREAM = (
    b'data: {"id":"chatcmpl-T","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_A",'
    b'"type":"function","function":{"name":"get_weather","arguments":""}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-T","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": "}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-T","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Z\xc3\xbcrich\\"}"}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-T","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{"tool_calls":[{"index":1,"id":"call_B","type":"function",'
    b'"function":{"name":"get_time","arguments":"{\\"tz\\":\\"CET\\"}"}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-T","object":"chat.completion.chunk","choices":[{"index":0,'
    b'"delta":{},"finish_reason":"tool_calls"}]}\n\n'
    b"data: [DONE]\n\n"
)
TOOL_DELTAS = [
    Delta(tool_calls=(ToolCallDelta(index=0, id="call_A", name="get_weather"),)),
    Delta(tool_calls=(ToolCallDelta(index=0, arguments='{"city": '),)),
    Delta(tool_calls=(ToolCallDelta(index=0, arguments='"Zürich"}'),)),
    Delta(
        tool_calls=(ToolCallDelta(index=1, id="call_B", name="get_time", arguments='{"tz":"CET"}'),)
    ),
    Delta(finish_reason="tool_calls"),
]

# DeepSeek says reasoning_content, vLLM >= 0.10 and OpenRouter say reasoning;
# CRLF line endings and comment keepalives as some proxies send them.
REASONING_STREAM = (
    b": OPENROUTER PROCESSING\r\n\r\n"
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,'
    b'"reasoning_content":""},"finish_reason":null}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{"content":null,'
    b'"reasoning_content":"9.11 vs 9.9: compare tenths"},"finish_reason":null}]}\r\n\r\n'
    b'data: {"choices":[{"index":0,"delta":{"reasoning":" \xe2\x80\x94 1 < 9."},'
    b'"finish_reason":null}]}\r\n\r\n'
    b": OPENROUTER PROCESSING\r\n\r\n"
    b'data: {"choices":[{"index":0,"delta":{"content":"9.9 is larger."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":15,"completion_tokens":40}}\r\n\r\n'
    b"data: [DONE]\r\n\r\n"
)
REASONING_DELTAS = [
    Delta(reasoning="9.11 vs 9.9: compare tenths"),
    Delta(reasoning=" — 1 < 9."),
    Delta(
        text="9.9 is larger.",
        finish_reason="stop",
        usage=Usage(prompt_tokens=15, completion_tokens=40),
    ),
]

# A custom tool's call (free-text input), then the legacy function_call.
CUSTOM_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":0,'
    b'"id":"call_sql","type":"custom","custom":{"name":"run_sql","input":""}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"custom":{"input":"SELECT 1;"}}]},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
    b"data: [DONE]\n\n"
)
CUSTOM_DELTAS = [
    Delta(tool_calls=(ToolCallDelta(0, "call_sql", "run_sql", "", kind=CUSTOM),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments="SELECT 1;", kind=CUSTOM),)),
    Delta(finish_reason="tool_calls"),
]
FUNCTION_CALL_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,'
    b'"function_call":{"name":"f","arguments":""}},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"function_call":{"arguments":"{\\"a\\": 1}"}},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"function_call"}]}\n\n'
    b"data: [DONE]\n\n"
)
FUNCTION_CALL_DELTAS = [
    Delta(tool_calls=(ToolCallDelta(0, name="f", kind=FUNCTION_CALL),)),
    Delta(tool_calls=(ToolCallDelta(0, arguments='{"a": 1}', kind=FUNCTION_CALL),)),
    Delta(finish_reason="function_call"),
]

# -- helpers --------------------------------------------------------------------


def decode(chunks: list[bytes]) -> list[Delta]:
    return decode_all(OpenAIProvider(), chunks)








# -- decoding -------------------------------------------------------------------

STREAMS = {
    "text": (TEXT_STREAM, TEXT_DELTAS),
    "tool-calls": (TOOL_STREAM, TOOL_DELTAS),
    "reasoning": (REASONING_STREAM, REASONING_DELTAS),
    "custom-tool": (CUSTOM_STREAM, CUSTOM_DELTAS),
    "function-call": (FUNCTION_CALL_STREAM, FUNCTION_CALL_DELTAS),
}


@pytest.mark.parametrize(("stream", "expected"), STREAMS.values(), ids=STREAMS.keys())
def test_stream_decodes_identically_at_every_split(stream: bytes, expected: list[Delta]) -> None:
    for chunks in every_split(stream):
        assert decode(chunks) == expected


@settings(max_examples=200, deadline=None)
@given(
    stream_and_expected=st.sampled_from(list(STREAMS.values())),
    data=st.data(),
)
def test_stream_decodes_identically_in_random_pieces(
    stream_and_expected: tuple[bytes, list[Delta]], data: st.DataObject
) -> None:
    stream, expected = stream_and_expected
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert decode(split_at(stream, cuts)) == expected


def test_done_is_set_by_done_and_later_bytes_are_ignored() -> None:
    decoder = OpenAIProvider().decoder()
    assert decoder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n') == [
        Delta(text="a")
    ]
    assert not decoder.done
    assert decoder.feed(b"data: [DONE]\n\n") == []
    assert decoder.done
    assert decoder.feed(b"data: not json\n\n") == []
    assert decoder.close() == []


def test_other_choices_than_the_first_are_ignored() -> None:
    stream = (
        b'data: {"choices":[{"index":1,"delta":{"content":"B"}},'
        b'{"index":0,"delta":{"content":"A"}}]}\n\n'
        b'data: {"choices":[{"index":1,"delta":{"content":"B2"}}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert decode([stream]) == [Delta(text="A")]


def test_empty_data_event_is_a_keepalive() -> None:
    assert decode([b"data:\n\ndata: [DONE]\n\n"]) == []


@pytest.mark.parametrize(
    "stream",
    [
        TEXT_STREAM[: TEXT_STREAM.index(b"data: [DONE]")],  # no terminator at all
        TEXT_STREAM[:-1],  # "data: [DONE]\n": the event never ended
        TEXT_STREAM[:200],  # cut inside a chunk
        b"",
    ],
)
def test_truncated_stream_raises_at_close(stream: bytes) -> None:
    decoder = OpenAIProvider().decoder()
    decoder.feed(stream)
    with pytest.raises(UpstreamProtocolError, match=r"before data: \[DONE\]"):
        decoder.close()


@pytest.mark.parametrize(
    "payload",
    [
        b'{"choices": [',  # invalid JSON
        b"42",  # not an object
        b'{"choices":[{"index":0,"delta":{"content":5}}]}',  # content not a string
        b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":"0"}]}}]}',
        b'{"choices":["x"]}',
        b'{"usage":{"prompt_tokens":true}}',
    ],
)
def test_malformed_chunk_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        OpenAIProvider().decoder().feed(b"data: " + payload + b"\n\n")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', []),
        (b'{"choices":[{"index":0,"delta":{"content":null},"finish_reason":null}]}', []),
        (b'{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}]}',
         [Delta(text="a")]),
        (b'{"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}',
         [Delta(text="a", finish_reason="stop")]),
        (b'{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":1}}',
         [Delta(text="a", usage=Usage(prompt_tokens=1))]),
        (b'{"choices":[{"index":0,"delta":{"content":"a","refusal":"no"}}]}',
         [Delta(text="a", refusal="no")]),
        (b'{"choices":[{"index":0,"delta":{"content":"a","reasoning_content":"r"}}]}',
         [Delta(text="a", reasoning="r")]),
        (b'{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[]}}]}',
         [Delta(text="a")]),
    ],
)
def test_a_chunk_is_read_whole_unless_it_holds_text_alone(payload: bytes, expected: list[Delta]) -> None:
    # Text-only chunks take a shorter path: whatever else a chunk holds is still read.
    assert OpenAIProvider().decoder().feed(b"data: " + payload + b"\n\n") == expected


ERROR_EVENT = (
    b'data: {"error":{"message":"The server had an error while processing your request.",'
    b'"type":"server_error","param":null,"code":null}}\n\n'
)


def test_error_event_mid_stream_raises_after_the_earlier_deltas() -> None:
    stream = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n' + ERROR_EVENT
    cut = stream.index(b'data: {"error"')
    for split in range(cut, len(stream)):
        decoder = OpenAIProvider().decoder()
        assert decoder.feed(stream[:split]) == [Delta(text="Hi")]
        with pytest.raises(UpstreamStatusError) as caught:
            decoder.feed(stream[split:])
        error = caught.value
        assert error.message == "The server had an error while processing your request."
        assert (error.upstream_status, error.status, error.code) == (500, 502, "upstream_500")
        assert error.retryable


def test_error_event_with_a_numeric_status_keeps_it() -> None:
    # vLLM puts the HTTP status in "code".
    event = (
        b'data: {"error":{"object":"error","message":"maximum context length is 8192 tokens",'
        b'"type":"BadRequestError","param":null,"code":400}}\n\n'
    )
    with pytest.raises(UpstreamStatusError) as caught:
        OpenAIProvider().decoder().feed(event)
    assert caught.value.status == 400
    assert caught.value.message == "maximum context length is 8192 tokens"
    assert not caught.value.retryable


# -- the request ----------------------------------------------------------------


def test_request_forces_a_stream_with_usage_and_compact_json() -> None:
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Héllo 世界"}],
        "temperature": 0.2,
        "stream": False,
    }
    original = json.loads(json.dumps(chat))
    request = OpenAIProvider().build_request(chat, base_path="/v1", api_key="sk-test-123")
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.headers == (
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("authorization", "Bearer sk-test-123"),
    )
    assert request.body == (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"H\xc3\xa9llo '
        b'\xe4\xb8\x96\xe7\x95\x8c"}],"temperature":0.2,"stream":true,'
        b'"stream_options":{"include_usage":true}}'
    )
    assert b"sk-test-123" not in request.body
    assert chat == original  # the client's request is not modified


def test_request_merges_the_clients_stream_options() -> None:
    chat = {
        "model": "m",
        "messages": [],
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
    }
    request = OpenAIProvider().build_request(chat, base_path="/v1", api_key=None)
    body = json.loads(request.body)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert chat["stream_options"] == {"include_usage": False, "continuous_usage_stats": True}


@pytest.mark.parametrize(
    ("base_path", "path"),
    [("/v1", "/v1/chat/completions"), ("/v1/", "/v1/chat/completions"),
     ("", "/chat/completions"), ("/api/openai/v1", "/api/openai/v1/chat/completions")],
)  # fmt: skip
def test_request_path_and_no_authorization_without_a_key(base_path: str, path: str) -> None:
    request = OpenAIProvider().build_request(
        {"model": "m", "messages": []}, base_path=base_path, api_key=None
    )
    assert request.path == path
    assert [name for name, _ in request.headers] == ["content-type", "accept"]


# -- error responses --------------------------------------------------------------


def test_rate_limit_response_keeps_message_code_and_retry_after() -> None:
    body = (
        b'{"error":{"message":"Rate limit reached for gpt-4o-mini on tokens per min (TPM)",'
        b'"type":"tokens","param":null,"code":"rate_limit_exceeded"}}'
    )
    error = OpenAIProvider().error_from_response(
        head(429, ("retry-after", "20"), ("content-type", "application/json")), body
    )
    assert error.message == "Rate limit reached for gpt-4o-mini on tokens per min (TPM)"
    assert (error.status, error.code, error.retry_after) == (429, "rate_limit_exceeded", "20")
    assert error.headers() == {"Retry-After": "20"}


def test_retry_after_is_found_whatever_its_case_and_dropped_for_5xx() -> None:
    provider = OpenAIProvider()
    error = provider.error_from_response(head(429, ("Retry-After", "3")), b"{}")
    assert error.retry_after == "3"
    assert error.message == "{}"
    error = provider.error_from_response(head(503, ("retry-after", "3")), b"")
    assert (error.status, error.retry_after, error.message) == (502, None, "Service Unavailable")


def test_non_json_error_body_is_cut_to_500_characters() -> None:
    body = b"<html><body>" + b"Bad gateway " * 100 + b"</body></html>"
    error = OpenAIProvider().error_from_response(head(502), body)
    assert error.message == body.decode()[:500]
    assert (error.status, error.upstream_status) == (502, 502)


@pytest.mark.parametrize(
    "body",
    [b'{"error":"model not found"}', b'{"object":"error","message":"model not found"}'],
)
def test_error_bodies_of_compatible_servers(body: bytes) -> None:
    error = OpenAIProvider().error_from_response(head(404), body)
    assert (error.status, error.message) == (404, "model not found")


def test_get_provider() -> None:
    assert isinstance(get_provider("openai"), OpenAIProvider)
    assert get_provider("anthropic").name == "anthropic"
    with pytest.raises(ValueError, match="expected one of openai, anthropic"):
        get_provider("gemini")


# -- what the answer says besides its text ----------------------------------------

# A refusal with logprobs asked for, then o-series usage details (OpenAI API
# reference: "The chat completion chunk object", "logprobs", "usage").
REFUSAL_STREAM = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-real-2025",'
    b'"system_fingerprint":"fp_x","choices":[{"index":0,"delta":{"role":"assistant",'
    b'"refusal":"No"},"logprobs":{"content":null,"refusal":[{"token":"No","logprob":-0.5,'
    b'"bytes":[78,111],"top_logprobs":[{"token":"No","logprob":-0.5,"bytes":[78,111]},'
    b'{"token":"Yes","logprob":-1,"bytes":null}]}]},"finish_reason":null}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-real-2025",'
    b'"system_fingerprint":"fp_x","choices":[{"index":0,"delta":{"content":"ok"},'
    b'"logprobs":{"content":[{"token":"ok","logprob":-0.25,"bytes":[111,107],'
    b'"top_logprobs":[]}]},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-real-2025",'
    b'"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":7,"total_tokens":27,'
    b'"prompt_tokens_details":{"cached_tokens":16},'
    b'"completion_tokens_details":{"reasoning_tokens":5}}}\n\n'
    b"data: [DONE]\n\n"
)


def test_refusal_logprobs_model_and_usage_details_are_decoded() -> None:
    no = TokenLogprob(
        token="No", logprob=-0.5, bytes=(78, 111),
        top_logprobs=(TopLogprob("No", -0.5, (78, 111)), TopLogprob("Yes", -1.0, None)),
    )
    assert decode([REFUSAL_STREAM]) == [
        Delta(
            refusal="No",
            logprobs=Logprobs(refusal=(no,)),
            info=StreamInfo(model="gpt-real-2025", system_fingerprint="fp_x"),
        ),
        Delta(
            text="ok",
            finish_reason="stop",
            logprobs=Logprobs(content=(TokenLogprob("ok", -0.25, (111, 107)),)),
        ),
        Delta(usage=Usage(prompt_tokens=20, completion_tokens=7, cached_tokens=16,
                          reasoning_tokens=5)),
    ]
    assert decode([REFUSAL_STREAM])[0].is_content


def test_a_logprob_that_is_not_a_number_is_a_protocol_error() -> None:
    stream = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a"},'
        b'"logprobs":{"content":[{"token":"a","logprob":"high"}]}}]}\n\n'
    )
    with pytest.raises(UpstreamProtocolError, match="logprob"):
        decode([stream])
