/**
 * chatproxy.js: the browser side of chatproxy, and its public entry point. Dependency-free ES
 * modules, loaded by the browser as they are (no bundler):
 *
 *   import { streamChat } from "/static/chatproxy/chatproxy.js";
 *
 * This file only re-exports the public API; the code lives in modules with one job each, beside
 * it (each imports only the ones listed before it, so the graph has no cycle):
 *
 *   errors.js     error codes the client gives or reacts to; the texts it shows
 *   parser.js     SSEParser: the text/event-stream format
 *   endpoints.js  default URLs, request bodies, CSRF cookie, cancel request
 *   events.js     the event objects; StreamProgress, the bookkeeping both transports share
 *   reconnect.js  when a connection counts as lost and when to reattach (resume back-off)
 *   sse.js        streamChat: the HTTP transport (SSE over fetch)
 *   websocket.js  ChatProxySocket: the WebSocket transport
 *   client.js     ChatProxyClient: either transport, one answer at a time, stop()
 *   view.js       AnswerView: renders one answer
 *   resume.js     ResumeRecord: the unfinished answer in sessionStorage, to survive a reload
 *   demo.js       mountChat: the demo page's controller
 *
 * Transports (both deliver the same events to one callback):
 *
 *   streamChat({url, messages, onEvent, signal, ...})   POST /chat/stream/, read as SSE over fetch
 *                                                     (EventSource cannot POST)
 *   new ChatProxySocket({url}).chat({...})            ws(s)://host/ws/chat/
 *   new ChatProxyClient({...}).send({...})            either of the above, plus stop()
 *   new ChatProxyClient({...}).resume({streamId, lastEventId, ...})
 *                                                     reattach to a stream started earlier, e.g.
 *                                                     before a page reload
 *
 * The callback receives one object per event:
 *
 *   {type, data, seq, streamId}
 *
 *   type   a server event: "start" {stream_id, model, profile}, "delta" {text},
 *          "tool_call" {index, id, name, arguments} (id and name on a call's first event,
 *          arguments a piece to append), "reasoning" {text, field}, "refusal" {text},
 *          "retry" {attempt, max_attempts, reason, delay}, "reset" {reason},
 *          "done" {finish_reason, attempts, usage}, "error" {code, message};
 *          or one of two client-side events: "keepalive" {} (the server is alive, nothing new)
 *          and "resuming" {attempt, max_attempts, reason} (the connection to chatproxy was lost
 *          and the client is reattaching to the stream).
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
 * /chat/stream/<id>/ with Last-Event-ID, or a WebSocket `resume` frame); reconnect.js has the
 * back-off. ResumeRecord keeps the unfinished answer (conversation, stream id, last event id) in
 * sessionStorage so that mountChat can continue it after a page reload.
 *
 * Rendering helpers (AnswerView, mountChat) write model output as text nodes only, never HTML.
 */

export { ChatProxyClient } from "./client.js";
export { mountChat, withDirective } from "./demo.js";
export { getCookie, websocketUrl } from "./endpoints.js";
export { TERMINAL_EVENTS } from "./events.js";
export { SSEParser } from "./parser.js";
export { resumeDelayMs } from "./reconnect.js";
export { ResumeRecord, recordedFinal } from "./resume.js";
export { streamChat } from "./sse.js";
export { AnswerView } from "./view.js";
export { ChatProxySocket } from "./websocket.js";
