// Test doubles shared by the JavaScript client's tests: a streamed SSE Response, a scripted fetch,
// and a WebSocket whose server side the test plays.

export function sseResponse(chunks, { status = 200, close = true, signal } = {}) {
  const encoder = new TextEncoder();
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
      if (close) controller.close();
      signal?.addEventListener("abort", () => controller.error(new DOMException("aborted", "AbortError")));
    },
  });
  return new Response(body, { status, headers: { "Content-Type": "text/event-stream" } });
}

export function sse(id, type, data) {
  return `id: ${id}\nevent: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
}

/** A fetch that answers each call with the next of `answers` (functions of (url, init)). */
export function fakeFetch(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const answer = answers.shift();
    if (!answer) throw new Error(`unexpected fetch ${url}`);
    return answer(url, init);
  };
  return { fetch, calls };
}

export class FakeWebSocket {
  static instances = [];
  static refuse = false;

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWebSocket.instances.push(this);
    setTimeout(() => {
      if (FakeWebSocket.refuse) {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006 });
      } else {
        this.readyState = 1;
        this.onopen?.({});
      }
    }, 0);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close() {
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code: 1000 }), 0);
  }

  /** Server side: deliver a frame. */
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /** Server side: drop the connection. */
  drop() {
    this.readyState = 3;
    this.onclose?.({ code: 1006 });
  }
}

export const tick = () => new Promise((resolve) => setTimeout(resolve, 0));

export async function nextSent(socket) {
  for (let i = 0; i < 100 && socket.sent.length === 0; i += 1) await tick();
  return socket.sent.shift();
}
