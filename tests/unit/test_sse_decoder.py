"""The SSE decoder against the WHATWG rules (HTML Standard §9.2.6), fed whole,
byte by byte, split at every boundary, and split at random (hypothesis), with
a plain character-by-character reading of the spec as the oracle."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import UpstreamProtocolError
from gateway.upstream.sse_decoder import SSEDecoder, SSEEvent
from tests.unit.splits import every_split, split_at

# -- helpers ------------------------------------------------------------------


def decode(chunks: list[bytes], *, max_event_bytes: int = 1 << 20) -> list[SSEEvent]:
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events




def assert_decodes(stream: bytes, expected: list[SSEEvent]) -> None:
    for chunks in every_split(stream):
        assert decode(chunks) == expected, chunks




def reference_decode(stream: bytes) -> list[SSEEvent]:
    """The spec, read literally: decode the whole stream, then a line at a time."""
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)[:-1]  # the unterminated tail is discarded
    events: list[SSEEvent] = []
    data, event_type, last_id, retry = "", "", None, None
    for line in lines:
        if line == "":
            if data:
                events.append(SSEEvent(event_type or "message", data[:-1], last_id, retry))
            data, event_type, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit() and len(value) <= 18:
            retry = int(value)
    return events


# -- the spec's own examples ----------------------------------------------------


def test_multiline_data_is_joined_with_newlines() -> None:
    assert_decodes(
        b"data: YHOO\ndata: +2\ndata: 10\n\n",
        [SSEEvent(data="YHOO\n+2\n10")],
    )


def test_comment_ids_and_one_leading_space() -> None:
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert_decodes(
        stream,
        [
            SSEEvent(data="first event", id="1"),
            SSEEvent(data="second event", id=""),  # `id` alone resets the last event ID
            SSEEvent(data=" third event", id=""),  # only one space is syntax
        ],
    )


def test_empty_data_fields_and_unterminated_tail() -> None:
    stream = b"data\n\ndata\ndata\n\ndata:"
    assert_decodes(stream, [SSEEvent(data=""), SSEEvent(data="\n")])


def test_space_after_colon_is_optional() -> None:
    assert_decodes(b"data:test\n\ndata: test\n\n", [SSEEvent(data="test")] * 2)


# -- line endings -------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    stream = newline.join([b"event: add", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert_decodes(stream, [SSEEvent(event="add", data="a\nb"), SSEEvent(data="c")])


def test_mixed_line_endings_and_cr_cr_is_two_lines() -> None:
    assert_decodes(
        b"data: a\r\rdata: b\r\n\ndata: c\n\r\n",
        [SSEEvent(data="a"), SSEEvent(data="b"), SSEEvent(data="c")],
    )


def test_cr_lf_split_across_chunks_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []  # an empty piece must not forget the pending CR
    assert decoder.feed(b"\n") == []  # second half of the CRLF, not an empty line
    assert decoder.feed(b"\r") == [SSEEvent(data="a")]
    assert decoder.feed(b"\n") == []  # CRLF again: the LF is no new empty line
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\r") == [SSEEvent(data="b")]  # CR CR: two line endings


# -- encoding -----------------------------------------------------------------


def test_multibyte_utf8_split_anywhere() -> None:
    text = "Grüße, 世界 👋 — ok"
    assert_decodes(f"data: {text}\n\n".encode(), [SSEEvent(data=text)])


def test_invalid_utf8_becomes_replacement_characters() -> None:
    # Each maximal invalid subpart is one U+FFFD (WHATWG Encoding, UTF-8 decoder).
    stream = b"data: a\xffb\xe2\x82\nevent: \xf0\x9f\n\n"
    assert_decodes(stream, [SSEEvent(event="\ufffd", data="a\ufffdb\ufffd")])


def test_leading_bom_is_stripped_once() -> None:
    assert_decodes(b"\xef\xbb\xbfdata: x\n\n", [SSEEvent(data="x")])
    # A second BOM is content: it makes the field name "\ufeffdata", ignored.
    assert_decodes(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", [])
    # Later in the stream it is an ordinary character.
    assert_decodes(b"data: \xef\xbb\xbfx\n\n", [SSEEvent(data="\ufeffx")])


def test_a_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    assert_decodes(b"\xef\xbbdata: x\n\ndata: y\n\n", [SSEEvent(data="y")])


# -- fields -------------------------------------------------------------------


def test_field_without_colon_has_empty_value() -> None:
    assert_decodes(b"event\ndata\n\n", [SSEEvent(event="message", data="")])


def test_event_type_without_data_is_not_dispatched_and_is_reset() -> None:
    assert_decodes(b"event: foo\n\ndata: x\n\n", [SSEEvent(data="x")])


def test_comments_and_unknown_fields_are_ignored() -> None:
    stream = b": ping\n:\n\nfoo: bar\nData: no\ndata: yes\n: between\n\n"
    assert_decodes(stream, [SSEEvent(data="yes")])


def test_id_persists_and_id_with_nul_is_ignored() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x003\ndata: c\n\nid: \xc3\xa9\ndata: d\n\n"
    assert_decodes(
        stream,
        [
            SSEEvent(data="a", id="1"),
            SSEEvent(data="b", id="1"),
            SSEEvent(data="c", id="1"),
            SSEEvent(data="d", id="é"),
        ],
    )


def test_last_event_id_is_set_even_when_nothing_is_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\n") == []
    assert decoder.last_event_id is None  # set at dispatch, not at the field
    assert decoder.feed(b"\n") == []
    assert decoder.last_event_id == "7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"3000", 3000), (b"0", 0), (b"30s", None), (b"-1", None), (b"", None),
     (b" 5", 5), (b"  5", None), (b"1e3", None), (b"\xd9\xa3", None),
     (b"9" * 19, None)],
)  # fmt: skip
def test_retry_takes_only_ascii_digits(value: bytes, expected: int | None) -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry:" + value + b"\ndata: x\n\ndata: y\n\n")
    assert events == [SSEEvent(data="x", retry=expected), SSEEvent(data="y")]
    assert decoder.reconnection_time == expected


def test_unterminated_event_is_discarded_at_close() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: complete\n\ndata: half\n") == [SSEEvent(data="complete")]
    assert decoder.close() == []


def test_common_openai_shape() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":"x: y"}\n\ndata: [DONE]\n\n'
    assert_decodes(
        stream,
        [SSEEvent(data='{"a":1}'), SSEEvent(data='{"b":"x: y"}'), SSEEvent(data="[DONE]")],
    )


# -- bounded memory -------------------------------------------------------------


def test_line_over_the_limit_raises_even_before_it_ends() -> None:
    decoder = SSEDecoder(max_event_bytes=16)
    decoder.feed(b": " + b"x" * 14)  # 16 bytes: at the limit, still fine
    with pytest.raises(UpstreamProtocolError, match="exceeds 16 bytes"):
        decoder.feed(b"x")


def test_complete_line_over_the_limit_raises() -> None:
    with pytest.raises(UpstreamProtocolError):
        SSEDecoder(max_event_bytes=16).feed(b": " + b"x" * 15 + b"\n\n")


def test_event_data_over_the_limit_raises() -> None:
    # Every data value costs its length + 1 (the "\n" the spec appends).
    decoder = SSEDecoder(max_event_bytes=16)
    assert decoder.feed(b"data: 1234567\ndata: 1234567\n") == []  # 16
    with pytest.raises(UpstreamProtocolError, match="event exceeds"):
        decoder.feed(b"data:\n")


def test_limit_is_per_event() -> None:
    stream = b"data: 1234567\ndata: 1234567\n\n" * 3
    expected = [SSEEvent(data="1234567\n1234567")] * 3
    for chunks in every_split(stream):
        assert decode(chunks, max_event_bytes=16) == expected


def test_long_line_in_tiny_pieces_is_collected_linearly() -> None:
    decoder = SSEDecoder()
    for _ in range(20_000):
        assert decoder.feed(b"ab") == []
    assert decoder.feed(b"\n\n") == []  # "abab..." is an unknown field
    assert decoder.feed(b"data: " + b"z" * 50_000 + b"\n\n") == [SSEEvent(data="z" * 50_000)]


# -- properties -----------------------------------------------------------------

_TOKENS = [
    b"data", b"data:", b"data: ", b"event: ", b"id:", b"retry:", b":", b" ", b"x", b"1",
    b"\n", b"\r", b"\r\n", b"\n\n", b"\x00", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80",
    b"\xff", b"\xe2\x82", b"\xef\xbb\xbf",
]  # fmt: skip
streams = st.lists(st.sampled_from(_TOKENS), max_size=60).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(stream=streams, data=st.data())
def test_matches_the_reference_whatever_the_split(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert decode(split_at(stream, cuts)) == reference_decode(stream)


@settings(max_examples=200, deadline=None)
@given(stream=streams, data=st.data())
def test_limit_does_not_depend_on_the_split(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))

    def outcome(chunks: list[bytes]) -> list[SSEEvent] | str:
        try:
            return decode(chunks, max_event_bytes=12)
        except UpstreamProtocolError:
            return "too large"

    assert outcome(split_at(stream, cuts)) == outcome([stream])


# Chunks that are each one whole `data` event (what upstreams send nearly
# always, decoded without the line loop) among chunks of anything else.
_PIECES = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=6).map(lambda parts: b"data: " + b"".join(parts) + b"\n\n"),
    st.lists(st.sampled_from(_TOKENS), max_size=6).map(b"".join),
)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(_PIECES, max_size=12))
def test_whole_data_events_among_other_chunks_match_the_reference(chunks: list[bytes]) -> None:
    assert decode(chunks) == reference_decode(b"".join(chunks))


def test_a_whole_data_event_after_pending_fields_keeps_them() -> None:
    chunks = [b"id: 7\n", b"event: note\n", b"data: {\"a\":1}\n\n", b"data: after\n\n"]
    assert decode(chunks) == [SSEEvent("note", '{"a":1}', "7"), SSEEvent("message", "after", "7")]
    assert decode([b"retry: 5\n", b"data: x\n\n"]) == [SSEEvent("message", "x", None, 5)]
    assert decode([b"data: part", b"data: x\n\n"]) == [SSEEvent("message", "partdata: x")]
    empty_then_invalid = [SSEEvent("message", ""), SSEEvent("message", "\ufffd")]
    assert decode([b"data: \n\n", b"data: \xff\n\n"]) == empty_then_invalid


def test_a_whole_data_event_over_the_limit_still_raises() -> None:
    with pytest.raises(UpstreamProtocolError):
        decode([b"data: " + b"x" * 20 + b"\n\n"], max_event_bytes=12)
