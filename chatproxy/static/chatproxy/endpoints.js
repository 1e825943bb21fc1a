/**
 * endpoints.js: where chatproxy's endpoints are and what the client sends them: the default
 * URLs, a stream's own URL, the chat request's body, the CSRF cookie, request ids and the
 * cancel request. Shared by both transports (sse.js, websocket.js) and the client (client.js).
 */

/** The SSE endpoint: POST starts a stream; <url><stream id>/ resumes it, .../cancel/ stops it. */
export const DEFAULT_STREAM_URL = "/chat/stream/";
/** The WebSocket endpoint's path, on the page's own host. */
export const DEFAULT_WEBSOCKET_PATH = "/ws/chat/";

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

/**
 * The URL of stream `streamId` under the stream endpoint `streamUrl` (with or without its
 * trailing slash): GET it to resume the stream, POST to its `cancel/` to stop it.
 */
export function streamResourceUrl(streamUrl, streamId) {
  const base = streamUrl.endsWith("/") ? streamUrl : `${streamUrl}/`;
  return `${base}${encodeURIComponent(streamId)}/`;
}

/** A fresh id for a WebSocket request (or a simulator key): random, URL-safe. */
export function newRequestId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `r${Date.now().toString(36)}${Math.random().toString(36).slice(2, 10)}`;
}

// The optional request fields a chat passes on from its `options`.
const CHAT_OPTIONS = [
  "temperature", "max_tokens", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format",
];

/**
 * The JSON body of a chat request: the fields the endpoints accept, unset ones left out.
 * @param {object} o  {messages, model, options: {temperature, max_tokens, seed, tools, tool_choice,
 *                    parallel_tool_calls, response_format}}
 */
export function chatBody({ messages, model, options }) {
  const body = { messages };
  if (model) body.model = model;
  for (const key of CHAT_OPTIONS) {
    if (options?.[key] !== undefined && options[key] !== null) body[key] = options[key];
  }
  return body;
}

/**
 * Ask the server to stop stream `streamId` of the stream endpoint `streamUrl` now, rather than
 * when its grace period for a reconnect ends. Fire and forget; `keepalive` lets the request
 * outlive a page that is being closed.
 * @param {function} fetchImpl  a fetch implementation
 * @param {string} streamUrl    the stream endpoint, e.g. "/chat/stream/"
 * @param {string} streamId     the stream's id, from its "start" event
 * @param {string|null} [csrfToken]
 */
export function cancelStream(fetchImpl, streamUrl, streamId, csrfToken) {
  try {
    fetchImpl(`${streamResourceUrl(streamUrl, streamId)}cancel/`, {
      method: "POST",
      credentials: "same-origin",
      headers: csrfToken ? { "X-CSRFToken": csrfToken } : {},
      keepalive: true,
    }).catch(() => {});
  } catch {
    // Best effort: the server also stops once its grace period ends.
  }
}
