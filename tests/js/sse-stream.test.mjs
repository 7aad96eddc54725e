// stream(): one answer over a scripted fetch -- events to callbacks, resume
// with Last-Event-ID after a dropped connection, bounded retries, abort.
import assert from "node:assert/strict";
import { test } from "node:test";

import { stream } from "../../gateway/static/sse-client.js";
import { frames, scriptedFetch } from "./fake-fetch.mjs";

const URL = "http://gateway.test/v1/stream";
const BODY = { model: "sim", messages: [{ role: "user", content: "hi" }], stream: true };
const META = { request_id: "r1", role: "leader", queue_wait_ms: 0.5, ttft_ms: 12, key: "k", subscribers: 1 };

/** Callbacks that log what they were called with (delta: its id and text). */
function recorder(extra = {}) {
  const log = [];
  const names = ["onFirstByte", "onMeta", "onDone", "onError", "onComment", "onResume", "onRestart"];
  const callbacks = Object.fromEntries(names.map((name) => [name, (arg) => log.push([name, arg])]));
  callbacks.onDelta = (delta, info) => log.push(["onDelta", info.id, delta.text]);
  for (const [name, hook] of Object.entries(extra)) {
    const logged = callbacks[name];
    callbacks[name] = (...args) => {
      logged(...args);
      hook(...args);
    };
  }
  return { log, callbacks, named: (name) => log.filter(([n]) => n === name).map((entry) => entry.slice(1)) };
}

const text = (rec) => rec.named("onDelta").map(([, t]) => t).join("");

test("a whole answer: callbacks in stream order, the request, the timings", async () => {
  const fake = scriptedFetch([
    { chunks: [frames.ping, frames.meta(META), frames.delta(1, "Hello"), frames.delta(2, " world"), frames.done()] },
  ]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, headers: { "X-Trace": "t" }, ...rec.callbacks });

  assert.deepEqual(rec.log.map(([name]) => name), [
    "onFirstByte", "onComment", "onMeta", "onDelta", "onDelta", "onDone",
  ]);
  assert.equal(text(rec), "Hello world");
  assert.deepEqual(rec.named("onComment"), [["ping"]]);
  assert.deepEqual(rec.named("onMeta"), [[META]]);
  assert.equal(result.outcome, "done");
  assert.equal(result.lastEventId, "2");
  assert.equal(result.attempts, 1);
  assert.deepEqual(result.meta, META);
  assert.equal(result.done.finish_reason, "stop");
  assert.equal(result.error, null);
  assert.ok(result.firstByteMs >= 0 && result.ttftMs >= result.firstByteMs);
  assert.ok(result.totalMs >= result.ttftMs);
  assert.deepEqual(rec.named("onFirstByte"), [[{ firstByteMs: result.firstByteMs }]]);

  const [call] = fake.calls;
  assert.equal(call.url, URL);
  assert.equal(call.init.method, "POST");
  assert.equal(call.init.body, JSON.stringify(BODY));
  assert.equal(call.headers.get("Content-Type"), "application/json");
  assert.equal(call.headers.get("Accept"), "text/event-stream");
  assert.equal(call.headers.get("X-Trace"), "t");
  assert.equal(call.headers.get("Last-Event-ID"), null);
});

test("bytes one at a time, multi-byte characters split: the same text", async () => {
  const wire = new TextEncoder().encode(frames.delta(1, "café 日本語") + frames.delta(2, " 😀🚀") + frames.done());
  const chunks = Array.from(wire, (byte) => Uint8Array.of(byte));
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: scriptedFetch([{ chunks }]).fetch, ...rec.callbacks });
  assert.equal(result.outcome, "done");
  assert.equal(text(rec), "café 日本語 😀🚀");
});

test("a dropped connection resumes with Last-Event-ID and the same body", async () => {
  const fake = scriptedFetch([
    { chunks: [frames.ping, frames.meta(META), frames.delta(1, "a"), frames.delta(2, "b"), "id: 3\nevent: del"], then: "drop" },
    { chunks: [frames.ping, frames.meta({ ...META, role: "follower" }), frames.delta(3, "c"), frames.done()] },
  ]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 1, ...rec.callbacks });

  assert.equal(result.outcome, "done");
  assert.equal(text(rec), "abc");
  assert.equal(fake.calls.length, 2);
  // The half-received event 3 was never dispatched, so the resume asks after 2.
  assert.equal(fake.calls[1].headers.get("Last-Event-ID"), "2");
  assert.equal(fake.calls[1].init.body, fake.calls[0].init.body);
  assert.deepEqual(rec.named("onResume"), [[{ attempt: 2, lastEventId: "2", delayMs: 1 }]]);
  assert.deepEqual(rec.named("onRestart"), []);
  assert.equal(result.meta.role, "follower");
  assert.equal(result.attempts, 2);
});

test("a body that ends before done/error is a dropped connection too", async () => {
  const fake = scriptedFetch([
    { chunks: [frames.delta(1, "a")], then: "end" },
    { chunks: [frames.delta(2, "b"), frames.done()] },
  ]);
  const result = await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 1 });
  assert.equal(result.outcome, "done");
  assert.equal(fake.calls[1].headers.get("Last-Event-ID"), "1");
});

test("a resume that finds no live stream restarts the answer: onRestart first", async () => {
  const fake = scriptedFetch([
    { chunks: [frames.delta(1, "a"), frames.delta(2, "b")], then: "drop" },
    { chunks: [frames.delta(1, "a"), frames.delta(2, "b"), frames.delta(3, "c"), frames.done()] },
  ]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 1, ...rec.callbacks });
  const names = rec.log.map(([name]) => name).filter((name) => name !== "onFirstByte");
  assert.deepEqual(names, ["onDelta", "onDelta", "onResume", "onRestart", "onDelta", "onDelta", "onDelta", "onDone"]);
  assert.equal(result.outcome, "done");
  assert.equal(result.lastEventId, "3");
});

test("retries are bounded, with exponential backoff capped", async () => {
  const fake = scriptedFetch([{ reject: true }, { reject: true }, { reject: true }, { reject: true }]);
  const rec = recorder();
  const result = await stream(URL, BODY, {
    fetch: fake.fetch, maxRetries: 3, retryDelayMs: 2, maxRetryDelayMs: 5, ...rec.callbacks,
  });
  assert.equal(fake.calls.length, 4);
  assert.deepEqual(rec.named("onResume").map(([r]) => r.delayMs), [2, 4, 5]);
  assert.equal(result.outcome, "error");
  assert.equal(result.error.code, "connection_lost");
  assert.deepEqual(rec.named("onError"), [[result.error]]);
  // No Last-Event-ID: nothing was received to resume after.
  assert.ok(fake.calls.every((call) => call.headers.get("Last-Event-ID") === null));
});

test("the retry budget is per outage: an attempt that delivers resets it", async () => {
  const fake = scriptedFetch([
    { chunks: [frames.delta(1, "a")], then: "drop" },
    { chunks: [frames.delta(2, "b")], then: "drop" },
    { chunks: [frames.delta(3, "c")], then: "drop" },
    { chunks: [frames.delta(4, "d"), frames.done()] },
  ]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, maxRetries: 1, retryDelayMs: 1, ...rec.callbacks });
  assert.equal(result.outcome, "done");
  assert.equal(text(rec), "abcd");
  assert.deepEqual(fake.calls.map((call) => call.headers.get("Last-Event-ID")), [null, "1", "2", "3"]);
});

test("the server's retry: field sets the backoff base", async () => {
  const fake = scriptedFetch([
    { chunks: ["retry: 3\n\n", frames.delta(1, "a")], then: "drop" },
    { reject: true },
    { chunks: [frames.done()] },
  ]);
  const rec = recorder();
  await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 10_000, ...rec.callbacks });
  assert.deepEqual(rec.named("onResume").map(([r]) => r.delayMs), [3, 6]);
});

test("an error event ends the stream: reported once, never resumed", async () => {
  const error = { code: "upstream_stream_reset", message: "upstream reset the stream", retryable: true };
  const fake = scriptedFetch([{ chunks: [frames.delta(1, "a"), frames.error(error)] }]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 1, ...rec.callbacks });
  assert.equal(result.outcome, "error");
  assert.deepEqual(result.error, error);
  assert.deepEqual(rec.named("onError"), [[error]]);
  assert.equal(fake.calls.length, 1);
});

test("events after done are ignored, and a drop after done is not resumed", async () => {
  const fake = scriptedFetch([{ chunks: [frames.done(), frames.delta(9, "late")], then: "drop" }]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, retryDelayMs: 1, ...rec.callbacks });
  assert.equal(result.outcome, "done");
  assert.deepEqual(rec.named("onDelta"), []);
  assert.equal(fake.calls.length, 1);
});

test("abort mid-stream: outcome aborted, no error, no resume", async () => {
  const controller = new AbortController();
  // Both deltas in one chunk: the second must not be dispatched after the abort.
  const fake = scriptedFetch([{ chunks: [frames.meta(META), frames.delta(1, "a") + frames.delta(2, "b")], then: "hang" }]);
  const rec = recorder({ onDelta: () => controller.abort() });
  const result = await stream(URL, BODY, { fetch: fake.fetch, signal: controller.signal, ...rec.callbacks });
  assert.equal(result.outcome, "aborted");
  assert.equal(fake.calls[0].init.signal, controller.signal);
  assert.deepEqual(rec.named("onError"), []);
  assert.deepEqual(rec.named("onResume"), []);
  assert.equal(fake.calls.length, 1);
  assert.equal(text(rec), "a");
});

test("abort during the backoff ends at once; abort before the start sends nothing", async () => {
  const controller = new AbortController();
  const fake = scriptedFetch([{ chunks: [frames.delta(1, "a")], then: "drop" }]);
  const rec = recorder({ onResume: () => queueMicrotask(() => controller.abort()) });
  const started = performance.now();
  const result = await stream(URL, BODY, {
    fetch: fake.fetch, signal: controller.signal, retryDelayMs: 60_000, ...rec.callbacks,
  });
  assert.equal(result.outcome, "aborted");
  assert.ok(performance.now() - started < 5000, "waited out the backoff");
  assert.equal(fake.calls.length, 1);

  const none = scriptedFetch([]);
  const early = await stream(URL, BODY, { fetch: none.fetch, signal: AbortSignal.abort() });
  assert.equal(early.outcome, "aborted");
  assert.equal(none.calls.length, 0);
});

test("an HTTP error status is reported from the gateway's JSON error, not retried", async () => {
  const fake = scriptedFetch([
    {
      status: 429,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ error: { message: "admission queue is full", type: "rate_limit", code: "queue_full" } }),
    },
  ]);
  const rec = recorder();
  const result = await stream(URL, BODY, { fetch: fake.fetch, ...rec.callbacks });
  assert.equal(result.outcome, "error");
  assert.deepEqual(result.error, { code: "queue_full", message: "admission queue is full", retryable: true, status: 429 });
  assert.equal(fake.calls.length, 1);

  const plain = scriptedFetch([{ status: 404, headers: { "Content-Type": "text/plain" }, body: "nope" }]);
  const notFound = await stream(URL, BODY, { fetch: plain.fetch });
  assert.equal(notFound.error.code, "http_404");
  assert.equal(notFound.error.retryable, false);
});

test("a 200 that is not an event stream, and an event that is not JSON, are errors", async () => {
  const html = scriptedFetch([{ status: 200, headers: { "Content-Type": "text/html" }, body: "<p>hi</p>" }]);
  const wrongType = await stream(URL, BODY, { fetch: html.fetch });
  assert.equal(wrongType.error.code, "not_event_stream");

  const garbled = scriptedFetch([{ chunks: ["event: delta\ndata: {oops\n\n", frames.delta(1, "x")], then: "hang" }]);
  const bad = await stream(URL, BODY, { fetch: garbled.fetch, retryDelayMs: 1 });
  assert.equal(bad.outcome, "error");
  assert.equal(bad.error.code, "bad_event");
  assert.equal(garbled.cancelled, 1, "the body is cancelled, not left hanging");
  assert.equal(garbled.calls.length, 1);
});

test("a caller's lastEventId is sent on the first request", async () => {
  const fake = scriptedFetch([{ chunks: [frames.delta(6, "f"), frames.done()] }]);
  const rec = recorder();
  await stream(URL, BODY, { fetch: fake.fetch, lastEventId: "5", ...rec.callbacks });
  assert.equal(fake.calls[0].headers.get("Last-Event-ID"), "5");
  assert.deepEqual(rec.named("onRestart"), []);
});

test("a header fetch cannot send is an error at once, not a lost connection", async () => {
  // A key pasted with a non-breaking hyphen (U+2011): fetch rejects it with
  // the same TypeError as a network failure, so it must be caught before.
  const fake = scriptedFetch([]);
  const rec = recorder();
  const result = await stream(URL, BODY, {
    fetch: fake.fetch, headers: { Authorization: "Bearer sk\u2011demo" }, retryDelayMs: 1, ...rec.callbacks,
  });
  assert.equal(result.outcome, "error");
  assert.equal(result.error.code, "invalid_header");
  assert.equal(result.error.retryable, false);
  assert.match(result.error.message, /Authorization/);
  assert.doesNotMatch(result.error.message, /sk/, "the value (a key) is not shown");
  assert.deepEqual(rec.named("onError"), [[result.error]]);
  assert.deepEqual(rec.named("onResume"), []);
  assert.equal(fake.calls.length, 0);
});
