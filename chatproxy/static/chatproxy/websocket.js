/**
 * websocket.js: the WebSocket transport. One socket to ws(s)://<host>/ws/chat/ carries any number
 * of concurrent chats, told apart by request id; when it drops mid-answer, a new socket sends a
 * `resume` frame for each unfinished stream.
 */

import { ClientErrorCode, MESSAGES, ServerErrorCode } from "./errors.js";
import { chatBody, newRequestId, websocketUrl } from "./endpoints.js";
import { StreamProgress, parseSeq } from "./events.js";
import { DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_RESUMES, waitToResume } from "./reconnect.js";

// WebSocket.OPEN, spelled out: the constructor in use may be a stand-in without the constants.
const WS_OPEN = 1;
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

/**
 * One WebSocket to chatproxy, opened on first use and shared by any number of concurrent chats.
 * If the socket drops mid-answer it reconnects and sends a `resume` frame for each stream.
 */
export class ChatProxySocket {
  /**
   * @param {object} [o]
   * @param {string} [o.url]  default: ws(s)://<this host>/ws/chat/
   * @param {function} [o.WebSocket]  a WebSocket constructor (tests)
   * @param {number} [o.connectTimeoutMs]  give up opening the socket after this long
   * @param {number} [o.idleTimeoutMs]  silence after which the socket counts as lost
   * @param {number} [o.maxResumes]  consecutive resume attempts without progress, per chat
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
   * @returns {Promise<object>} the terminal "done" or "error" event
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
        progress.fail(ClientErrorCode.CANCELLED, MESSAGES.cancelled);
        finish();
      };
      if (signal?.aborted) {
        progress.fail(ClientErrorCode.CANCELLED, MESSAGES.cancelled);
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
          progress.fail(ClientErrorCode.NETWORK, MESSAGES.websocket);
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
        chat.progress.notify("keepalive");
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
      if (type === "error" && data.code === ServerErrorCode.NOT_FOUND) {
        // The stream ended more than RESUME.TTL ago, or is unknown: keep what was received.
        chat.progress.fail(ClientErrorCode.EXPIRED, MESSAGES.expired);
        chat.finish();
        return;
      }
      if (type === "error" && data.code === ServerErrorCode.BAD_REQUEST) {
        // The server refused the resume frame (no resume support).
        chat.progress.fail(ClientErrorCode.NETWORK, MESSAGES.lost);
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
      progress.fail(ClientErrorCode.NETWORK, progress.streamId === null ? MESSAGES.websocket : MESSAGES.lost);
      chat.finish();
      return;
    }
    chat.resumes += 1;
    progress.notify("resuming", {
      attempt: chat.resumes,
      max_attempts: this.maxResumes,
      reason: "connection_lost",
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
    // request_id (beyond the frame's required fields) lets the server address the stream's
    // frames to this chat.
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
