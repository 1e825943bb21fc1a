/**
 * resume.js: ResumeRecord, the tab's unfinished answer kept in sessionStorage, so that a page
 * reloaded mid-answer can show the conversation again and continue the answer where it was
 * (demo.js's mountChat uses it; any page can).
 */

import { ServerErrorCode } from "./errors.js";

const RESUME_STORAGE_KEY = "chatproxy.resume";
// Progress is written at most this often: a write per delta would cost more than the answer.
const RESUME_WRITE_INTERVAL_MS = 250;
// A record in another layout (written by another version of this file) is dropped, not misread.
const RECORD_VERSION = 1;
const TRANSPORTS = Object.freeze(["sse", "websocket"]);

/** The tab's sessionStorage, or null where the page may not use it. */
function sessionStore() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // storage disabled (sandboxed iframe, privacy settings)
  }
}

/** Whether `final` has the shape recordedFinal() gives (a record read back is untrusted). */
function isRecordedFinal(final) {
  if (final?.type === "done") return true;
  return (
    final?.type === "error" &&
    typeof final.data?.code === "string" &&
    typeof final.data?.message === "string"
  );
}

/**
 * A finished answer's terminal event, reduced to what restoring it needs.
 * @param {object} event  a "done" or "error" event
 * @returns {{type: "done", data: {}} | {type: "error", data: {code: string, message: string}}}
 */
export function recordedFinal(event) {
  if (event?.type !== "error") return { type: "done", data: {} };
  const data = event.data ?? {};
  return {
    type: "error",
    data: {
      code: typeof data.code === "string" ? data.code : ServerErrorCode.INTERNAL,
      message: typeof data.message === "string" ? data.message : "",
    },
  };
}

/**
 * The tab's unfinished answer, kept in sessionStorage (per tab; it survives a reload, not the
 * tab) so that the page can continue the answer after a reload. Two entries:
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
  /**
   * @param {object} [o]
   * @param {Storage|null} [o.storage]  default: sessionStorage (null: record nothing)
   * @param {string} [o.key]            the record's storage key, default "chatproxy.resume"
   * @param {number} [o.intervalMs]     update() writes at most this often
   * @param {function} [o.setTimer]     setTimeout's stand-in (tests)
   * @param {function} [o.clearTimer]   clearTimeout's stand-in (tests)
   */
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
