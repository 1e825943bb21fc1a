/**
 * parser.js: an incremental text/event-stream parser, the wire format of chatproxy's SSE endpoint.
 * It knows nothing about chatproxy's events; sse.js gives the parsed events their meaning.
 */

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
