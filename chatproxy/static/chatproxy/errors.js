/**
 * errors.js: the error codes the browser client gives or reacts to, and the texts it shows.
 *
 * Every answer ends with exactly one "done" or "error" event; an "error" event's data is
 * {code, message[, status]}. Most errors come from the server with a message it already made
 * friendly, and are passed on as they are. This module holds the rest: the codes the client gives
 * for what only it can see (a lost connection, a stop), the few server codes it reacts to, and
 * the texts it shows when the server had nothing friendly to say (a proxy's error page, say).
 * The codes live here, in one place, so that they can be kept in step with the server's.
 */

/** The codes of "error" events the client makes itself. */
export const ClientErrorCode = Object.freeze({
  /** The server could not be reached, or the connection was lost for good. */
  NETWORK: "network",
  /** A resume found the stream gone: it ended more than RESUME.TTL ago, or is unknown. */
  EXPIRED: "expired",
  /** An error response that is not chatproxy's JSON (e.g. from a proxy); data.status holds the status. */
  HTTP_ERROR: "http_error",
  /** Stopped here. The server uses the same code for a stream stopped by a cancel request. */
  CANCELLED: "cancelled",
});

/** The server's error codes that the client treats specially. */
export const ServerErrorCode = Object.freeze({
  /** The answer to a WebSocket `resume` frame naming a stream the server no longer has. */
  NOT_FOUND: "not_found",
  /** The server could not use a frame: after a `resume` frame, a server without resume support. */
  BAD_REQUEST: "bad_request",
  /** What an "error" event without a (string) code is taken to mean. */
  INTERNAL: "internal",
});

/**
 * The texts of client-made errors, by reason, and of error responses without a usable body, by
 * HTTP status (see friendlyHttpMessage).
 */
export const MESSAGES = Object.freeze({
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

/**
 * The text for an error response whose body says nothing usable.
 * @param {number} status  the HTTP status
 * @returns {string}
 */
export function friendlyHttpMessage(status) {
  if (MESSAGES[status]) return MESSAGES[status];
  if (status === 405) return MESSAGES[404];
  return status >= 500 ? MESSAGES.server : MESSAGES.unexpected;
}
