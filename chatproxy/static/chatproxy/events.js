/**
 * events.js: the events a chat delivers to its callback, {type, data, seq, streamId}, and the
 * bookkeeping both transports share: StreamProgress funnels a stream's events to the callback,
 * remembers where the stream stands (for resuming) and ends it exactly once.
 */

/** Events after which a stream is over. */
export const TERMINAL_EVENTS = Object.freeze(["done", "error"]);

/** Whether an event of `type` ends its stream. */
export function isTerminal(type) {
  return type === "done" || type === "error";
}

/**
 * An event's sequence number (SSE `id:`, WebSocket `seq`) as an integer, or null if it is
 * missing or not one.
 */
export function parseSeq(value) {
  if (typeof value === "number" && Number.isInteger(value)) return value;
  if (typeof value === "string" && /^[0-9]+$/.test(value)) return Number.parseInt(value, 10);
  return null;
}

/**
 * Tracks one stream's progress and funnels its events to the caller's callback: remembers the
 * stream id and the last sequence number (for resuming), drops events replayed twice and
 * everything after the terminal event.
 *
 * One instance follows a stream across all its connections (the first one and each resume), so
 * a transport creates it once per chat, or is handed one (ChatProxyClient's, which mirrors the
 * position on the client object).
 */
export class StreamProgress {
  /**
   * @param {function} onEvent  receives {type, data, seq, streamId}
   * @param {{streamId?: string|null, lastSeq?: number|null}} [position]  where a resumed stream stands
   */
  constructor(onEvent, { streamId = null, lastSeq = null } = {}) {
    this.onEvent = onEvent;
    this.streamId = streamId;
    this.lastSeq = lastSeq;
    /** The terminal event once delivered, else null. */
    this.final = null;
  }

  /** Whether the terminal event was delivered. */
  get finished() {
    return this.final !== null;
  }

  /** Deliver one event from the server; returns true if it was terminal. */
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

  /** Deliver a client-side event ("keepalive", "resuming"): it has no sequence number. */
  notify(type, data = {}) {
    this.onEvent({ type, data, seq: null, streamId: this.streamId });
  }

  /**
   * End the stream with an "error" event of the client's own, unless it already ended.
   * @returns {object} the terminal event (this one, or the one delivered before)
   */
  fail(code, message, extra) {
    this.emit("error", { code, message, ...extra });
    return this.final;
  }
}
