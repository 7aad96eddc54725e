// A scripted stand-in for fetch(): each call takes the next script and answers
// a Response whose body is a ReadableStream of the script's chunks, ending the
// way the script says. Like the real fetch, an aborted signal rejects the call
// or errors the body being read.

const encoder = new TextEncoder();

/**
 * @param {Array<{chunks?: Array<string|Uint8Array>, then?: "end"|"drop"|"hang",
 *                status?: number, headers?: Record<string,string>, body?: string,
 *                reject?: boolean}>} scripts
 * @returns {{fetch: Function, calls: Array<{url: string, init: RequestInit, headers: Headers}>,
 *            cancelled: number}}
 */
export function scriptedFetch(scripts) {
  const remaining = [...scripts];
  const state = { calls: [], cancelled: 0 };
  state.fetch = async (url, init) => {
    state.calls.push({ url, init, headers: new Headers(init.headers) });
    const script = remaining.shift();
    if (script === undefined) throw new Error(`unexpected fetch #${state.calls.length}`);
    const { signal } = init;
    if (signal?.aborted) throw signal.reason;
    if (script.reject) throw new TypeError("fetch failed");
    if (script.body !== undefined) {
      return new Response(script.body, { status: script.status ?? 200, headers: script.headers });
    }
    // One chunk per pull, so the end comes after every chunk was read (an
    // error raised up front would discard the queued chunks).
    const chunks = [...(script.chunks ?? [])];
    let hung = null;
    const body = new ReadableStream({
      start(controller) {
        signal?.addEventListener("abort", () => {
          try {
            controller.error(signal.reason);
          } catch {
            // already closed
          }
          hung?.();
        });
      },
      pull(controller) {
        const chunk = chunks.shift();
        if (chunk !== undefined) {
          controller.enqueue(typeof chunk === "string" ? encoder.encode(chunk) : chunk);
          return undefined;
        }
        const then = script.then ?? "end";
        if (then === "end") controller.close();
        if (then === "drop") controller.error(new TypeError("network error"));
        // "hang": the connection stays open until aborted or cancelled.
        return then === "hang" ? new Promise((resolve) => { hung = resolve; }) : undefined;
      },
      cancel() {
        state.cancelled += 1;
        hung?.();
      },
    });
    return new Response(body, {
      status: script.status ?? 200,
      headers: script.headers ?? { "Content-Type": "text/event-stream" },
    });
  };
  return state;
}

/** SSE frames for the native API, as the gateway writes them. */
export const frames = {
  ping: ": ping\n\n",
  meta: (meta) => `event: meta\ndata: ${JSON.stringify(meta)}\n\n`,
  delta: (id, text) => `id: ${id}\nevent: delta\ndata: ${JSON.stringify({ text })}\n\n`,
  done: (body = { finish_reason: "stop", usage: null, ttft_ms: 5, total_ms: 9 }) =>
    `event: done\ndata: ${JSON.stringify(body)}\n\n`,
  error: (body) => `event: error\ndata: ${JSON.stringify(body)}\n\n`,
};
