/**
 * chatproxy.js: the browser side of chatproxy. A dependency-free ES module.
 *
 * Transports (both deliver the same events to one callback):
 *
 *   streamChat({url, messages, onEvent, signal, ...})   POST /chat/stream/, read as SSE over fetch
 *                                                     (EventSource cannot POST)
 *   new ChatProxySocket({url}).chat({...})            ws(s)://host/ws/chat/ (SPEC 6.4)
 *   new ChatProxyClient({...}).send({...})            either of the above, plus stop()
 *   new ChatProxyClient({...}).resume({streamId, lastEventId, ...})
 *                                                     reattach to a stream started earlier, e.g.
 *                                                     before a page reload (SPEC 6.2)
 *
 * The callback receives one object per event:
 *
 *   {type, data, seq, streamId}
 *
 *   type   a SPEC 6.1 event: "start" {stream_id, model, profile}, "delta" {text},
 *          "retry" {attempt, max_attempts, reason, delay}, "reset" {reason},
 *          "done" {finish_reason, attempts, usage}, "error" {code, message};
 *          or one of two client-side events: "keepalive" {} (the server is alive, nothing new)
 *          and "resuming" {attempt, max_attempts, reason} (the connection to chatproxy was lost
 *          and the client is reattaching to the stream, SPEC 6.2).
 *   seq    the event's sequence number (SSE `id:`, WebSocket `seq`), or null.
 *
 * Every call ends with exactly one "done" or "error" event, and its promise resolves to that
 * event; problems on the way (HTTP errors, a lost connection, the user's stop) become "error"
 * events rather than rejections. Client-side error codes, beside the server's: "network" (the
 * server could not be reached or the connection was lost for good), "expired" (a resume found the
 * stream gone: it ended more than RESUME.TTL ago, or is unknown), "http_error" (a non-JSON error
 * response, e.g. from a proxy; data.status holds the status) and "cancelled" (stopped here).
 *
 * Resuming: when the connection drops mid-answer, the client reattaches to the stream (GET
 * /chat/stream/<id>/ with Last-Event-ID, or a WebSocket `resume` frame). The first attempt follows
 * quickly (RESUME_FIRST_DELAY_MS), later ones back off, doubling up to the server's `retry:` advice
 * (at most MAX_RESUME_DELAY_MS); while the browser reports itself offline the client waits for it
 * to come back online instead. `maxResumes` consecutive attempts without progress end the answer.
 *
 * ResumeRecord keeps the unfinished answer (conversation, stream id, last event id) in
 * sessionStorage so that mountChat can continue it after a page reload.
 *
 * Rendering helpers (AnswerView, mountChat) write model output as text nodes only, never HTML.
 */

/** Events after which a stream is over. */
export const TERMINAL_EVENTS = Object.freeze(["done", "error"]);

const DEFAULT_STREAM_URL = "/chat/stream/";
const DEFAULT_WEBSOCKET_PATH = "/ws/chat/";
// No bytes at all (not even a keepalive, sent every KEEPALIVE s, 10 s by default) for this long
// means the connection is dead even if the browser has not noticed yet.
const DEFAULT_IDLE_TIMEOUT_MS = 60_000;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
// Consecutive resume attempts that bring nothing new before the answer is given up.
const DEFAULT_MAX_RESUMES = 4;
// The first resume follows a drop quickly: the server keeps generating for RESUME.GRACE seconds
// only. Later attempts wait twice as long each time, up to the server's `retry:` advice.
const RESUME_FIRST_DELAY_MS = 250;
const MAX_RESUME_DELAY_MS = 5_000;
// While the browser says it is offline, resuming waits for the `online` event, at most this long.
const MAX_OFFLINE_WAIT_MS = 60_000;

const MESSAGES = Object.freeze({
  cancelled: "Stopped.",
  unreachable: "Could not reach the chat service. Check your connection and try again.",
  lost: "The connection was interrupted and the answer could not be recovered. Please try again.",
  expired:
    "The rest of this answer is no longer available (the connection was away too long). " +
    "The part shown is what arrived; send your message again for a complete answer.",
  websocket: "The live connection could not be opened. Please try again, or switch to SSE.",
  unexpected: "The chat service sent an unexpected response. Please try again.",
  400: "The request was not accepted. Please check your message and try again.",
  401: "Please log in to chat.",
  403: "You are not allowed to chat here. Reload the page or log in, then try again.",
  404: "The chat service was not found at this address.",
  413: "Your message is too long. Please shorten it and try again.",
  429: "Too many requests at once. Please wait a moment and try again.",
  server: "The chat service is temporarily unavailable. Please try again in a moment.",
});

// --------------------------------------------------------------------------------------------
// SSE parser
// --------------------------------------------------------------------------------------------

/**
 * An incremental parser for the text/event-stream format (WHATWG HTML, "server-sent events").
 *
 * Feed it chunks as they arrive (strings, or bytes which it decodes as UTF-8 across chunk
 * boundaries); it calls
 *   onEvent({type, data, id})   for each complete event: type defaults to "message", data is the
 *                               data lines joined with "\n", id the last event ID seen so far;
 *   onComment(text)             for each comment line (": keepalive" gives "keepalive");
 *   onRetry(ms)                 for each valid `retry:` field.
 * Lines may end in CRLF, LF or CR, also when a CRLF is split between two chunks. An event cut off
 * by the end of the stream is discarded, as the standard requires.
 */
export class SSEParser {
  constructor({ onEvent = () => {}, onComment = () => {}, onRetry = () => {} } = {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.onRetry = onRetry;
    /** The last event ID buffer: kept across events, as the standard says. */
    this.lastEventId = "";
    /** The last valid `retry:` value in milliseconds, or null. */
    this.retry = null;
    this._buffer = "";
    this._eventType = "";
    this._dataLines = [];
    this._decoder = null;
    this._atStart = true;
    this._skipLineFeed = false;
  }

  /** Parse the next chunk: a string, or a Uint8Array / ArrayBuffer of UTF-8. */
  feed(chunk) {
    let text;
    if (typeof chunk === "string") {
      text = chunk;
    } else {
      this._decoder ??= new TextDecoder("utf-8");
      text = this._decoder.decode(chunk, { stream: true });
    }
    if (text.length === 0) return;
    if (this._atStart) {
      this._atStart = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this._skipLineFeed && text.length > 0) {
      // The previous chunk ended in CR: a leading LF here is the rest of that CRLF.
      if (text[0] === "\n") text = text.slice(1);
      this._skipLineFeed = false;
    }
    const buffer = this._buffer + text;
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(buffer)) !== null) {
      const next = match.index + match[0].length;
      if (match[0] === "\r" && next === buffer.length) this._skipLineFeed = true;
      this._processLine(buffer.slice(start, match.index));
      start = next;
    }
    this._buffer = buffer.slice(start);
  }

  /** The stream ended: drop any incomplete line or event. */
  end() {
    this._decoder = null;
    this._buffer = "";
    this._eventType = "";
    this._dataLines = [];
    this._skipLineFeed = false;
  }

  _processLine(line) {
    if (line === "") {
      this._dispatch();
      return;
    }
    if (line[0] === ":") {
      this.onComment(line.slice(line[1] === " " ? 2 : 1));
      return;
    }
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + (line[colon + 1] === " " ? 2 : 1));
    }
    switch (field) {
      case "event":
        this._eventType = value;
        break;
      case "data":
        this._dataLines.push(value);
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) {
          this.retry = Number.parseInt(value, 10);
          this.onRetry(this.retry);
        }
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  _dispatch() {
    const type = this._eventType || "message";
    const dataLines = this._dataLines;
    this._eventType = "";
    this._dataLines = [];
    if (dataLines.length === 0) return;
    this.onEvent({ type, data: dataLines.join("\n"), id: this.lastEventId });
  }
}

// --------------------------------------------------------------------------------------------
// Small helpers
// --------------------------------------------------------------------------------------------

/** The value of cookie `name`, or null. */
export function getCookie(name, cookieString = globalThis.document?.cookie ?? "") {
  for (const part of cookieString.split(";")) {
    const eq = part.indexOf("=");
    if (eq === -1) continue;
    if (part.slice(0, eq).trim() === name) {
      try {
        return decodeURIComponent(part.slice(eq + 1).trim());
      } catch {
        return part.slice(eq + 1).trim();
      }
    }
  }
  return null;
}

/** The ws:// or wss:// URL of `path` on the page's own host. */
export function websocketUrl(path = DEFAULT_WEBSOCKET_PATH, location = globalThis.location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

function newRequestId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `r${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
}

function parseSeq(value) {
  if (typeof value === "number" && Number.isInteger(value)) return value;
  if (typeof value === "string" && /^[0-9]+$/.test(value)) return Number.parseInt(value, 10);
  return null;
}

function isTerminal(type) {
  return type === "done" || type === "error";
}

function friendlyHttpMessage(status) {
  if (MESSAGES[status]) return MESSAGES[status];
  if (status === 405) return MESSAGES[404];
  return status >= 500 ? MESSAGES.server : MESSAGES.unexpected;
}

function errorEvent(code, message, extra = {}) {
  return { type: "error", data: { code, message, ...extra }, seq: null, streamId: null };
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Whether the browser reports having no network (navigator.onLine is false). */
function browserOffline() {
  return globalThis.navigator?.onLine === false;
}

/** Resolves on the `online` event, on abort, or after `maxMs`. */
function waitForOnline(signal, maxMs = MAX_OFFLINE_WAIT_MS) {
  return new Promise((resolve) => {
    if (signal?.aborted || typeof globalThis.addEventListener !== "function") return resolve();
    const timer = setTimeout(done, maxMs);
    function done() {
      clearTimeout(timer);
      globalThis.removeEventListener("online", done);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    globalThis.addEventListener("online", done, { once: true });
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** The wait before resume attempt `attempt` (1, 2, ...): doubling, capped by the server's advice. */
export function resumeDelayMs(attempt, retryMs = null) {
  const cap = Math.min(retryMs ?? MAX_RESUME_DELAY_MS, MAX_RESUME_DELAY_MS);
  return Math.max(0, Math.min(RESUME_FIRST_DELAY_MS * 2 ** Math.max(0, attempt - 1), cap));
}

/**
 * Wait before a resume attempt: resumeDelayMs(), and while the browser is offline, until it is
 * back online (an attempt then follows at once).
 */
async function waitToResume(attempt, retryMs, signal) {
  if (!browserOffline()) await sleep(resumeDelayMs(attempt, retryMs), signal);
  if (browserOffline()) await waitForOnline(signal);
}

/** The JSON body of a chat request: SPEC 6.1 fields only, unset ones left out. */
function chatBody({ messages, model, options }) {
  const body = { messages };
  if (model) body.model = model;
  for (const key of ["temperature", "max_tokens", "seed"]) {
    if (options?.[key] !== undefined && options[key] !== null) body[key] = options[key];
  }
  return body;
}

/**
 * Tracks one stream's progress and funnels its events to the caller's callback: remembers the
 * stream id and the last sequence number (for resuming), drops events replayed twice and
 * everything after the terminal event.
 */
class StreamProgress {
  constructor(onEvent, { streamId = null, lastSeq = null } = {}) {
    this.onEvent = onEvent;
    this.streamId = streamId;
    this.lastSeq = lastSeq;
    this.final = null;
  }

  get finished() {
    return this.final !== null;
  }

  /** Deliver one event; returns true if it was terminal. */
  emit(type, data, seq = null) {
    if (this.finished) return true;
    if (seq !== null && this.lastSeq !== null && seq <= this.lastSeq) return false; // a replay
    if (type === "start" && typeof data?.stream_id === "string") this.streamId = data.stream_id;
    if (seq !== null) this.lastSeq = seq;
    const event = { type, data: data ?? {}, seq, streamId: this.streamId };
    if (isTerminal(type)) this.final = event;
    this.onEvent(event);
    return isTerminal(type);
  }

  fail(code, message, extra) {
    const { data } = errorEvent(code, message, extra);
    this.emit("error", data);
    return this.final;
  }
}

// --------------------------------------------------------------------------------------------
// SSE transport: POST /chat/stream/ (SPEC 6.1), resume with GET /chat/stream/<id>/ (SPEC 6.2)
// --------------------------------------------------------------------------------------------

/**
 * Stream one answer over HTTP.
 *
 * @param {object} o
 * @param {Array<{role: string, content: string}>} o.messages  the conversation, newest last
 * @param {string} [o.url]          the stream endpoint, default "/chat/stream/"
 * @param {string} [o.model]        a model name; the server's default when left out
 * @param {object} [o.options]      {temperature, max_tokens, seed}
 * @param {AbortSignal} [o.signal]  aborting stops the stream ("error" event, code "cancelled")
 * @param {function} o.onEvent      receives {type, data, seq, streamId}; see the module docstring
 * @param {string} [o.csrfToken]    default: the `csrftoken` cookie
 * @param {boolean} [o.resume]      reattach to the stream when the connection drops (default true)
 * @param {number} [o.maxResumes]   consecutive resume attempts without progress; default 4
 * @param {{streamId: string, lastEventId: number}} [o.resumeFrom]  do not POST: reattach to this
 *                                  stream and deliver the events after lastEventId (a page reload)
 * @param {number} [o.idleTimeoutMs] silence after which the connection counts as lost
 * @param {function} [o.fetch]      a fetch implementation (tests)
 * @returns {Promise<object>} the terminal "done" or "error" event
 */
export async function streamChat({
  messages,
  url = DEFAULT_STREAM_URL,
  model,
  options,
  signal,
  onEvent = () => {},
  csrfToken,
  resume = true,
  maxResumes = DEFAULT_MAX_RESUMES,
  resumeFrom = null,
  idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS,
  fetch: fetchImpl = globalThis.fetch?.bind(globalThis),
  progress = new StreamProgress(onEvent),
}) {
  const base = url.endsWith("/") ? url : `${url}/`;
  const token = () => csrfToken ?? getCookie("csrftoken");
  // connected: a stream response arrived; retryMs: the server's `retry:` advice.
  const ctx = { fetchImpl, signal, idleTimeoutMs, progress, connected: false, retryMs: null };
  const streamUrl = () => `${base}${encodeURIComponent(progress.streamId)}/`;
  const reattach = () => {
    const headers = { Accept: "text/event-stream" };
    if (progress.lastSeq !== null) headers["Last-Event-ID"] = String(progress.lastSeq);
    return readEventStream(ctx, streamUrl(), { method: "GET", headers, resuming: true });
  };

  let outcome;
  if (resumeFrom) {
    progress.streamId ??= resumeFrom.streamId;
    progress.lastSeq ??= parseSeq(resumeFrom.lastEventId);
    ctx.connected = true; // the stream was received before: losing it now means "lost"
    outcome = await reattach();
  } else {
    outcome = await readEventStream(ctx, url, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        ...(token() ? { "X-CSRFToken": token() } : {}),
      },
      body: JSON.stringify(chatBody({ messages, model, options })),
    });
  }

  let failures = 0; // consecutive resume attempts that brought no new event
  let seqAtAttempt = progress.lastSeq;
  while (outcome === "lost" && !signal?.aborted) {
    if (progress.lastSeq !== seqAtAttempt) failures = 0;
    if (!resume || progress.streamId === null || failures >= maxResumes) {
      return progress.fail("network", ctx.connected ? MESSAGES.lost : MESSAGES.unreachable);
    }
    failures += 1;
    progress.onEvent({
      type: "resuming",
      data: { attempt: failures, max_attempts: maxResumes, reason: "connection_lost" },
      seq: null,
      streamId: progress.streamId,
    });
    await waitToResume(failures, ctx.retryMs, signal);
    if (signal?.aborted) break;
    seqAtAttempt = progress.lastSeq;
    outcome = await reattach();
  }

  if (signal?.aborted && !progress.finished) {
    if (progress.streamId !== null) {
      // A resumable stream outlives its connection for a grace period: say we are done with it.
      cancelStream(fetchImpl, `${streamUrl()}cancel/`, token());
    }
    return progress.fail("cancelled", MESSAGES.cancelled);
  }
  return progress.final;
}

function cancelStream(fetchImpl, url, csrfToken) {
  try {
    fetchImpl(url, {
      method: "POST",
      credentials: "same-origin",
      headers: csrfToken ? { "X-CSRFToken": csrfToken } : {},
      keepalive: true,
    }).catch(() => {});
  } catch {
    // Best effort: the server also stops once its grace period ends.
  }
}

/**
 * One HTTP request whose answer is an event stream. Returns "terminal" (a done/error event was
 * delivered), "lost" (the connection ended early or went silent) or "aborted" (the caller's signal).
 */
async function readEventStream(ctx, url, { method, headers, body, resuming = false }) {
  const { progress, signal } = ctx;
  if (signal?.aborted) return "aborted";
  const controller = new AbortController();
  const abort = () => controller.abort();
  signal?.addEventListener("abort", abort, { once: true });
  let idle = false;
  let idleTimer = null;
  const touch = () => {
    if (!ctx.idleTimeoutMs) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      idle = true;
      controller.abort();
    }, ctx.idleTimeoutMs);
  };

  try {
    touch();
    let response;
    try {
      response = await ctx.fetchImpl(url, {
        method,
        headers,
        body,
        credentials: "same-origin",
        cache: "no-store",
        signal: controller.signal,
      });
    } catch {
      if (signal?.aborted) return "aborted";
      if (resuming || idle) return "lost";
      progress.fail("network", MESSAGES.unreachable);
      return "terminal";
    }

    if (!response.ok) {
      if (resuming && response.status >= 500) return "lost";
      await failFromResponse(progress, response, resuming);
      return "terminal";
    }
    const contentType = response.headers.get("content-type") ?? "";
    if (!contentType.includes("text/event-stream") || !response.body) {
      progress.fail("http_error", MESSAGES.unexpected, { status: response.status });
      return "terminal";
    }
    ctx.connected = true;

    const parser = new SSEParser({
      onEvent: ({ type, data, id }) => {
        let payload;
        try {
          payload = JSON.parse(data);
        } catch {
          return; // not one of chatproxy's events
        }
        progress.emit(type, payload, parseSeq(id));
      },
      onComment: (text) => {
        if (text.trim() === "keepalive") {
          progress.onEvent({ type: "keepalive", data: {}, seq: null, streamId: progress.streamId });
        }
      },
      onRetry: (ms) => {
        ctx.retryMs = ms;
      },
    });
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        touch();
        parser.feed(value);
        if (progress.finished) {
          reader.cancel().catch(() => {});
          return "terminal";
        }
      }
    } catch {
      if (signal?.aborted) return "aborted";
      return "lost";
    } finally {
      parser.end();
    }
    return progress.finished ? "terminal" : "lost";
  } finally {
    clearTimeout(idleTimer);
    signal?.removeEventListener("abort", abort);
  }
}

async function failFromResponse(progress, response, resuming) {
  let code = null;
  let message = null;
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error !== null) {
      code = typeof body.error.code === "string" ? body.error.code : null;
      message = typeof body.error.message === "string" ? body.error.message : null;
    }
  } catch {
    // Not chatproxy's JSON (a proxy's error page, say): use a message of our own.
  }
  if (resuming && response.status === 404) {
    // The stream is gone (ended more than RESUME.TTL ago, or unknown): keep what was received.
    progress.fail("expired", MESSAGES.expired, { status: response.status });
  } else if (resuming) {
    // Not allowed any more (logged out?), or resuming is off: the answer cannot be finished.
    progress.fail("network", MESSAGES.lost, { status: response.status });
  } else if (code !== null && message !== null) {
    progress.fail(code, message, { status: response.status });
  } else {
    progress.fail("http_error", friendlyHttpMessage(response.status), { status: response.status });
  }
}

// --------------------------------------------------------------------------------------------
// WebSocket transport (SPEC 6.4)
// --------------------------------------------------------------------------------------------

const WS_OPEN = 1;

/**
 * One WebSocket to chatproxy, opened on first use and shared by any number of concurrent chats.
 * If the socket drops mid-answer it reconnects and sends a `resume` frame for each stream.
 */
export class ChatProxySocket {
  /**
   * @param {object} [o]
   * @param {string} [o.url]  default: ws(s)://<this host>/ws/chat/
   * @param {function} [o.WebSocket]  a WebSocket constructor (tests)
   * @param {function} [o.cancelOverHttp]  (streamId) => void: stops a stream when the user stops
   *                   it while the socket is down (waiting to resume), so no cancel frame can go
   */
  constructor({
    url,
    WebSocket: WebSocketImpl = globalThis.WebSocket,
    connectTimeoutMs = DEFAULT_CONNECT_TIMEOUT_MS,
    idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS,
    maxResumes = DEFAULT_MAX_RESUMES,
    cancelOverHttp = null,
  } = {}) {
    this.url = url ?? websocketUrl();
    this.cancelOverHttp = cancelOverHttp;
    this.WebSocketImpl = WebSocketImpl;
    this.connectTimeoutMs = connectTimeoutMs;
    this.idleTimeoutMs = idleTimeoutMs;
    this.maxResumes = maxResumes;
    this._socket = null;
    this._opening = null;
    this._requests = new Map(); // request_id -> chat state
    this._idleTimer = null;
  }

  /** Whether this browser can use WebSockets at all. */
  get supported() {
    return typeof this.WebSocketImpl === "function";
  }

  /**
   * Stream one answer; same arguments and result as streamChat() (url/fetch/csrf aside).
   * With `resumeFrom` ({streamId, lastEventId}) no chat frame is sent: a `resume` frame reattaches
   * to that stream (after a page reload, say).
   */
  chat({
    messages,
    model,
    options,
    signal,
    onEvent = () => {},
    resumeFrom = null,
    progress = new StreamProgress(onEvent),
  }) {
    return new Promise((resolve) => {
      const requestId = newRequestId();
      if (resumeFrom) {
        progress.streamId ??= resumeFrom.streamId;
        progress.lastSeq ??= parseSeq(resumeFrom.lastEventId);
      }
      const chat = {
        requestId,
        progress,
        resolve,
        resumes: 0, // consecutive resume attempts without a new event
        seqAtResume: progress.lastSeq,
        signal,
        onAbort: null,
        awaitingResume: false,
      };
      const finish = () => {
        this._requests.delete(requestId);
        signal?.removeEventListener("abort", chat.onAbort);
        this._watchIdle();
        resolve(progress.final);
      };
      chat.finish = finish;
      chat.onAbort = () => {
        if (progress.finished) return;
        const sent = this._send({ type: "cancel", request_id: requestId });
        // The socket is down: the stream waits RESUME.GRACE for a resume unless told otherwise.
        if (!sent && progress.streamId !== null) this.cancelOverHttp?.(progress.streamId);
        progress.fail("cancelled", MESSAGES.cancelled);
        finish();
      };
      if (signal?.aborted) {
        progress.fail("cancelled", MESSAGES.cancelled);
        resolve(progress.final);
        return;
      }
      signal?.addEventListener("abort", chat.onAbort, { once: true });
      this._requests.set(requestId, chat);

      const frame = resumeFrom
        ? null
        : { type: "chat", request_id: requestId, ...chatBody({ messages, model, options }) };
      this._connect().then(
        () => {
          if (progress.finished) return;
          if (!(frame ? this._send(frame) : this._sendResume(chat))) this._lost(chat);
          this._watchIdle();
        },
        () => {
          if (progress.finished) return;
          if (!frame) {
            this._lost(chat); // reattaching: try again like after a drop
            return;
          }
          progress.fail("network", MESSAGES.websocket);
          finish();
        },
      );
    });
  }

  /** Close the socket; unfinished chats end with a "cancelled" error. */
  close() {
    for (const chat of [...this._requests.values()]) chat.onAbort();
    const socket = this._socket;
    this._socket = null;
    clearTimeout(this._idleTimer);
    if (socket) {
      socket.onclose = null;
      socket.close(1000);
    }
  }

  _connect() {
    if (this._socket && this._socket.readyState === WS_OPEN) return Promise.resolve(this._socket);
    if (this._opening) return this._opening;
    if (!this.supported) return Promise.reject(new Error("WebSocket is not available"));
    this._opening = new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new this.WebSocketImpl(this.url);
      } catch (error) {
        this._opening = null;
        reject(error);
        return;
      }
      const timer = setTimeout(() => {
        socket.onclose = null;
        try {
          socket.close();
        } catch {
          // already closing
        }
        this._opening = null;
        reject(new Error("WebSocket connect timeout"));
      }, this.connectTimeoutMs);
      socket.onopen = () => {
        clearTimeout(timer);
        this._opening = null;
        this._socket = socket;
        socket.onerror = null; // an error on an open socket is followed by `close`
        socket.onmessage = (message) => this._onMessage(message);
        socket.onclose = () => this._onClose(socket);
        resolve(socket);
      };
      // A refused handshake reports `error` then `close` (some implementations only `error`).
      const refused = () => {
        clearTimeout(timer);
        socket.onerror = null;
        socket.onclose = null;
        this._opening = null;
        reject(new Error("WebSocket closed before it opened"));
      };
      socket.onerror = refused;
      socket.onclose = refused;
    });
    return this._opening;
  }

  _send(frame) {
    const socket = this._socket;
    if (!socket || socket.readyState !== WS_OPEN) return false;
    try {
      socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _onMessage(message) {
    this._watchIdle();
    let frame;
    try {
      frame = JSON.parse(typeof message.data === "string" ? message.data : "");
    } catch {
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    if (frame.type === "keepalive") {
      for (const chat of this._requests.values()) {
        chat.progress.onEvent({
          type: "keepalive",
          data: {},
          seq: null,
          streamId: chat.progress.streamId,
        });
      }
      return;
    }
    const chat = this._route(frame);
    if (!chat) return; // a finished or cancelled chat's late frames
    // The same data as over SSE: the envelope's ids live on the event object, not in data.
    const { type, request_id: _requestId, stream_id: streamId, seq, ...data } = frame;
    if (type === "start" && typeof streamId === "string") data.stream_id = streamId;
    if (chat.awaitingResume) {
      chat.awaitingResume = false;
      if (type === "error" && data.code === "not_found") {
        // The stream ended more than RESUME.TTL ago, or is unknown: keep what was received.
        chat.progress.fail("expired", MESSAGES.expired);
        chat.finish();
        return;
      }
      if (type === "error" && data.code === "bad_request") {
        // The server refused the resume frame (no resume support).
        chat.progress.fail("network", MESSAGES.lost);
        chat.finish();
        return;
      }
    }
    if (chat.progress.emit(type, data, parseSeq(seq))) chat.finish();
  }

  _route(frame) {
    if (typeof frame.request_id === "string") return this._requests.get(frame.request_id) ?? null;
    // Frames of a resumed stream may name only the stream.
    if (typeof frame.stream_id === "string") {
      for (const chat of this._requests.values()) {
        if (chat.progress.streamId === frame.stream_id) return chat;
      }
      return null;
    }
    // An error naming nothing answers a frame the server could not read: if only one chat is
    // still waiting for its start, it is the one.
    if (frame.type === "error") {
      const waiting = [...this._requests.values()].filter((c) => c.progress.streamId === null);
      if (waiting.length === 1) return waiting[0];
    }
    return null;
  }

  _onClose(socket) {
    if (this._socket !== socket) return;
    this._socket = null;
    socket.onmessage = null;
    clearTimeout(this._idleTimer);
    for (const chat of [...this._requests.values()]) this._lost(chat);
  }

  /** The socket carrying `chat` went away: resume the stream on a new socket, or give up. */
  _lost(chat) {
    const { progress } = chat;
    if (progress.finished) return;
    if (progress.lastSeq !== chat.seqAtResume) chat.resumes = 0; // the last connection brought news
    if (progress.streamId === null || chat.resumes >= this.maxResumes) {
      progress.fail("network", progress.streamId === null ? MESSAGES.websocket : MESSAGES.lost);
      chat.finish();
      return;
    }
    chat.resumes += 1;
    progress.onEvent({
      type: "resuming",
      data: { attempt: chat.resumes, max_attempts: this.maxResumes, reason: "connection_lost" },
      seq: null,
      streamId: progress.streamId,
    });
    waitToResume(chat.resumes, null, chat.signal)
      .then(() => (progress.finished ? null : this._connect()))
      .then(
        () => {
          if (progress.finished) return;
          if (!this._sendResume(chat)) this._lost(chat);
          this._watchIdle();
        },
        () => this._lost(chat),
      );
  }

  /** Ask for `chat`'s stream from after its last event; false if the socket is not open. */
  _sendResume(chat) {
    const { progress } = chat;
    chat.seqAtResume = progress.lastSeq;
    // request_id (beyond SPEC 6.4's fields) lets the server address the stream's frames to this chat.
    const sent = this._send({
      type: "resume",
      request_id: chat.requestId,
      stream_id: progress.streamId,
      last_event_id: progress.lastSeq ?? 0,
    });
    chat.awaitingResume = sent;
    return sent;
  }

  /** While chats are open, a socket silent for idleTimeoutMs is closed (and its chats resumed). */
  _watchIdle() {
    clearTimeout(this._idleTimer);
    if (!this.idleTimeoutMs || this._requests.size === 0 || !this._socket) return;
    const socket = this._socket;
    this._idleTimer = setTimeout(() => {
      if (this._socket !== socket) return;
      try {
        socket.close(4000);
      } catch {
        // already closing
      }
      this._onClose(socket);
    }, this.idleTimeoutMs);
  }
}

// --------------------------------------------------------------------------------------------
// Client facade
// --------------------------------------------------------------------------------------------

/**
 * One conversation's connection to chatproxy over SSE or WebSocket, one answer at a time.
 *
 *   const client = new ChatProxyClient({transport: "sse"});
 *   const final = await client.send({messages, onEvent});
 *   client.stop();  // from a Stop button
 *   // after a page reload, with what the earlier page recorded:
 *   await client.resume({streamId, lastEventId, transport, onEvent});
 *
 * After (or during) a stream, `streamId` and `lastEventId` say where it stands (for resuming).
 */
export class ChatProxyClient {
  constructor({
    streamUrl = DEFAULT_STREAM_URL,
    websocketUrl: wsUrl,
    transport = "sse",
    csrfToken,
    fetch: fetchImpl,
    WebSocket: WebSocketImpl,
    idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS,
    maxResumes = DEFAULT_MAX_RESUMES,
  } = {}) {
    this.streamUrl = streamUrl;
    this.websocketUrl = wsUrl;
    this.transport = transport;
    this.csrfToken = csrfToken;
    this.fetch = fetchImpl;
    this.WebSocket = WebSocketImpl;
    this.idleTimeoutMs = idleTimeoutMs;
    this.maxResumes = maxResumes;
    /** The current (or last) stream's id, from its "start" event. */
    this.streamId = null;
    /** The sequence number of the last event received from the current (or last) stream. */
    this.lastEventId = null;
    this._controller = null;
    this._socket = null;
  }

  /** Whether an answer is streaming now. */
  get busy() {
    return this._controller !== null;
  }

  /**
   * Stream one answer. Stops the previous one if it is still running.
   * @returns {Promise<object>} the terminal "done" or "error" event
   */
  send({ messages, model, options, onEvent = () => {}, transport = this.transport }) {
    return this._run({ messages, model, options, onEvent, transport, resumeFrom: null });
  }

  /**
   * Continue a stream started earlier (by a previous page, say): deliver its events after
   * `lastEventId`, then live ones until it ends. Ends with an "expired" error if the server no
   * longer has it. Stops the current answer if one is running.
   * @returns {Promise<object>} the terminal "done" or "error" event
   */
  resume({ streamId, lastEventId, onEvent = () => {}, transport = this.transport }) {
    return this._run({ onEvent, transport, resumeFrom: { streamId, lastEventId } });
  }

  async _run({ messages, model, options, onEvent, transport, resumeFrom }) {
    this.stop();
    const controller = new AbortController();
    this._controller = controller;
    this.streamId = resumeFrom?.streamId ?? null;
    this.lastEventId = resumeFrom ? parseSeq(resumeFrom.lastEventId) : null;
    const progress = new StreamProgress(
      (event) => {
        if (event.streamId !== null) this.streamId = event.streamId;
        if (event.seq !== null) this.lastEventId = event.seq;
        onEvent(event);
      },
      { streamId: this.streamId, lastSeq: this.lastEventId },
    );
    const common = { messages, model, options, signal: controller.signal, progress, resumeFrom };
    try {
      if (transport === "websocket") {
        this._socket ??= new ChatProxySocket({
          url: this.websocketUrl,
          WebSocket: this.WebSocket,
          idleTimeoutMs: this.idleTimeoutMs,
          maxResumes: this.maxResumes,
          cancelOverHttp: (streamId) => {
            const base = this.streamUrl.endsWith("/") ? this.streamUrl : `${this.streamUrl}/`;
            const token = typeof this.csrfToken === "function" ? this.csrfToken() : this.csrfToken;
            cancelStream(
              this.fetch ?? globalThis.fetch?.bind(globalThis),
              `${base}${encodeURIComponent(streamId)}/cancel/`,
              token ?? getCookie("csrftoken"),
            );
          },
        });
        return await this._socket.chat(common);
      }
      return await streamChat({
        ...common,
        url: this.streamUrl,
        csrfToken: typeof this.csrfToken === "function" ? this.csrfToken() : this.csrfToken,
        fetch: this.fetch,
        idleTimeoutMs: this.idleTimeoutMs,
        maxResumes: this.maxResumes,
      });
    } finally {
      if (this._controller === controller) this._controller = null;
    }
  }

  /** Stop the current answer, if any; its promise resolves with a "cancelled" error. */
  stop() {
    this._controller?.abort();
    this._controller = null;
  }

  /** Stop, and close the WebSocket if one is open. */
  close() {
    this.stop();
    this._socket?.close();
    this._socket = null;
  }
}

// --------------------------------------------------------------------------------------------
// Rendering
// --------------------------------------------------------------------------------------------

/**
 * Renders one streaming answer. Model output only ever becomes text nodes.
 *
 * `element` holds the answer text and carries `data-state` = streaming | reconnecting | done |
 * error (and `data-error-code` on error); `note`, if given, shows "Reconnecting…" or the error
 * message beside it; `status`, if given, gets one short line per state change (for aria-live).
 */
export class AnswerView {
  constructor(element, { note = null, status = null, onChange = () => {} } = {}) {
    this.element = element;
    this.note = note;
    this.status = status;
    this.onChange = onChange;
    this.textNode = element.ownerDocument.createTextNode("");
    element.replaceChildren(this.textNode);
    this.final = null;
    this._sawText = false;
    this._waitingNoted = false;
    this.setState("streaming");
    this._setStatus("Waiting for the answer…");
  }

  /** The answer text so far. */
  get text() {
    return this.textNode.data;
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
        if (typeof data.text !== "string") break;
        if (this.element.dataset.state === "reconnecting") {
          this.setState("streaming");
          this._setNote(null);
        }
        if (!this._sawText) {
          this._sawText = true;
          this._setStatus("Answering…");
        }
        this.textNode.appendData(data.text);
        break;
      case "keepalive":
        if (!this._sawText && !this._waitingNoted && this.element.dataset.state === "streaming") {
          this._waitingNoted = true;
          this._setStatus("Still working on it…");
        }
        break;
      case "retry":
      case "resuming":
        this.setState("reconnecting");
        this._setNote("Reconnecting…", "quiet");
        this._setStatus("Reconnecting…");
        break;
      case "reset":
        this.textNode.data = "";
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
        this._setStatus(attempts > 1 ? `Done (recovered after ${attempts} attempts).` : "Done.");
        break;
      }
      case "error": {
        this.final = event;
        const code = typeof data.code === "string" ? data.code : "internal";
        const message =
          typeof data.message === "string" && data.message ? data.message : MESSAGES.server;
        this.setState("error");
        this.element.dataset.errorCode = code;
        this._setNote(message, code === "cancelled" ? "quiet" : code === "expired" ? "notice" : "error");
        this._setStatus(message);
        break;
      }
      default:
        return;
    }
    this.onChange(event);
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

// --------------------------------------------------------------------------------------------
// Surviving a page reload
// --------------------------------------------------------------------------------------------

const RESUME_STORAGE_KEY = "chatproxy.resume";
const RESUME_WRITE_INTERVAL_MS = 250;
const RECORD_VERSION = 1;
const TRANSPORTS = Object.freeze(["sse", "websocket"]);

function sessionStore() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // storage disabled (sandboxed iframe, privacy settings)
  }
}

function isRecordedFinal(final) {
  if (final?.type === "done") return true;
  return (
    final?.type === "error" &&
    typeof final.data?.code === "string" &&
    typeof final.data?.message === "string"
  );
}

/** A finished answer's terminal event, reduced to what restoring it needs. */
export function recordedFinal(event) {
  if (event?.type !== "error") return { type: "done", data: {} };
  const data = event.data ?? {};
  return {
    type: "error",
    data: {
      code: typeof data.code === "string" ? data.code : "internal",
      message: typeof data.message === "string" ? data.message : "",
    },
  };
}

/**
 * The tab's unfinished answer, kept in sessionStorage (per tab; it survives a reload, not the
 * tab) so that the page can continue the answer after a reload (SPEC 6.2). Two entries:
 *
 *   <key>           {v, transport, streamId, user, turns: [{user, text, final}]}: the conversation
 *                   before this answer, and its question; written once, when its stream starts.
 *   <key>.progress  {streamId, lastEventId, text}: the answer so far and the id of the last event
 *                   it includes. update() writes it at most every `intervalMs`; flush() at once
 *                   (call it on `pagehide`). Each write is self-consistent: resuming after
 *                   lastEventId continues `text` with no gap and no repeat, however stale it is.
 *
 * Storage errors (disabled, full) are swallowed: the page then just does not survive a reload.
 */
export class ResumeRecord {
  constructor({
    storage = sessionStore(),
    key = RESUME_STORAGE_KEY,
    intervalMs = RESUME_WRITE_INTERVAL_MS,
    setTimer = (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimer = (timer) => globalThis.clearTimeout(timer),
  } = {}) {
    this.storage = storage;
    this.key = key;
    this.progressKey = `${key}.progress`;
    this.intervalMs = intervalMs;
    this._setTimer = setTimer;
    this._clearTimer = clearTimer;
    /** The stream being recorded, or null. */
    this.streamId = null;
    this._pending = null;
    this._timer = null;
  }

  /**
   * The recorded unfinished answer, or null: {transport, streamId, lastEventId, user, text,
   * turns}. A malformed record is removed.
   */
  load() {
    const head = this._read(this.key);
    const progress = this._read(this.progressKey);
    if (head === null && progress === null) return null;
    const valid =
      head?.v === RECORD_VERSION &&
      TRANSPORTS.includes(head.transport) &&
      typeof head.streamId === "string" &&
      /^[A-Za-z0-9]{1,64}$/.test(head.streamId) &&
      typeof head.user === "string" &&
      Array.isArray(head.turns) &&
      head.turns.every(
        (t) => typeof t?.user === "string" && typeof t.text === "string" && isRecordedFinal(t.final),
      ) &&
      progress?.streamId === head.streamId &&
      Number.isInteger(progress.lastEventId) &&
      progress.lastEventId >= 0 &&
      typeof progress.text === "string";
    if (!valid) {
      this.clear();
      return null;
    }
    return {
      transport: head.transport,
      streamId: head.streamId,
      lastEventId: progress.lastEventId,
      user: head.user,
      text: progress.text,
      turns: head.turns.map((t) => ({ user: t.user, text: t.text, final: t.final })),
    };
  }

  /** Record a new answer whose stream just started (its "start" event). Written at once. */
  start({ transport, streamId, lastEventId = 0, user, text = "", turns = [] }) {
    this._cancelTimer();
    this._pending = null;
    this.streamId = streamId;
    const head = {
      v: RECORD_VERSION,
      transport: TRANSPORTS.includes(transport) ? transport : "sse",
      streamId,
      user,
      turns: turns.map((t) => ({ user: t.user, text: t.text, final: recordedFinal(t.final) })),
    };
    this._write(this.key, head);
    this._write(this.progressKey, { streamId, lastEventId, text });
  }

  /** Go on recording a stream found by load() (the page was reloaded). */
  adopt({ streamId }) {
    this._cancelTimer();
    this._pending = null;
    this.streamId = streamId;
  }

  /** The answer reached event `lastEventId` with `text` shown: written within `intervalMs`. */
  update({ lastEventId, text }) {
    if (this.streamId === null) return;
    this._pending = { streamId: this.streamId, lastEventId, text };
    if (this._timer === null) {
      this._timer = this._setTimer(() => {
        this._timer = null;
        this.flush();
      }, this.intervalMs);
    }
  }

  /** Write the latest update() now (the page is going away). */
  flush() {
    this._cancelTimer();
    if (this._pending === null) return;
    const pending = this._pending;
    this._pending = null;
    this._write(this.progressKey, pending);
  }

  /** Forget the record (the answer ended): of stream `streamId` only, if given. */
  clear(streamId = null) {
    if (streamId !== null && this.streamId !== null && streamId !== this.streamId) return;
    this._cancelTimer();
    this._pending = null;
    this.streamId = null;
    try {
      this.storage?.removeItem(this.key);
      this.storage?.removeItem(this.progressKey);
    } catch {
      // storage disabled
    }
  }

  _cancelTimer() {
    if (this._timer !== null) this._clearTimer(this._timer);
    this._timer = null;
  }

  _read(key) {
    try {
      const raw = this.storage?.getItem(key);
      return raw ? JSON.parse(raw) : null;
    } catch {
      return undefined; // unreadable: treated as malformed
    }
  }

  _write(key, value) {
    try {
      this.storage?.setItem(key, JSON.stringify(value));
    } catch {
      // storage disabled or full: the answer will not survive a reload
    }
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
 * conversation again and continues the answer where it was (SPEC 6.2). Pass `record: null` to
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
