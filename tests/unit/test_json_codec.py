"""orjson and the standard library must give the same bytes for what the
gateway writes, and the same verdicts on what it reads: a frame must not
depend on which one is installed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import json_codec

ORJSON = json_codec.orjson_codec()
needs_orjson = pytest.mark.skipif(ORJSON is None, reason="orjson not installed (the fast extra)")
#: Every codec this install can serve with: (dumps, loads).
CODECS = [(json_codec.stdlib_dumps, json_codec.stdlib_loads), *([ORJSON] if ORJSON else [])]

# 64-bit integers: orjson reads bigger ones as floats (the documented
# difference, pinned by its own test below).
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.floats(
    allow_nan=False, allow_infinity=False, min_value=-1e15, max_value=1e15
).map(lambda x: round(x, 3))
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def test_the_standard_library_path_is_compact_utf8():
    assert json_codec.stdlib_dumps({"a": ["é", 1, None], "b": "x\ny\u2028"}) == (
        '{"a":["é",1,null],"b":"x\\ny\u2028"}'.encode()
    )


@needs_orjson
@given(documents)
def test_same_bytes_out(value):
    assert ORJSON is not None
    dumps = ORJSON[0]
    assert dumps(value) == json_codec.stdlib_dumps(value)


@needs_orjson
@given(documents)
def test_same_value_in(value):
    assert ORJSON is not None
    text = json.dumps(value, ensure_ascii=bool(len(str(value)) % 2))  # both escape styles
    assert ORJSON[1](text) == json_codec.stdlib_loads(text)


@needs_orjson
@pytest.mark.parametrize(
    "text",
    ['"\\ud83d"', '{"a":NaN}', '"\\ud83d\\ude00"'],
)
def test_what_orjson_refuses_the_standard_library_decides(text):
    assert ORJSON is not None
    assert ORJSON[1](text) == json.loads(text)


@needs_orjson
def test_a_big_integer_is_encoded_as_the_standard_library_does():
    assert ORJSON is not None
    assert ORJSON[0]({"n": 2**70}) == b'{"n":1180591620717411303424}'


@needs_orjson
def test_a_big_integer_read_by_orjson_is_a_float():
    # The one difference left (gateway/json_codec.py): upstream chunks carry
    # token counts and indexes, far below 2**63.
    assert ORJSON is not None
    assert ORJSON[1]("-9223372036854775809") == float(-9223372036854775809)


@pytest.mark.parametrize("text", ["{", '{"a":1}x', "", "\xff"])
def test_invalid_json_is_a_value_error_either_way(text):
    with pytest.raises(ValueError):
        json_codec.loads(text)
    with pytest.raises(ValueError):
        json_codec.stdlib_loads(text)


def test_bytes_to_keep_hold_only_their_length():
    import tracemalloc

    value = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [json_codec.dumps_to_keep(value) for _ in range(100)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert kept[0] == json_codec.stdlib_dumps(value)
    assert held < 4 * len(kept[0]) + 200  # not orjson's 4 KiB buffer each


def test_the_standard_library_can_be_chosen(monkeypatch):
    # GATEWAY_ORJSON=0: python -m gateway calls this before serving.
    for name in ("_fast", "BACKEND", "dumps", "loads"):
        monkeypatch.setattr(json_codec, name, getattr(json_codec, name))  # restored after
    json_codec.use_standard_library()
    assert json_codec.BACKEND == "json"
    assert json_codec.dumps({"a": "é"}) == '{"a":"é"}'.encode()
    assert json_codec.loads(b'{"n":123456789012345678901234567890}') == {"n": 123456789012345678901234567890}


@pytest.mark.parametrize("codec", CODECS)
def test_a_lone_surrogate_is_encoded_as_its_escape(codec) -> None:
    """An upstream may send "\\ud800": no UTF-8 spells it, so the frame
    carries the JSON escape, which reads back to the same string."""
    dumps, loads = codec
    encoded = dumps({"content": "a\ud800b"})
    encoded.decode("utf-8")  # valid UTF-8
    assert loads(encoded) == {"content": "a\ud800b"}


@pytest.mark.parametrize("codec", CODECS)
def test_json_nested_past_the_recursion_limit_is_invalid_json(codec) -> None:
    _, loads = codec
    with pytest.raises(ValueError):
        loads(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("dumps", [dumps for dumps, _ in CODECS])
def test_a_value_nested_deeper_than_the_stack_is_a_value_error(dumps) -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(json_codec.NestedTooDeeply):
        dumps(deep)
