// sse-client.js -- server-sent events over fetch(), for the gateway's native
// API (POST /v1/stream). EventSource cannot POST a body, so this module brings
// its own parser and reconnection. No build step, no dependencies: an ES
// module that runs unchanged in browsers and in Node 20.
//
// Two layers, exported separately:
//   createParser(onEvent, {onComment, onRetry})  strings in, events out: the
//       WHATWG HTML "interpreting an event stream" algorithm (§9.2.6),
//       incremental, so any chunking of the input gives the same events;
//   createByteParser(...)                        the same over Uint8Array
//       chunks, with a streaming UTF-8 decoder in front;
//   stream(url, body, options)                   one logical answer: POST,
//       parse, dispatch, resume with Last-Event-ID after a dropped connection,
//       and the client-side timings (first byte, TTFT).

const LF = "\n";
const CR = "\r";
const BOM = "\uFEFF";

/**
 * An incremental SSE parser. `feed(text)` takes any slice of the stream (a
 * character, a line, many events); events are dispatched through `onEvent`
 * as soon as their terminating blank line has been seen.
 *
 * @param {(event: {type: string, data: string, lastEventId: string}) => void} onEvent
 * @param {{onComment?: (text: string) => void, onRetry?: (ms: number) => void}} [hooks]
 */
export function createParser(onEvent, { onComment, onRetry } = {}) {
  let line = ""; // the current line, not yet terminated
  let afterCR = false; // the last chunk ended in CR: a leading LF is its CRLF partner
  let atStart = true; // no character seen yet: a BOM here is dropped
  let eventType = "";
  let data = "";
  let hasData = false;
  let lastEventId = "";

  function dispatch() {
    // §9.2.6 "dispatch the event": an event without data is dropped; the
    // last event ID persists across events, the type and data do not.
    if (hasData) {
      onEvent({ type: eventType || "message", data, lastEventId });
    }
    eventType = "";
    data = "";
    hasData = false;
  }

  function processLine(text) {
    if (text === "") {
      dispatch();
      return;
    }
    if (text[0] === ":") {
      onComment?.(withoutLeadingSpace(text.slice(1)));
      return;
    }
    const colon = text.indexOf(":");
    const field = colon === -1 ? text : text.slice(0, colon);
    const value = colon === -1 ? "" : withoutLeadingSpace(text.slice(colon + 1));
    switch (field) {
      case "event":
        eventType = value;
        break;
      case "data":
        // Lines of one event join with LF; the spec appends LF per line and
        // strips the last one, which is the same as joining.
        data = hasData ? data + LF + value : value;
        hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) lastEventId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) onRetry?.(Number.parseInt(value, 10));
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  function feed(chunk) {
    let start = 0;
    if (atStart && chunk.length > 0) {
      atStart = false;
      if (chunk[0] === BOM) start = 1; // only the stream's very first character
    }
    if (afterCR && chunk.length > start) {
      afterCR = false;
      if (chunk[start] === LF) start += 1;
    }
    // Lines end in CRLF, LF or CR; only the new characters are scanned, so a
    // stream fed one character at a time stays linear.
    for (let i = start; i < chunk.length; i += 1) {
      const char = chunk[i];
      if (char !== LF && char !== CR) continue;
      const text = line + chunk.slice(start, i);
      line = "";
      if (char === CR) {
        if (i + 1 === chunk.length) {
          afterCR = true; // its LF, if any, is in the next chunk
        } else if (chunk[i + 1] === LF) {
          i += 1;
        }
      }
      start = i + 1;
      processLine(text);
    }
    line += chunk.slice(start);
  }

  return {
    feed,
    /** The last event ID seen so far ("" before any `id:` field). */
    get lastEventId() {
      return lastEventId;
    },
  };
}

function withoutLeadingSpace(text) {
  return text[0] === " " ? text.slice(1) : text;
}

/**
 * `createParser` behind a streaming UTF-8 decoder: `feed(bytes)` takes
 * Uint8Array chunks split anywhere, a multi-byte character included.
 */
export function createByteParser(onEvent, hooks = {}) {
  // ignoreBOM: keep a BOM in the text so the parser drops exactly one, as
  // the spec says (the decoder would otherwise eat one itself).
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  const parser = createParser(onEvent, hooks);
  return {
    feed(bytes) {
      parser.feed(decoder.decode(bytes, { stream: true }));
    },
    /** End of the byte stream: an incomplete trailing character becomes U+FFFD. */
    end() {
      parser.feed(decoder.decode());
    },
    get lastEventId() {
      return parser.lastEventId;
    },
  };
}

/**
 * Stream one answer from the native API.
 *
 * A dropped connection (network error, or the body ending before `done` or
 * `error`) is resumed: the same body is POSTed again with
 * `Last-Event-ID: <id of the last delta>`, and the gateway continues after it
 * while the stream is alive. With no live stream it starts the answer again
 * from its first delta: `onRestart` is called and the caller should clear
 * what it showed. Retries back off exponentially (base: the server's `retry:`
 * or `retryDelayMs`); their counter resets whenever an attempt delivers a new
 * delta, so `maxRetries` bounds each outage, not the whole answer.
 *
 * Callbacks: onFirstByte({firstByteMs}), onMeta(meta), onDelta(delta, {id,
 * ttftMs}), onDone(done), onError(error), onComment(text), onResume({attempt,
 * lastEventId, delayMs}), onRestart(). Errors have the shape {code, message,
 * retryable, status?}; a header fetch() cannot send is an `invalid_header`
 * error before any request.
 *
 * Resolves (never rejects for network or server trouble) to
 * {outcome: "done" | "error" | "aborted", lastEventId, attempts, firstByteMs,
 *  ttftMs, totalMs, meta, done, error}; times are ms since just before the
 * first fetch.
 */
export async function stream(url, body, options = {}) {
  const {
    signal,
    headers = {},
    maxRetries = 3,
    retryDelayMs = 500,
    maxRetryDelayMs = 8000,
    fetch: fetchImpl = (...args) => globalThis.fetch(...args),
  } = options;
  const payload = typeof body === "string" ? body : JSON.stringify(body);
  const startedAt = performance.now();
  const elapsed = () => roundMs(performance.now() - startedAt);
  const result = {
    outcome: "error",
    lastEventId: options.lastEventId ?? null,
    attempts: 0,
    firstByteMs: null,
    ttftMs: null,
    totalMs: null,
    meta: null,
    done: null,
    error: null,
  };
  // What every attempt shares; connectOnce records the server's retry: here.
  const session = { url, payload, signal, headers, fetchImpl, options, result, elapsed, serverRetryMs: null };
  let failures = 0; // consecutive failed attempts: the current outage

  const finish = (outcome) => {
    result.outcome = outcome;
    result.totalMs = elapsed();
    return result;
  };

  // fetch() rejects a header it cannot send (a character beyond ISO-8859-1,
  // a line break) with the same TypeError as a network failure: found here,
  // it is the caller's error, not an outage to retry.
  const unsendable = Object.keys(headers).find((name) => !isSendable(name, headers[name]));
  if (unsendable !== undefined) {
    // The value is not shown: it may be a key.
    result.error = {
      code: "invalid_header",
      message: `the ${unsendable} header has a character HTTP cannot carry`,
      retryable: false,
    };
    options.onError?.(result.error);
    return finish("error");
  }

  for (;;) {
    if (signal?.aborted) return finish("aborted");
    result.attempts += 1;
    const attempt = await connectOnce(session);
    if (attempt.outcome !== "dropped") return finish(attempt.outcome);
    failures = attempt.progressed ? 1 : failures + 1;
    if (failures > maxRetries) {
      result.error = {
        code: "connection_lost",
        message: `the connection was lost and could not be resumed (${result.attempts} attempts)`,
        retryable: true,
      };
      options.onError?.(result.error);
      return finish("error");
    }
    const base = session.serverRetryMs ?? retryDelayMs;
    const delayMs = Math.min(maxRetryDelayMs, base * 2 ** (failures - 1));
    options.onResume?.({ attempt: result.attempts + 1, lastEventId: result.lastEventId, delayMs });
    if (!(await sleep(delayMs, signal))) return finish("aborted");
  }
}

/**
 * One HTTP request of a `stream()` session: dispatch its events into
 * `session.result` and the callbacks.
 * Returns {outcome: "done" | "error" | "aborted" | "dropped", progressed}.
 */
async function connectOnce(session) {
  const { url, payload, signal, headers, fetchImpl, options, result, elapsed } = session;
  const resumeAfter = result.lastEventId;
  const requestHeaders = {
    "Content-Type": "application/json",
    Accept: "text/event-stream",
    ...headers,
  };
  if (resumeAfter !== null && resumeAfter !== "") requestHeaders["Last-Event-ID"] = resumeAfter;

  let response;
  try {
    response = await fetchImpl(url, {
      method: "POST",
      headers: requestHeaders,
      body: payload,
      signal,
      cache: "no-store",
    });
  } catch {
    return { outcome: signal?.aborted ? "aborted" : "dropped", progressed: false };
  }
  if (!response.ok) {
    result.error = await httpError(response);
    options.onError?.(result.error);
    return { outcome: "error", progressed: false };
  }
  const contentType = response.headers.get("Content-Type") ?? "";
  if (!contentType.startsWith("text/event-stream") || response.body === null) {
    await response.body?.cancel();
    result.error = {
      code: "not_event_stream",
      message: `expected text/event-stream, got ${contentType || "no Content-Type"}`,
      retryable: false,
      status: response.status,
    };
    options.onError?.(result.error);
    return { outcome: "error", progressed: false };
  }

  let terminal = null; // "done" | "error" once the stream's last event came
  let unreadable = false; // an event we cannot parse: stop reading this stream
  let progressed = false;
  let firstDelta = true;

  const onEvent = (event) => {
    // Nothing counts after the last event, or once the caller has aborted
    // (from a callback, say, with more events of this chunk still to come).
    if (terminal !== null || signal?.aborted) return;
    let value;
    try {
      value = JSON.parse(event.data);
    } catch {
      terminal = "error";
      unreadable = true;
      result.error = { code: "bad_event", message: `event ${event.type} is not JSON`, retryable: false };
      options.onError?.(result.error);
      return;
    }
    switch (event.type) {
      case "meta":
        result.meta = value;
        options.onMeta?.(value);
        break;
      case "delta": {
        const id = event.lastEventId;
        // A resumed request whose first delta is not after the one we asked
        // for hit no live stream: the gateway started the answer again.
        if (firstDelta && resumeAfter !== null && isNotAfter(id, resumeAfter)) {
          options.onRestart?.();
        }
        firstDelta = false;
        progressed = true;
        result.lastEventId = id;
        if (result.ttftMs === null) result.ttftMs = elapsed();
        options.onDelta?.(value, { id, ttftMs: result.ttftMs });
        break;
      }
      case "done":
        terminal = "done";
        result.done = value;
        options.onDone?.(value);
        break;
      case "error":
        terminal = "error";
        result.error = value;
        options.onError?.(value);
        break;
      default:
        break; // an event type this client does not know: ignored
    }
  };
  const parser = createByteParser(onEvent, {
    onComment: (text) => options.onComment?.(text),
    onRetry: (ms) => {
      session.serverRetryMs = ms;
    },
  });

  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (result.firstByteMs === null && value.byteLength > 0) {
        result.firstByteMs = elapsed();
        options.onFirstByte?.({ firstByteMs: result.firstByteMs });
      }
      // After the last event the server closes at once: read on to the end
      // rather than cancel, which would reset a connection it is finishing.
      if (terminal === null) parser.feed(value);
      if (unreadable) {
        await reader.cancel();
        break;
      }
    }
  } catch {
    if (terminal !== null) return { outcome: terminal, progressed };
    return { outcome: signal?.aborted ? "aborted" : "dropped", progressed };
  }
  if (terminal === null) parser.end();
  return { outcome: terminal ?? "dropped", progressed };
}

function isSendable(name, value) {
  try {
    new Headers([[name, value]]);
    return true;
  } catch {
    return false;
  }
}

function isNotAfter(id, resumeAfter) {
  const seq = Number(id);
  const after = Number(resumeAfter);
  return Number.isFinite(seq) && Number.isFinite(after) && seq <= after;
}

/** An HTTP error status as {code, message, retryable, status}, from the
 *  gateway's OpenAI-shaped JSON error body when there is one. */
async function httpError(response) {
  const status = response.status;
  let message = `HTTP ${status} ${response.statusText ?? ""}`.trim();
  let code = `http_${status}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
    if (body?.error?.code) code = body.error.code;
  } catch {
    // not JSON: the status line says it all
  }
  return { code, message, retryable: status === 429 || status >= 502, status };
}

/** Wait `ms`; false if `signal` aborted first. */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve(false);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function roundMs(ms) {
  return Math.round(ms * 10) / 10;
}
