"""The internal stream's lines and the directory's values (gateway/cluster/wire.py)."""

from __future__ import annotations

import json

import pytest

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
from gateway.cluster.wire import (
    END_LINE,
    FailureEntry,
    LineDecoder,
    Owner,
    RemoteFailure,
    WireError,
    decode_entry,
    encode_deltas,
    encode_failure,
    error_line,
    owner_entry,
)
from gateway.errors import UpstreamStatusError

DELTAS = [
    Delta(text="héllo \n"),
    Delta(reasoning="thinking"),
    Delta(tool_calls=(ToolCallDelta(0, "call_1", "lookup", '{"q":'), ToolCallDelta(1))),
    Delta(tool_calls=(ToolCallDelta(0, "call_2", "run_sql", "SELECT", kind=CUSTOM),)),
    Delta(tool_calls=(ToolCallDelta(0, name="f", arguments="{}", kind=FUNCTION_CALL),)),
    Delta(),
    Delta(text="a", info=StreamInfo("gpt-real-2025", "fp_1")),
    Delta(refusal="no", logprobs=Logprobs(
        content=(TokenLogprob("a", -0.5, (97,), (TopLogprob("b", -1.5, None),)),),
        refusal=(TokenLogprob("no", -0.1),),
    )),
    Delta(usage=Usage(12, 34), finish_reason="stop"),
    Delta(usage=Usage(12, 34, cached_tokens=8, reasoning_tokens=20)),
    Delta(usage=Usage(30, 3, cached_tokens=10, cache_write_tokens=5), finish_reason="stop",
          stop_sequence="END"),
]


def test_a_usage_line_is_four_counts_for_members_of_an_earlier_release():
    """Cache writes travel under a key of their own: "u" stays the four
    counts an earlier release reads, and it leaves out keys it does not know."""
    line = encode_deltas([Delta(usage=Usage(30, 3, cached_tokens=10, cache_write_tokens=5))])
    assert json.loads(line)["u"] == [30, 3, 10, None]
    (delta,) = LineDecoder().feed(b'{"u":[12,34,8,20]}\n')
    assert delta.usage == Usage(12, 34, cached_tokens=8, reasoning_tokens=20)


def test_every_delta_kind_survives_the_hop_split_anywhere():
    """Replays must carry every delta kind; bytes may arrive cut anywhere."""
    wire = encode_deltas(DELTAS) + END_LINE
    for cut in range(len(wire)):
        decoder = LineDecoder()
        out = decoder.feed(wire[:cut]) + decoder.feed(wire[cut:])
        assert out == DELTAS and decoder.ended


def test_a_failure_line_is_what_the_owner_said():
    decoder = LineDecoder()
    error = UpstreamStatusError(429, "slow down")
    assert decoder.feed(error_line(error)) == []
    failure = decoder.failure
    assert failure is not None
    assert (failure.status, failure.code, failure.type, failure.retryable, failure.message) == (
        429, "upstream_429", "rate_limit_error", True, "slow down"
    )
    assert decoder.ended


def as_told_elsewhere(error: UpstreamStatusError) -> tuple[RemoteFailure, RemoteFailure]:
    """``error`` as another process has it: from the hop's failure line, and
    from the Redis entry."""
    decoder = LineDecoder()
    decoder.feed(error_line(error))
    entry = decode_entry(encode_failure(error))
    assert decoder.failure is not None and isinstance(entry, FailureEntry)
    return decoder.failure, entry.error


def test_a_429s_retry_after_reaches_the_other_processes_clients():
    for failure in as_told_elsewhere(UpstreamStatusError(429, "slow down", retry_after="7")):
        assert failure.status == 429 and failure.headers() == {"Retry-After": "7"}
    for failure in as_told_elsewhere(UpstreamStatusError(500, "boom")):
        assert failure.headers() == {}


def test_a_line_that_is_not_json_is_a_wire_error():
    with pytest.raises(WireError):
        LineDecoder().feed(b"not json\n")


def test_directory_values_round_trip():
    owner = Owner("abc123", "http://10.0.0.11:9100")
    assert decode_entry(owner_entry(owner)) == owner
    entry = decode_entry(encode_failure(UpstreamStatusError(500, "boom")))
    assert isinstance(entry, FailureEntry)
    assert (entry.error.status, entry.error.code) == (502, "upstream_500")
    for junk in (b"", b"x", b"o onlyinstance", b"e {not json"):
        with pytest.raises(WireError):
            decode_entry(junk)


def test_deltas_read_with_a_failure_line_are_returned_before_it():
    """One read may hold an answer's last deltas and its failure line."""
    decoder = LineDecoder()
    chunk = encode_deltas(DELTAS[:2]) + error_line(UpstreamStatusError(429, "slow down"))
    assert decoder.feed(chunk) == DELTAS[:2]
    assert decoder.ended and isinstance(decoder.failure, RemoteFailure)
    assert decoder.failure.code == "upstream_429"


def test_the_hop_and_the_directory_carry_the_message_the_owners_clients_get():
    """A provider's error page is not relayed to clients (gateway.errors.for_client):
    nor to other processes' clients, over the hop or from Redis."""
    error = UpstreamStatusError(502, "<html><h1>502 Bad Gateway</h1>nginx at 10.0.0.7:8000</html>")
    for failure in as_told_elsewhere(error):
        assert (failure.status, failure.code, failure.type, failure.retryable, failure.message) == (
            502, "upstream_502", "upstream_error", True, "the upstream answered 502"
        )
