/**
 * demo.js: the controller of the demo chat page (templates/index.html): wires its form, buttons
 * and conversation list to a ChatProxyClient, renders each answer with an AnswerView and keeps
 * the unfinished one in a ResumeRecord so that a reload continues it.
 */

import { ChatProxyClient } from "./client.js";
import {
  DEFAULT_STREAM_URL,
  DEFAULT_WEBSOCKET_PATH,
  getCookie,
  newRequestId,
  websocketUrl,
} from "./endpoints.js";
import { isTerminal } from "./events.js";
import { ResumeRecord } from "./resume.js";
import { AnswerView } from "./view.js";

// The tool a fault option with data-tools="weather" offers the model (the simulator then calls it).
const DEMO_TOOLS = Object.freeze({
  weather: [{
    type: "function",
    function: {
      name: "get_weather",
      description: "The current weather in a city.",
      parameters: {
        type: "object",
        properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
        required: ["city", "unit"],
      },
    },
  }],
});

// The transport picked last, remembered across visits (localStorage).
const TRANSPORT_STORAGE_KEY = "chatproxy.transport";

function storageGet(key) {
  try {
    return globalThis.localStorage?.getItem(key) ?? null;
  } catch {
    return null; // storage disabled
  }
}

function storageSet(key, value) {
  try {
    globalThis.localStorage?.setItem(key, value);
  } catch {
    // storage disabled: the choice just is not remembered
  }
}

/**
 * `text` with the simulator's fault directive appended. A directive limited by `times=N` counts
 * requests per message text, so a fresh `key` makes each send its own case (its retries share it).
 */
export function withDirective(text, directive) {
  if (!directive) return text;
  if (!/\btimes=/.test(directive)) return `${text} ${directive}`;
  return `${text} ${directive} [[sim key=ui-${newRequestId().slice(0, 12)}]]`;
}

/**
 * Wire up the demo chat page (templates/index.html). `root` carries data-stream-url,
 * data-ws-path and data-csrf-token; the controls are found by id: #conversation, #composer,
 * #prompt, #send, #stop, #transport, #fault (optional), #new-chat (optional), #status.
 *
 * While an answer streams, the conversation, its stream id and last event id are kept in
 * sessionStorage (ResumeRecord); if the page is reloaded meanwhile, mountChat shows the
 * conversation again and continues the answer where it was. Pass `record: null` to
 * turn that off.
 * Returns {client, turns, record, resumed} for scripting and tests; `resumed` is the promise of
 * the continued answer's terminal event, or null.
 */
export function mountChat(root, { client, record = new ResumeRecord() } = {}) {
  const doc = root.ownerDocument;
  const win = doc.defaultView;
  const byId = (id) => doc.getElementById(id);
  const conversation = byId("conversation");
  const form = byId("composer");
  const prompt = byId("prompt");
  const sendButton = byId("send");
  const stopButton = byId("stop");
  const transportSelect = byId("transport");
  const faultSelect = byId("fault");
  const newChatButton = byId("new-chat");
  const status = byId("status");

  const templateToken = root.dataset.csrfToken || null;
  client ??= new ChatProxyClient({
    streamUrl: root.dataset.streamUrl || DEFAULT_STREAM_URL,
    websocketUrl: websocketUrl(root.dataset.wsPath || DEFAULT_WEBSOCKET_PATH, win.location),
    // Read at each send: logging in rotates the cookie.
    csrfToken: () => getCookie("csrftoken", doc.cookie) ?? templateToken,
  });

  /** Finished and unfinished turns: {user: string, view: AnswerView}. */
  const turns = [];
  const websocketAvailable = typeof win.WebSocket === "function";

  if (transportSelect) {
    const wsOption = transportSelect.querySelector('option[value="websocket"]');
    if (!websocketAvailable && wsOption) wsOption.disabled = true;
    const saved = storageGet(TRANSPORT_STORAGE_KEY);
    if (saved && [...transportSelect.options].some((o) => o.value === saved && !o.disabled)) {
      transportSelect.value = saved;
    }
    transportSelect.addEventListener("change", () => storageSet(TRANSPORT_STORAGE_KEY, transportSelect.value));
  }

  const setBusy = (busy) => {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    root.dataset.busy = String(busy);
  };
  setBusy(false);

  const nearBottom = () => {
    const scroller = doc.scrollingElement ?? doc.documentElement;
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 120;
  };
  const scrollToBottom = () => {
    const scroller = doc.scrollingElement ?? doc.documentElement;
    scroller.scrollTop = scroller.scrollHeight;
  };

  const addTurn = (role, text) => {
    const item = doc.createElement("li");
    item.className = `cp-turn cp-turn-${role}`;
    const label = doc.createElement("span");
    label.className = "cp-sr-only";
    label.textContent = role === "user" ? "You said:" : "Answer:";
    const message = doc.createElement("div");
    message.className = `msg ${role}`;
    message.dataset.testid = `${role}-message`;
    message.textContent = text;
    item.append(label, message);
    let note = null;
    if (role === "assistant") {
      note = doc.createElement("p");
      note.className = "msg-note";
      note.hidden = true;
      item.append(note);
    }
    conversation.append(item);
    return { message, note };
  };

  /** The conversation sent upstream: earlier turns that got an answer, then `text`. */
  const history = (text) => {
    const messages = [];
    for (const turn of turns) {
      if (!turn.view.text) continue; // a turn that failed before any answer says nothing useful
      messages.push({ role: "user", content: turn.user });
      messages.push({ role: "assistant", content: turn.view.text });
    }
    messages.push({ role: "user", content: text });
    return messages;
  };

  /** The finished turns, for the record. */
  const finishedTurns = () =>
    turns.filter((t) => t.view.final).map((t) => ({ user: t.user, text: t.view.text, final: t.view.final }));

  /** The callback of one answer: render each event, and keep the record up to date. */
  const answerEvents = (view, { user, transport }) => (event) => {
    const follow = nearBottom();
    view.handle(event);
    if (follow) scrollToBottom();
    if (!record) return;
    if (isTerminal(event.type)) {
      record.clear(event.streamId);
    } else if (event.type === "start" && event.streamId) {
      const earlier = finishedTurns();
      record.start({ transport, streamId: event.streamId, lastEventId: event.seq ?? 0, user, text: view.text, turns: earlier });
    } else if (event.seq !== null && event.streamId === record.streamId) {
      record.update({ lastEventId: event.seq, text: view.text });
    }
  };

  const answerEnded = (view, final) => {
    if (!view.final && final) view.handle(final);
    record?.clear(final?.streamId ?? null);
    setBusy(false);
    prompt.focus();
  };

  const send = async () => {
    const text = prompt.value.trim();
    if (!text) {
      status.textContent = "Type a message first.";
      prompt.focus();
      return;
    }
    if (client.busy) return;
    const messages = history(withDirective(text, faultSelect?.value ?? ""));
    const toolsName = faultSelect?.selectedOptions?.[0]?.dataset.tools ?? "";
    const tools = Object.hasOwn(DEMO_TOOLS, toolsName) ? DEMO_TOOLS[toolsName] : undefined;

    prompt.value = "";
    addTurn("user", text);
    const { message, note } = addTurn("assistant", "");
    const view = new AnswerView(message, { note, status });
    // The history keeps the message as typed: the fault directive was for this request only.
    turns.push({ user: text, view });
    setBusy(true);
    scrollToBottom();

    const transport = transportSelect?.value ?? "sse";
    const final = await client.send({
      messages,
      options: tools ? { tools } : undefined,
      transport,
      onEvent: answerEvents(view, { user: text, transport }),
    });
    answerEnded(view, final);
  };

  /** Show the conversation an earlier page recorded, and continue its unfinished answer. */
  const resumeRecorded = async (saved) => {
    for (const turn of saved.turns) {
      addTurn("user", turn.user);
      const { message, note } = addTurn("assistant", "");
      const view = new AnswerView(message, { note });
      view.restoreFinished(turn.text, turn.final);
      turns.push({ user: turn.user, view });
    }
    addTurn("user", saved.user);
    const { message, note } = addTurn("assistant", "");
    const view = new AnswerView(message, { note, status });
    view.restore(saved.text);
    turns.push({ user: saved.user, view });
    record.adopt(saved);
    setBusy(true);
    scrollToBottom();

    // Either transport can resume any stream; the one the answer used, when available.
    const transport = saved.transport === "websocket" && websocketAvailable ? "websocket" : "sse";
    const final = await client.resume({
      streamId: saved.streamId,
      lastEventId: saved.lastEventId,
      transport,
      onEvent: answerEvents(view, { user: saved.user, transport }),
    });
    answerEnded(view, final);
    return final;
  };

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      if (!client.busy) form.requestSubmit ? form.requestSubmit() : send();
    }
  });
  stopButton.addEventListener("click", () => {
    client.stop();
    prompt.focus();
  });
  newChatButton?.addEventListener("click", () => {
    client.stop();
    record?.clear();
    turns.length = 0;
    conversation.replaceChildren();
    status.textContent = "New chat.";
    prompt.focus();
  });

  let resumed = null;
  if (record) {
    // The page may be reloaded or closed at any moment: the latest progress is written then.
    win.addEventListener("pagehide", () => record.flush());
    doc.addEventListener("visibilitychange", () => {
      if (doc.visibilityState === "hidden") record.flush();
    });
    const saved = record.load();
    if (saved) resumed = resumeRecorded(saved);
  }

  return { client, turns, record, resumed };
}
