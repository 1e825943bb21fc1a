/**
 * sse.js: the HTTP transport. POST <stream url> starts an answer and reads it as Server-Sent
 * Events over fetch (EventSource cannot POST); when the connection drops mid-answer, GET
 * <stream url><stream id>/ with Last-Event-ID reattaches to the stream and continues after the
 * last event received.
 */

import { ClientErrorCode, MESSAGES, friendlyHttpMessage } from "./errors.js";
import { DEFAULT_STREAM_URL, cancelStream, chatBody, getCookie, streamResourceUrl } from "./endpoints.js";
import { StreamProgress, parseSeq } from "./events.js";
import { SSEParser } from "./parser.js";
import { DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_RESUMES, waitToResume } from "./reconnect.js";

/**
 * Stream one answer over HTTP.
 *
 * @param {object} o
 * @param {Array<{role: string, content: string}>} o.messages  the conversation, newest last
 * @param {string} [o.url]          the stream endpoint, default "/chat/stream/"
 * @param {string} [o.model]        a model name; the server's default when left out
 * @param {object} [o.options]      {temperature, max_tokens, seed, tools, tool_choice,
 *                                  parallel_tool_calls, response_format}
 * @param {AbortSignal} [o.signal]  aborting stops the stream ("error" event, code "cancelled")
 * @param {function} o.onEvent      receives {type, data, seq, streamId}; see chatproxy.js
 * @param {string} [o.csrfToken]    default: the `csrftoken` cookie
 * @param {boolean} [o.resume]      reattach to the stream when the connection drops (default true)
 * @param {number} [o.maxResumes]   consecutive resume attempts without progress; default 4
 * @param {{streamId: string, lastEventId: number}} [o.resumeFrom]  do not POST: reattach to this
 *                                  stream and deliver the events after lastEventId (a page reload)
 * @param {number} [o.idleTimeoutMs] silence after which the connection counts as lost
 * @param {function} [o.fetch]      a fetch implementation (tests)
 * @param {StreamProgress} [o.progress]  (internal) the stream's bookkeeping, when the caller
 *                                  (ChatProxyClient) keeps one; default: a new one for `onEvent`
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
  const token = () => csrfToken ?? getCookie("csrftoken");
  // connected: a stream response arrived; retryMs: the server's `retry:` advice.
  const ctx = { fetchImpl, signal, idleTimeoutMs, progress, connected: false, retryMs: null };
  const streamUrl = () => streamResourceUrl(url, progress.streamId);
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
      return progress.fail(ClientErrorCode.NETWORK, ctx.connected ? MESSAGES.lost : MESSAGES.unreachable);
    }
    failures += 1;
    progress.notify("resuming", { attempt: failures, max_attempts: maxResumes, reason: "connection_lost" });
    await waitToResume(failures, ctx.retryMs, signal);
    if (signal?.aborted) break;
    seqAtAttempt = progress.lastSeq;
    outcome = await reattach();
  }

  if (signal?.aborted && !progress.finished) {
    if (progress.streamId !== null) {
      // A resumable stream outlives its connection for a grace period: say we are done with it.
      cancelStream(fetchImpl, url, progress.streamId, token());
    }
    return progress.fail(ClientErrorCode.CANCELLED, MESSAGES.cancelled);
  }
  return progress.final;
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
      progress.fail(ClientErrorCode.NETWORK, MESSAGES.unreachable);
      return "terminal";
    }

    if (!response.ok) {
      if (resuming && response.status >= 500) return "lost";
      await failFromResponse(progress, response, resuming);
      return "terminal";
    }
    const contentType = response.headers.get("content-type") ?? "";
    if (!contentType.includes("text/event-stream") || !response.body) {
      progress.fail(ClientErrorCode.HTTP_ERROR, MESSAGES.unexpected, { status: response.status });
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
          progress.notify("keepalive");
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
    progress.fail(ClientErrorCode.EXPIRED, MESSAGES.expired, { status: response.status });
  } else if (resuming) {
    // Not allowed any more (logged out?), or resuming is off: the answer cannot be finished.
    progress.fail(ClientErrorCode.NETWORK, MESSAGES.lost, { status: response.status });
  } else if (code !== null && message !== null) {
    progress.fail(code, message, { status: response.status });
  } else {
    progress.fail(ClientErrorCode.HTTP_ERROR, friendlyHttpMessage(response.status), {
      status: response.status,
    });
  }
}
