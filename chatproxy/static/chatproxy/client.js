/**
 * client.js: ChatProxyClient, one conversation's connection to chatproxy: either transport
 * (sse.js, websocket.js) behind one send() / resume() / stop(), one answer at a time.
 */

import { DEFAULT_STREAM_URL, cancelStream, getCookie } from "./endpoints.js";
import { StreamProgress, parseSeq } from "./events.js";
import { DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_RESUMES } from "./reconnect.js";
import { streamChat } from "./sse.js";
import { ChatProxySocket } from "./websocket.js";

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
  /**
   * @param {object} [o]
   * @param {string} [o.streamUrl]     the SSE endpoint, default "/chat/stream/"
   * @param {string} [o.websocketUrl]  default: ws(s)://<this host>/ws/chat/
   * @param {"sse"|"websocket"} [o.transport]  the default transport of send() and resume()
   * @param {string|function} [o.csrfToken]  the token, or a function giving it at each request
   *                                   (logging in rotates it); default: the `csrftoken` cookie
   * @param {function} [o.fetch]       a fetch implementation (tests)
   * @param {function} [o.WebSocket]   a WebSocket constructor (tests)
   * @param {number} [o.idleTimeoutMs] silence after which a connection counts as lost
   * @param {number} [o.maxResumes]    consecutive resume attempts without progress
   */
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
            cancelStream(
              this.fetch ?? globalThis.fetch?.bind(globalThis),
              this.streamUrl,
              streamId,
              this._csrfToken() ?? getCookie("csrftoken"),
            );
          },
        });
        return await this._socket.chat(common);
      }
      return await streamChat({
        ...common,
        url: this.streamUrl,
        csrfToken: this._csrfToken(),
        fetch: this.fetch,
        idleTimeoutMs: this.idleTimeoutMs,
        maxResumes: this.maxResumes,
      });
    } finally {
      if (this._controller === controller) this._controller = null;
    }
  }

  /** The CSRF token for the next request: `csrfToken` may be a function, read each time. */
  _csrfToken() {
    return typeof this.csrfToken === "function" ? this.csrfToken() : this.csrfToken;
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
