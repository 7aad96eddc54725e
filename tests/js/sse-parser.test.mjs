// The incremental SSE parser (WHATWG HTML §9.2.6) against exact expected
// events, and against itself: every way of cutting the input into chunks must
// give the same events as feeding it whole.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { createByteParser, createParser } from "../../gateway/static/sse-client.js";

/** Feed `chunks` to a fresh parser; everything it reported, in order. */
function parse(chunks) {
  const seen = [];
  const parser = createParser((event) => seen.push(["event", event]), {
    onComment: (text) => seen.push(["comment", text]),
    onRetry: (ms) => seen.push(["retry", ms]),
  });
  for (const chunk of chunks) parser.feed(chunk);
  return seen;
}

function parseBytes(chunks) {
  const seen = [];
  const parser = createByteParser((event) => seen.push(["event", event]), {
    onComment: (text) => seen.push(["comment", text]),
  });
  for (const chunk of chunks) parser.feed(chunk);
  parser.end();
  return seen;
}

const event = (type, data, lastEventId = "") => ["event", { type, data, lastEventId }];

/** Every split of `text` into two chunks, three chunks, and single characters. */
function* splits(text) {
  for (let i = 0; i <= text.length; i += 1) {
    yield [text.slice(0, i), text.slice(i)];
    for (let j = i; j <= text.length; j += 1) {
      yield [text.slice(0, i), text.slice(i, j), text.slice(j)];
    }
  }
  yield Array.from({ length: text.length }, (_, i) => text[i]);
}

function assertEveryChunkingAgrees(text, expected) {
  assert.deepEqual(parse([text]), expected);
  for (const chunks of splits(text)) {
    assert.deepEqual(parse(chunks), expected, `chunks ${JSON.stringify(chunks)}`);
  }
}

// What the gateway's native API sends (gateway/api/native.py), multi-byte text included.
const NATIVE = [
  ": ping",
  "",
  "event: meta",
  'data: {"role":"leader","subscribers":1}',
  "",
  "id: 1",
  "event: delta",
  'data: {"text":"café"}',
  "",
  "id: 2",
  "event: delta",
  'data: {"text":" 日本語 😀"}',
  "",
  "event: done",
  'data: {"finish_reason":"stop"}',
  "",
  "",
];
const NATIVE_EVENTS = [
  ["comment", "ping"],
  event("meta", '{"role":"leader","subscribers":1}'),
  event("delta", '{"text":"café"}', "1"),
  event("delta", '{"text":" 日本語 😀"}', "2"),
  event("done", '{"finish_reason":"stop"}', "2"),
];

describe("createParser", () => {
  for (const [name, eol] of [["LF", "\n"], ["CRLF", "\r\n"], ["CR", "\r"]]) {
    test(`native API stream with ${name} line ends, every chunking`, () => {
      assertEveryChunkingAgrees(NATIVE.join(eol), NATIVE_EVENTS);
    });
  }

  test("mixed line ends; CR at a chunk end followed by LF is one line end", () => {
    const text = "data: a\r\ndata: b\rdata: c\n\r\nid: 9\r\rdata: d\n\n";
    const expected = [event("message", "a\nb\nc"), event("message", "d", "9")];
    assertEveryChunkingAgrees(text, expected);
    assert.deepEqual(parse(["data: x\r", "\n", "\n"]), [event("message", "x")]);
    // Two CRs across chunks are two line ends, not one.
    assert.deepEqual(parse(["data: x\r", "\r"]), [event("message", "x")]);
  });

  test("multi-line data joins with LF, an empty data line included", () => {
    assertEveryChunkingAgrees("data: one\ndata:two\ndata\ndata:  three\n\n", [
      event("message", "one\ntwo\n\n three"),
    ]);
    assert.deepEqual(parse(["data\n\n"]), [event("message", "")]);
    assert.deepEqual(parse(["data:\ndata:\n\n"]), [event("message", "\n")]);
  });

  test("only one space after the colon is stripped", () => {
    assert.deepEqual(parse(["event:  spaced\ndata:x\n\n"]), [event(" spaced", "x")]);
  });

  test("comments are reported, with or without a space", () => {
    assertEveryChunkingAgrees(": ping\n:raw\n: \n:\ndata: x\n\n", [
      ["comment", "ping"],
      ["comment", "raw"],
      ["comment", ""],
      ["comment", ""],
      event("message", "x"),
    ]);
  });

  test("an event without data is not dispatched, but its id is kept", () => {
    assert.deepEqual(parse(["event: nothing\n\nid: 7\n\ndata: x\n\n"]), [event("message", "x", "7")]);
    // The type does not leak into the next event.
    assert.deepEqual(parse(["event: a\n\ndata: b\n\n"]), [event("message", "b")]);
  });

  test("id: persists across events, empty resets, NUL is ignored", () => {
    assertEveryChunkingAgrees("id: 3\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 4\nid: x\0y\ndata: d\n\n", [
      event("message", "a", "3"),
      event("message", "b", "3"),
      event("message", "c", ""),
      event("message", "d", "4"),
    ]);
    const parser = createParser(() => {});
    parser.feed("id: 12\n");
    assert.equal(parser.lastEventId, "12");
  });

  test("retry: takes ASCII digits only", () => {
    assertEveryChunkingAgrees("retry: 1500\nretry: 2s\nretry: -1\nretry:\nretry: 0\n", [
      ["retry", 1500],
      ["retry", 0],
    ]);
  });

  test("a field name without a colon, and unknown fields", () => {
    assert.deepEqual(parse(["foo: bar\nevent\ndata: x\n\n"]), [event("message", "x")]);
  });

  test("one leading BOM is dropped, a second one is not", () => {
    assertEveryChunkingAgrees("\uFEFFdata: x\n\n", [event("message", "x")]);
    // The second BOM is part of the first field name: "\uFEFFdata" is unknown.
    assert.deepEqual(parse(["\uFEFF\uFEFFdata: x\n\ndata: y\n\n"]), [event("message", "y")]);
    // Empty chunks before the first character do not use up the BOM check.
    assert.deepEqual(parse(["", "\uFEFFdata: x\n\n"]), [event("message", "x")]);
    // A BOM later in the stream is data.
    assert.deepEqual(parse(["data: x\n\n", "\uFEFFdata: y\n\n"]), [event("message", "x")]);
  });

  test("an event cut off before its blank line is not dispatched", () => {
    assert.deepEqual(parse(["data: x\n"]), []);
    assert.deepEqual(parse(["data: x\n\ndata: y"]), [event("message", "x")]);
  });

  test("a long line fed one character at a time stays fast", () => {
    const text = `data: ${"x".repeat(200_000)}\n\n`;
    const started = performance.now();
    const seen = parse(text);
    assert.equal(seen.length, 1);
    assert.equal(seen[0][1].data.length, 200_000);
    assert.ok(performance.now() - started < 5000, "quadratic scanning?");
  });
});

describe("createByteParser", () => {
  const encoder = new TextEncoder();

  function* byteSplits(bytes) {
    for (let i = 0; i <= bytes.length; i += 1) {
      yield [bytes.subarray(0, i), bytes.subarray(i)];
      for (let j = i; j <= bytes.length; j += 1) {
        yield [bytes.subarray(0, i), bytes.subarray(i, j), bytes.subarray(j)];
      }
    }
    yield Array.from({ length: bytes.length }, (_, i) => bytes.subarray(i, i + 1));
  }

  test("UTF-8 split inside 2-, 3- and 4-byte characters, at every byte boundary", () => {
    const text = NATIVE.join("\r\n");
    const bytes = encoder.encode(text);
    assert.ok(bytes.length > text.length, "the stream has multi-byte characters");
    for (const chunks of byteSplits(bytes)) {
      assert.deepEqual(parseBytes(chunks), NATIVE_EVENTS);
    }
  });

  test("a BOM split across chunks is dropped once", () => {
    const bytes = encoder.encode("\uFEFFdata: é\n\n");
    for (const chunks of byteSplits(bytes)) {
      assert.deepEqual(parseBytes(chunks), [event("message", "é")]);
    }
    // Only one: the decoder must not drop a BOM of its own before the parser does.
    const twice = encoder.encode("\uFEFF\uFEFFdata: x\n\ndata: y\n\n");
    assert.deepEqual(parseBytes([twice]), [event("message", "y")]);
  });

  test("invalid UTF-8 becomes U+FFFD, as the spec's decode does", () => {
    const bytes = Uint8Array.from([...encoder.encode("data: a"), 0xff, ...encoder.encode("b\n\n")]);
    assert.deepEqual(parseBytes([bytes]), [event("message", "a\uFFFDb")]);
  });
});
