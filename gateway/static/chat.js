// chat.js -- the demo page: one prompt, one or N identical streams (a burst,
// to show coalescing), each rendered as it arrives, with the timings and the
// coalescing role the gateway reported.
import { stream } from "./sse-client.js";

const MODEL = "sim-1";
const MAX_BURST = 6; // see the comment on #burst-count in index.html
/** A pane's header before its first token, by how the pane ended. */
const ENDED_WITHOUT_ROLE = { done: "done", error: "failed", stopped: "stopped" };

const byId = (id) => document.getElementById(id);
const ui = {
  form: byId("chat-form"),
  prompt: byId("prompt"),
  send: byId("send"),
  stop: byId("stop"),
  burst: byId("burst"),
  burstCount: byId("burst-count"),
  apiKey: byId("api-key"),
  status: byId("status"),
  state: byId("status-state"),
  firstByte: byId("status-first-byte"),
  ttftClient: byId("status-ttft-client"),
  ttftServer: byId("status-ttft-server"),
  queueWait: byId("status-queue-wait"),
  role: byId("status-role"),
  subscribers: byId("status-subscribers"),
  error: byId("error"),
  answers: byId("answers"),
  paneTemplate: byId("pane-template"),
};

/** The run in flight: its AbortController (Stop aborts every stream of it). */
let current = null;

function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

function describeError(error) {
  const retry = error.retryable ? " Retrying may help." : "";
  const message = /[.!?]$/.test(error.message) ? error.message : `${error.message}.`;
  return `Error (${error.code}): ${message}${retry}`;
}

/** One answer pane and the DOM nodes it writes to. */
class Pane {
  constructor(index) {
    const root = ui.paneTemplate.content.firstElementChild.cloneNode(true);
    root.id = `pane-${index}`;
    this.root = root;
    this.role = root.querySelector(".role");
    this.timing = root.querySelector(".pane-timing");
    this.reasoningBox = root.querySelector(".reasoning");
    this.answerBox = root.querySelector(".answer");
    this.answerBox.id = `answer-${index}`;
    this.refusalBox = root.querySelector(".refusal");
    this.toolBox = root.querySelector(".tool-calls");
    this.note = root.querySelector(".pane-note");
    // Text nodes grown with appendData: no re-parsing, and never HTML.
    this.answer = this.answerBox.appendChild(document.createTextNode(""));
    this.reasoning = this.reasoningBox.appendChild(document.createTextNode(""));
    this.refusal = this.refusalBox.appendChild(document.createTextNode(""));
    this.toolCalls = new Map(); // index -> {name, arguments}
    this.meta = null;
  }

  setState(value) {
    this.root.dataset.state = value;
    // The role comes with the first token; a pane that ended before it has
    // none to show, so its header says how it ended instead of "waiting".
    const ended = ENDED_WITHOUT_ROLE[value];
    if (ended && this.meta === null) this.role.textContent = ended;
  }

  showMeta(meta, ttftClientMs) {
    this.meta = meta;
    this.root.dataset.role = meta.role;
    this.role.textContent = meta.role;
    this.showTiming(ttftClientMs);
  }

  showTiming(ttftClientMs) {
    const server = this.meta ? `server ${formatMs(this.meta.ttft_ms)}` : "";
    const client = ttftClientMs === null ? "" : `client ${formatMs(ttftClientMs)}`;
    this.timing.textContent = [client, server].filter(Boolean).join(" · ");
  }

  append(delta) {
    if (delta.text) this.answer.appendData(delta.text);
    // A model that declines answers in `refusal` deltas, not `text`.
    if (delta.refusal) {
      this.refusalBox.hidden = false;
      this.refusal.appendData(delta.refusal);
    }
    if (delta.reasoning) {
      this.reasoningBox.hidden = false;
      this.reasoning.appendData(delta.reasoning);
    }
    for (const call of delta.tool_calls ?? []) {
      const known = this.toolCalls.get(call.index) ?? { name: "", arguments: "" };
      known.name = call.name ?? known.name;
      known.arguments += call.arguments ?? "";
      this.toolCalls.set(call.index, known);
      this.toolBox.hidden = false;
      this.toolBox.textContent = [...this.toolCalls.values()]
        .map((c) => `${c.name}(${c.arguments})`)
        .join("\n");
    }
  }

  clear() {
    this.answer.data = "";
    this.reasoning.data = "";
    this.refusal.data = "";
    // Shown again by the restarted answer's own deltas, if it has any.
    this.reasoningBox.hidden = true;
    this.refusalBox.hidden = true;
    this.toolBox.hidden = true;
    this.toolCalls.clear();
    this.toolBox.textContent = "";
  }

  say(text, kind = "note") {
    this.note.hidden = !text;
    this.note.textContent = text;
    this.note.dataset.kind = kind;
  }
}

function resetStatus(count) {
  for (const field of [ui.firstByte, ui.ttftClient, ui.ttftServer, ui.queueWait, ui.role, ui.subscribers]) {
    field.textContent = "–";
  }
  ui.error.hidden = true;
  ui.error.textContent = "";
  showRunState(count > 1 ? `streaming ×${count}` : "streaming", "streaming");
}

function showRunState(label, state) {
  ui.state.textContent = label;
  ui.status.dataset.state = state;
}

function showError(error) {
  // The first error of a run is the one shown: a burst shares its failure.
  if (!ui.error.hidden) return;
  ui.error.hidden = false;
  ui.error.textContent = describeError(error);
}

/** The status line's role and subscriber count over every pane's meta. */
function showRoles(panes) {
  const metas = panes.map((pane) => pane.meta).filter(Boolean);
  if (metas.length === 0) return;
  if (panes.length === 1) {
    ui.role.textContent = metas[0].role;
  } else {
    const count = (role) => metas.filter((m) => m.role === role).length;
    ui.role.textContent = `${count("leader")} leader · ${count("follower")} follower`;
  }
  ui.subscribers.textContent = String(Math.max(...metas.map((m) => m.subscribers)));
}

function setRunning(running) {
  const focused = document.activeElement;
  ui.send.disabled = running;
  ui.burst.disabled = running;
  ui.burstCount.disabled = running;
  ui.apiKey.disabled = running;
  ui.stop.disabled = !running;
  ui.answers.setAttribute("aria-busy", String(running));
  // A control disabled while focused drops the focus to <body>; a keyboard
  // user gets it on the one that is useful now: Stop while running, then Send.
  if (focused?.disabled) (running ? ui.stop : ui.send).focus();
}

/** Stream one answer into `pane`; the first pane also drives the status line. */
function streamInto(pane, panes, body, signal, primary) {
  let ttftClientMs = null;
  const key = ui.apiKey.value.trim();
  return stream("/v1/stream", body, {
    signal,
    headers: key ? { Authorization: `Bearer ${key}` } : {},
    onFirstByte({ firstByteMs }) {
      if (primary) ui.firstByte.textContent = formatMs(firstByteMs);
    },
    onMeta(meta) {
      pane.showMeta(meta, ttftClientMs);
      if (primary) {
        ui.ttftServer.textContent = formatMs(meta.ttft_ms);
        ui.queueWait.textContent = formatMs(meta.queue_wait_ms);
      }
      showRoles(panes);
    },
    onDelta(delta, { ttftMs }) {
      if (ttftClientMs === null) {
        ttftClientMs = ttftMs;
        pane.showTiming(ttftMs);
        if (primary) ui.ttftClient.textContent = formatMs(ttftMs);
      }
      pane.setState("streaming");
      // A resume succeeded; a restart's note stays: the answer began again.
      if (!pane.note.hidden && pane.note.dataset.kind === "resuming") pane.say("");
      pane.append(delta);
    },
    onResume({ attempt }) {
      pane.say(`connection lost, resuming (attempt ${attempt})…`, "resuming");
    },
    onRestart() {
      pane.clear();
      pane.say("the stream had ended; the answer started again");
    },
    onDone(done) {
      pane.setState(done.finish_reason === "cancelled" ? "stopped" : "done");
      if (done.finish_reason === "cancelled") pane.say("cancelled by the server");
    },
    onError(error) {
      pane.setState("error");
      // The full message is in the error box above; the pane says which.
      pane.say(`error: ${error.code}`, "error");
      showError(error);
    },
  });
}

async function run(count) {
  if (current !== null) return;
  const prompt = ui.prompt.value.trim();
  if (!prompt) {
    ui.prompt.focus();
    return;
  }
  const controller = new AbortController();
  current = controller;
  const body = { model: MODEL, messages: [{ role: "user", content: prompt }], stream: true };
  const panes = Array.from({ length: count }, (_, index) => new Pane(index));
  ui.answers.replaceChildren(...panes.map((pane) => pane.root));
  ui.answers.dataset.count = String(count);
  resetStatus(count);
  setRunning(true);
  try {
    // Fired in the same tick, identical bodies: the gateway coalesces them.
    const results = await Promise.all(
      panes.map((pane, index) => streamInto(pane, panes, body, controller.signal, index === 0)),
    );
    results.forEach((result, index) => {
      if (result.outcome === "aborted") panes[index].setState("stopped");
    });
    // A stream the server cancelled ends in `done`, but its answer is cut
    // short, as one stopped here is.
    const cancelled = (result) => result.outcome === "done" && result.done?.finish_reason === "cancelled";
    const outcomes = new Set(results.map((result) => (cancelled(result) ? "aborted" : result.outcome)));
    if (outcomes.has("error")) showRunState("error", "error");
    else if (outcomes.has("aborted")) showRunState("stopped", "stopped");
    else showRunState("done", "done");
  } finally {
    current = null;
    setRunning(false);
  }
}

function burstSize() {
  const wanted = Number.parseInt(ui.burstCount.value, 10);
  const size = Number.isFinite(wanted) ? Math.min(MAX_BURST, Math.max(1, wanted)) : 5;
  ui.burstCount.value = String(size);
  return size;
}

const burst = () => run(burstSize());

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  run(1);
});
ui.burst.addEventListener("click", burst);
ui.burstCount.addEventListener("keydown", (event) => {
  // Enter in a field submits its form, which sends one request; the count
  // belongs to the Burst button, so Enter here sends the burst.
  if (event.key === "Enter" && !event.isComposing) {
    event.preventDefault();
    burst();
  }
});
ui.stop.addEventListener("click", () => current?.abort());
ui.prompt.addEventListener("keydown", (event) => {
  // Enter sends, Shift+Enter is a new line (the usual chat convention).
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
document.documentElement.dataset.ready = "true";
