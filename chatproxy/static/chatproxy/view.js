/**
 * view.js: AnswerView renders one streaming answer into the page from the events of a chat:
 * its text, and the parts beside it (tool calls, reasoning, a refusal).
 * Model output only ever becomes text nodes, never HTML.
 */

import { ClientErrorCode, MESSAGES, ServerErrorCode } from "./errors.js";

// How an error's note looks (its data-kind): a stop the user asked for is no alarm, an expired
// stream is a notice (the part shown is good); every other error is one.
// A Map, so that a code such as "constructor" finds nothing.
const NOTE_KIND = new Map([
  [ClientErrorCode.CANCELLED, "quiet"],
  [ClientErrorCode.EXPIRED, "notice"],
]);

/**
 * Renders one streaming answer. Model output only ever becomes text nodes.
 *
 * `element` holds the answer text and carries `data-state` = streaming | reconnecting | done |
 * error (and `data-error-code` on error); `note`, if given, shows "Reconnecting…" or the error
 * message beside it; `status`, if given, gets one short line per state change (for aria-live).
 *
 * The other parts of an answer go into `element` too, each in its own box: `reasoning` events
 * into one `.chatproxy-reasoning` (a <details>, before the text), `refusal` events into one
 * `.chatproxy-refusal`, and each tool call (`tool_call` events: the first of a call has its
 * `id` and `name`, every one a piece of its JSON `arguments`) into a `.chatproxy-tool-call`
 * (`data-index`, `data-call-id`) showing the name and the arguments as they stream.
 * `toolCalls` lists them put together. A `reset` empties all of it.
 */
export class AnswerView {
  /**
   * @param {HTMLElement} element  holds the answer text
   * @param {object} [o]
   * @param {HTMLElement|null} [o.note]    beside the answer: "Reconnecting…" or the error message
   * @param {HTMLElement|null} [o.status]  a live region for one short line per state change
   * @param {function} [o.onChange]        called with each event the view rendered
   */
  constructor(element, { note = null, status = null, onChange = () => {} } = {}) {
    this.element = element;
    this.note = note;
    this.status = status;
    this.onChange = onChange;
    this.textNode = element.ownerDocument.createTextNode("");
    element.replaceChildren(this.textNode);
    this._clearParts();
    this.final = null;
    this._sawText = false;
    this._fallback = null; // the target the last fallback went to, if any
    this._waitingNoted = false;
    this.setState("streaming");
    this._setStatus("Waiting for the answer…");
  }

  /** The answer text so far. */
  get text() {
    return this.textNode.data;
  }

  /** The tool calls so far, by index: [{index, id, name, arguments}]. */
  get toolCalls() {
    return [...this._calls.entries()]
      .sort(([a], [b]) => a - b)
      .map(([index, call]) => ({ index, id: call.id, name: call.name.data, arguments: call.args.data }));
  }

  /** The reasoning text so far ("" if none). */
  get reasoning() {
    return this._reasoning?.text.data ?? "";
  }

  /** The refusal text so far ("" if none). */
  get refusal() {
    return this._refusal?.text.data ?? "";
  }

  /**
   * Show `text` received by an earlier page as this answer's beginning, and wait for the rest
   * (the stream is being resumed): state "reconnecting" until the next delta.
   */
  restore(text) {
    this.textNode.data = text;
    this._sawText = text.length > 0;
    this.setState("reconnecting");
    this._setNote("Reconnecting…", "quiet");
    this._setStatus("Resuming the answer…");
  }

  /**
   * Show a finished answer from an earlier page: `final` is {type: "done"} or
   * {type: "error", data: {code, message}}. The status line is left alone.
   */
  restoreFinished(text, final) {
    this.textNode.data = text;
    this._sawText = text.length > 0;
    const status = this.status;
    this.status = null;
    try {
      this.handle(final?.type === "error" ? final : { type: "done", data: {} });
    } finally {
      this.status = status;
    }
  }

  /** Set `data-state` (and `aria-busy`): streaming | reconnecting | done | error. */
  setState(state) {
    this.element.dataset.state = state;
    this.element.setAttribute("aria-busy", String(state === "streaming" || state === "reconnecting"));
  }

  /** Feed one event from a ChatProxyClient / streamChat callback. */
  handle(event) {
    const data = event.data ?? {};
    switch (event.type) {
      case "start":
        break;
      case "delta":
        if (typeof data.text !== "string" || data.choice) break; // other choices are not shown
        this._answering();
        this.textNode.appendData(data.text);
        break;
      case "tool_call":
        if (!Number.isInteger(data.index) || data.choice) break;
        this._answering();
        this._toolCall(data);
        break;
      case "reasoning":
      case "refusal":
        if (typeof data.text !== "string" || data.choice) break;
        this._answering();
        this._box(event.type).text.appendData(data.text);
        break;
      case "keepalive":
        if (!this._sawText && !this._waitingNoted && this.element.dataset.state === "streaming") {
          this._waitingNoted = true;
          this._setStatus("Still working on it…");
        }
        break;
      case "retry":
        if (typeof data.fallback === "string") this._fallback = data.fallback;
      // falls through
      case "resuming": {
        const note = event.type === "retry" && typeof data.fallback === "string"
          ? `Switching to ${data.fallback}…`
          : "Reconnecting…";
        this.setState("reconnecting");
        this._setNote(note, "quiet");
        this._setStatus(note);
        break;
      }
      case "reset":
        this.textNode.data = "";
        this.element.replaceChildren(this.textNode);
        this._clearParts();
        this._sawText = false;
        this.setState("streaming");
        this._setNote(null);
        this._setStatus("Starting the answer over…");
        break;
      case "done": {
        this.final = event;
        this.setState("done");
        delete this.element.dataset.errorCode;
        this._setNote(null);
        const attempts = Number(data.attempts);
        const by = this._fallback && typeof data.model === "string" ? `, answered by ${data.model}` : "";
        this._setStatus(attempts > 1 ? `Done (recovered after ${attempts} attempts${by}).` : "Done.");
        break;
      }
      case "error": {
        this.final = event;
        const code = typeof data.code === "string" ? data.code : ServerErrorCode.INTERNAL;
        const message =
          typeof data.message === "string" && data.message ? data.message : MESSAGES.server;
        this.setState("error");
        this.element.dataset.errorCode = code;
        this._setNote(message, NOTE_KIND.get(code) ?? "error");
        this._setStatus(message);
        break;
      }
      default:
        return;
    }
    this.onChange(event);
  }

  /** Output arrived: leave "reconnecting", and say that the answer is coming. */
  _answering() {
    if (this.element.dataset.state === "reconnecting") {
      this.setState("streaming");
      this._setNote(null);
    }
    if (!this._sawText) {
      this._sawText = true;
      this._setStatus("Answering…");
    }
  }

  _clearParts() {
    /** index -> {id, name: Text, args: Text, box} */
    this._calls = new Map();
    this._reasoning = null;
    this._refusal = null;
  }

  _toolCall(data) {
    const doc = this.element.ownerDocument;
    let call = this._calls.get(data.index);
    if (!call) {
      const box = doc.createElement("div");
      box.className = "chatproxy-tool-call";
      box.dataset.index = String(data.index);
      const name = doc.createElement("span");
      name.className = "chatproxy-tool-name";
      const nameText = doc.createTextNode("");
      name.appendChild(nameText);
      const args = doc.createElement("code");
      args.className = "chatproxy-tool-arguments";
      const argsText = doc.createTextNode("");
      args.appendChild(argsText);
      box.append(name, args);
      this.element.appendChild(box);
      call = { id: "", name: nameText, args: argsText, box };
      this._calls.set(data.index, call);
    }
    if (typeof data.id === "string" && data.id) {
      call.id = data.id;
      call.box.dataset.callId = data.id;
    }
    if (typeof data.name === "string") call.name.appendData(data.name);
    if (typeof data.arguments === "string") call.args.appendData(data.arguments);
  }

  /** The box of the reasoning or the refusal, made on first use: {box, text}. */
  _box(kind) {
    const key = kind === "reasoning" ? "_reasoning" : "_refusal";
    if (this[key]) return this[key];
    const doc = this.element.ownerDocument;
    const text = doc.createTextNode("");
    let box;
    if (kind === "reasoning") {
      box = doc.createElement("details");
      const summary = doc.createElement("summary");
      summary.appendChild(doc.createTextNode("Reasoning"));
      const body = doc.createElement("div");
      body.appendChild(text);
      box.append(summary, body);
      this.element.insertBefore(box, this.textNode); // thoughts come before the answer
    } else {
      box = doc.createElement("p");
      box.appendChild(text);
      this.element.appendChild(box);
    }
    box.className = `chatproxy-${kind}`;
    this[key] = { box, text };
    return this[key];
  }

  _setNote(text, kind = "quiet") {
    if (!this.note) return;
    this.note.textContent = text ?? "";
    this.note.hidden = !text;
    this.note.dataset.kind = kind;
  }

  _setStatus(text) {
    if (this.status) this.status.textContent = text;
  }
}
