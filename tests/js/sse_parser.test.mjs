// Unit tests of the browser client's SSE parser (parser.js) and transports (sse.js, websocket.js,
// client.js), without a browser or a server.
// Run: node --test tests/js/   (Node 18/20 find *.test.mjs in a directory; Node 22+: node --test tests/js/*.test.mjs)

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { FakeWebSocket, fakeFetch, nextSent, sse, sseResponse, tick } from "./fakes.mjs";

import { ChatProxyClient } from "../../chatproxy/static/chatproxy/client.js";
import { withDirective } from "../../chatproxy/static/chatproxy/demo.js";
import { getCookie } from "../../chatproxy/static/chatproxy/endpoints.js";
import { SSEParser } from "../../chatproxy/static/chatproxy/parser.js";
import { streamChat } from "../../chatproxy/static/chatproxy/sse.js";
import { ChatProxySocket } from "../../chatproxy/static/chatproxy/websocket.js";

/** Parse `chunks` and return what the parser reported, in order. */
function parse(chunks, { end = true } = {}) {
  const seen = [];
  const parser = new SSEParser({
    onEvent: (event) => seen.push(["event", event]),
    onComment: (text) => seen.push(["comment", text]),
    onRetry: (ms) => seen.push(["retry", ms]),
  });
  for (const chunk of chunks) parser.feed(chunk);
  if (end) parser.end();
  return { seen, parser, events: seen.filter(([k]) => k === "event").map(([, e]) => e) };
}

/** Every way of cutting `text` into two pieces, plus one piece per character. */
function splits(text) {
  const result = [[text], [...text]];
  for (let i = 1; i < text.length; i += 1) result.push([text.slice(0, i), text.slice(i)]);
  return result;
}

const STREAM =
  ": open\n" +
  "retry: 2000\n\n" +
  'id: 1\nevent: start\ndata: {"stream_id": "s1", "model": "m", "profile": "default"}\n\n' +
  ": keepalive\n" +
  'id: 2\nevent: delta\ndata: {"text": "Hel"}\n\n' +
  'id: 3\nevent: delta\ndata: {"text": "lo"}\n\n' +
  'id: 4\nevent: done\ndata: {"finish_reason": "stop", "attempts": 1, "usage": null}\n\n';

describe("SSEParser", () => {
  test("parses events, comments and retry", () => {
    const { seen } = parse([STREAM]);
    assert.deepEqual(seen[0], ["comment", "open"]);
    assert.deepEqual(seen[1], ["retry", 2000]);
    assert.deepEqual(seen[2], [
      "event",
      { type: "start", data: '{"stream_id": "s1", "model": "m", "profile": "default"}', id: "1" },
    ]);
    assert.deepEqual(seen[3], ["comment", "keepalive"]);
    assert.deepEqual(
      seen.slice(4).map(([, e]) => [e.type, e.id]),
      [["delta", "2"], ["delta", "3"], ["done", "4"]],
    );
  });

  test("gives the same result however the stream is split", () => {
    const expected = parse([STREAM]).seen;
    for (const chunks of splits(STREAM)) {
      assert.deepEqual(parse(chunks).seen, expected, JSON.stringify(chunks.slice(0, 3)));
    }
  });

  test("accepts CRLF, LF and CR line endings, also mixed and split", () => {
    const lf = "event: delta\ndata: a\ndata: b\n\nevent: done\ndata: {}\n\n";
    const expected = parse([lf]).events;
    assert.equal(expected.length, 2);
    for (const eol of ["\r\n", "\r"]) {
      const text = lf.replaceAll("\n", eol);
      for (const chunks of splits(text)) assert.deepEqual(parse(chunks).events, expected);
    }
    const mixed = "event: delta\r\ndata: a\rdata: b\n\r\nevent: done\ndata: {}\r\r";
    for (const chunks of splits(mixed)) assert.deepEqual(parse(chunks).events, expected);
  });

  test("a CR ending one chunk and an LF starting the next are one line break", () => {
    const { events } = parse(["data: x\r", "\n", "\r", "\ndata: y\r\n\r\n"]);
    assert.deepEqual(events.map((e) => e.data), ["x", "y"]);
  });

  test("joins multi-line data with LF", () => {
    const { events } = parse(["data: first\ndata:second\ndata:  third\ndata\n\n"]);
    assert.equal(events[0].data, "first\nsecond\n third\n");
    assert.equal(events[0].type, "message");
  });

  test("an event without data lines is not dispatched, but its id is kept", () => {
    const { events, parser } = parse(["event: delta\nid: 7\n\ndata: z\n\n"]);
    assert.deepEqual(events, [{ type: "message", data: "z", id: "7" }]);
    assert.equal(parser.lastEventId, "7");
  });

  test("empty data line dispatches an empty string", () => {
    assert.deepEqual(parse(["data:\n\n"]).events, [{ type: "message", data: "", id: "" }]);
  });

  test("ignores unknown fields, invalid retry and ids with NUL", () => {
    const { seen, parser } = parse(["id: 5\nfoo: bar\nretry: 1x\nretry\nid: a\0b\ndata: d\n\n"]);
    assert.deepEqual(seen, [["event", { type: "message", data: "d", id: "5" }]]);
    assert.equal(parser.retry, null);
  });

  test("a colon-less line is a field with an empty value; only one leading space is dropped", () => {
    const { events } = parse(["event:delta\ndata:  two spaces\n\n"]);
    assert.deepEqual(events, [{ type: "delta", data: " two spaces", id: "" }]);
  });

  test("comments: with or without a space, and an empty one", () => {
    const { seen } = parse([":keepalive\n: open\n:\n"]);
    assert.deepEqual(seen, [["comment", "keepalive"], ["comment", "open"], ["comment", ""]]);
  });

  test("an event cut off by the end of the stream is discarded", () => {
    const { events } = parse(["data: complete\n\ndata: partial\n"]);
    assert.deepEqual(events.map((e) => e.data), ["complete"]);
  });

  test("decodes UTF-8 bytes split inside a character, and drops a leading BOM", () => {
    const bytes = new TextEncoder().encode('\ufeffdata: {"text": "héllo ✓ 😀"}\n\n');
    for (let i = 1; i < bytes.length; i += 1) {
      const { events } = parse([bytes.slice(0, i), bytes.slice(i)]);
      assert.equal(events.length, 1);
      assert.deepEqual(JSON.parse(events[0].data), { text: "héllo ✓ 😀" });
    }
    assert.deepEqual(parse(["\ufeffdata: s\n\n"]).events[0].data, "s");
  });

  test("dispatches as soon as the blank line arrives", () => {
    const seen = [];
    const parser = new SSEParser({ onEvent: (e) => seen.push(e.data) });
    parser.feed("data: a\n");
    assert.deepEqual(seen, []);
    parser.feed("\n");
    assert.deepEqual(seen, ["a"]);
  });
});

describe("getCookie", () => {
  test("finds a cookie among others and decodes it", () => {
    assert.equal(getCookie("csrftoken", "a=1; csrftoken=abc%20d; b=2"), "abc d");
    assert.equal(getCookie("csrftoken", "xcsrftoken=1"), null);
    assert.equal(getCookie("csrftoken", ""), null);
  });
});

// ---------------------------------------------------------------------------------------------
// streamChat over a fake fetch
// ---------------------------------------------------------------------------------------------

describe("streamChat", () => {
  test("POSTs JSON with the CSRF token and dispatches parsed events", async () => {
    const { fetch, calls } = fakeFetch([
      () =>
        sseResponse([
          ": open\nretry: 1000\n\n",
          sse(1, "start", { stream_id: "s1", model: "m", profile: "default" }).slice(0, 20),
          sse(1, "start", { stream_id: "s1", model: "m", profile: "default" }).slice(20),
          ": keepalive\n\n",
          sse(2, "delta", { text: "Hi" }) + sse(3, "done", { finish_reason: "stop", attempts: 1, usage: null }),
        ]),
    ]);
    const events = [];
    const final = await streamChat({
      url: "/chat/stream/",
      messages: [{ role: "user", content: "hello" }],
      model: "gpt-x",
      options: { temperature: 0.5, ignored: true },
      csrfToken: "tok",
      fetch,
      onEvent: (e) => events.push(e),
    });
    assert.equal(calls.length, 1);
    const { url, init } = calls[0];
    assert.equal(url, "/chat/stream/");
    assert.equal(init.method, "POST");
    assert.equal(init.credentials, "same-origin");
    assert.equal(init.headers["X-CSRFToken"], "tok");
    assert.equal(init.headers["Content-Type"], "application/json");
    assert.deepEqual(JSON.parse(init.body), {
      messages: [{ role: "user", content: "hello" }],
      model: "gpt-x",
      temperature: 0.5,
    });
    assert.deepEqual(
      events.map((e) => [e.type, e.seq]),
      [["start", 1], ["keepalive", null], ["delta", 2], ["done", 3]],
    );
    assert.equal(events[2].data.text, "Hi");
    assert.equal(events[2].streamId, "s1");
    assert.equal(final.type, "done");
    assert.equal(final.data.finish_reason, "stop");
  });

  test("a JSON error response becomes an error event with the server's message", async () => {
    const { fetch } = fakeFetch([
      () =>
        new Response(JSON.stringify({ error: { code: "bad_request", message: "Too many messages." } }), {
          status: 400,
          headers: { "Content-Type": "application/json" },
        }),
    ]);
    const events = [];
    const final = await streamChat({ messages: [], fetch, csrfToken: "t", onEvent: (e) => events.push(e) });
    assert.equal(events.length, 1);
    assert.equal(final.type, "error");
    assert.equal(final.data.code, "bad_request");
    assert.equal(final.data.message, "Too many messages.");
    assert.equal(final.data.status, 400);
  });

  test("a non-JSON error page (a proxy's 502) becomes a friendly error", async () => {
    const { fetch } = fakeFetch([() => new Response("<html>Bad Gateway</html>", { status: 502 })]);
    const final = await streamChat({ messages: [], fetch, csrfToken: "t" });
    assert.equal(final.data.code, "http_error");
    assert.match(final.data.message, /temporarily unavailable/);
    assert.doesNotMatch(final.data.message, /html/i);
  });

  test("an unreachable server becomes a network error", async () => {
    const fetch = async () => {
      throw new TypeError("Failed to fetch");
    };
    const final = await streamChat({ messages: [], fetch, csrfToken: "t" });
    assert.equal(final.data.code, "network");
  });

  test("a dropped connection resumes with Last-Event-ID and drops replayed events", async () => {
    const { fetch, calls } = fakeFetch([
      () => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "abc" }), sse(2, "delta", { text: "A" })]),
      () =>
        sseResponse([
          sse(2, "delta", { text: "A" }),
          sse(3, "delta", { text: "B" }),
          sse(4, "done", { finish_reason: "stop", attempts: 1, usage: null }),
        ]),
    ]);
    const events = [];
    const final = await streamChat({ messages: [], fetch, csrfToken: "t", onEvent: (e) => events.push(e) });
    assert.equal(final.type, "done");
    assert.deepEqual(
      events.map((e) => e.type),
      ["start", "delta", "resuming", "delta", "done"],
    );
    assert.equal(events.filter((e) => e.type === "delta").map((e) => e.data.text).join(""), "AB");
    assert.equal(calls[1].url, "/chat/stream/abc/");
    assert.equal(calls[1].init.method, "GET");
    assert.equal(calls[1].init.headers["Last-Event-ID"], "2");
  });

  test("when the stream is gone (404), the answer ends with an expired error", async () => {
    const { fetch } = fakeFetch([
      () => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "abc" })]),
      () => new Response("not found", { status: 404 }),
    ]);
    const final = await streamChat({ messages: [], fetch, csrfToken: "t" });
    assert.equal(final.type, "error");
    assert.equal(final.data.code, "expired");
    assert.equal(final.data.status, 404);
  });

  test("when resuming is refused (403), the answer ends with a network error", async () => {
    const { fetch } = fakeFetch([
      () => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "abc" })]),
      () => new Response("forbidden", { status: 403 }),
    ]);
    const final = await streamChat({ messages: [], fetch, csrfToken: "t" });
    assert.equal(final.data.code, "network");
  });

  test("a dropped connection before any event is not resumed", async () => {
    const { fetch, calls } = fakeFetch([() => sseResponse([": open\n\n"])]);
    const final = await streamChat({ messages: [], fetch, csrfToken: "t" });
    assert.equal(final.data.code, "network");
    assert.equal(calls.length, 1);
  });

  test("a silent connection counts as lost after idleTimeoutMs", async () => {
    const { fetch } = fakeFetch([
      (url, init) => sseResponse([sse(1, "start", { stream_id: "abc" })], { close: false, signal: init.signal }),
      () => new Response("gone", { status: 410 }),
    ]);
    const events = [];
    const final = await streamChat({
      messages: [],
      fetch,
      csrfToken: "t",
      idleTimeoutMs: 30,
      onEvent: (e) => events.push(e.type),
    });
    assert.deepEqual(events, ["start", "resuming", "error"]);
    assert.equal(final.data.code, "network");
  });

  test("aborting stops the stream with a cancelled error and asks the server to cancel", async () => {
    const controller = new AbortController();
    const { fetch, calls } = fakeFetch([
      (url, init) => sseResponse([sse(1, "start", { stream_id: "abc" })], { close: false, signal: init.signal }),
      async () => new Response(null, { status: 204 }),
    ]);
    const events = [];
    const done = streamChat({
      messages: [],
      fetch,
      csrfToken: "t",
      signal: controller.signal,
      onEvent: (e) => {
        events.push(e.type);
        if (e.type === "start") setTimeout(() => controller.abort(), 5);
      },
    });
    const final = await done;
    assert.equal(final.data.code, "cancelled");
    assert.deepEqual(events, ["start", "error"]);
    assert.equal(calls[1].url, "/chat/stream/abc/cancel/");
    assert.equal(calls[1].init.method, "POST");
    assert.equal(calls[1].init.headers["X-CSRFToken"], "t");
  });

  test("ignores anything after the terminal event", async () => {
    const { fetch } = fakeFetch([
      () =>
        sseResponse([
          sse(1, "start", { stream_id: "s" }) +
            sse(2, "error", { code: "upstream_timeout", message: "Sorry." }) +
            sse(3, "delta", { text: "late" }),
        ]),
    ]);
    const events = [];
    const final = await streamChat({ messages: [], fetch, csrfToken: "t", onEvent: (e) => events.push(e.type) });
    assert.deepEqual(events, ["start", "error"]);
    assert.equal(final.data.message, "Sorry.");
  });
});

// ---------------------------------------------------------------------------------------------
// ChatProxySocket over a fake WebSocket
// ---------------------------------------------------------------------------------------------

describe("ChatProxySocket", () => {
  test("sends a chat frame and routes server frames by request_id", async () => {
    FakeWebSocket.instances = [];
    FakeWebSocket.refuse = false;
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const events = [];
    const done = socket.chat({ messages: [{ role: "user", content: "hi" }], onEvent: (e) => events.push(e) });
    await tick();
    const ws = FakeWebSocket.instances[0];
    const frame = await nextSent(ws);
    assert.equal(frame.type, "chat");
    assert.deepEqual(frame.messages, [{ role: "user", content: "hi" }]);
    const rid = frame.request_id;
    ws.push({ type: "start", request_id: rid, stream_id: "s9", seq: 1, model: "m", profile: "default" });
    ws.push({ type: "keepalive" });
    ws.push({ type: "delta", request_id: "someone-else", stream_id: "x", seq: 2, text: "NO" });
    ws.push({ type: "delta", request_id: rid, stream_id: "s9", seq: 2, text: "yes" });
    ws.push({ type: "done", request_id: rid, stream_id: "s9", seq: 3, finish_reason: "stop", attempts: 1, usage: null });
    const final = await done;
    assert.deepEqual(
      events.map((e) => e.type),
      ["start", "keepalive", "delta", "done"],
    );
    assert.deepEqual(events[0].data, { stream_id: "s9", model: "m", profile: "default" });
    assert.equal(events[2].data.text, "yes");
    assert.equal(events[2].seq, 2);
    assert.equal(final.data.finish_reason, "stop");
    socket.close();
  });

  test("aborting sends a cancel frame", async () => {
    FakeWebSocket.instances = [];
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const controller = new AbortController();
    const done = socket.chat({ messages: [], signal: controller.signal });
    await tick();
    const ws = FakeWebSocket.instances[0];
    const { request_id: rid } = await nextSent(ws);
    controller.abort();
    const final = await done;
    assert.equal(final.data.code, "cancelled");
    assert.deepEqual(ws.sent.shift(), { type: "cancel", request_id: rid });
    socket.close();
  });

  test("a socket that cannot open ends the chat with a friendly error", async () => {
    FakeWebSocket.instances = [];
    FakeWebSocket.refuse = true;
    try {
      const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
      const final = await socket.chat({ messages: [] });
      assert.equal(final.data.code, "network");
      assert.match(final.data.message, /switch to SSE/);
    } finally {
      FakeWebSocket.refuse = false;
    }
  });

  test("a dropped socket is reopened and the stream resumed from the last seq", async () => {
    FakeWebSocket.instances = [];
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const events = [];
    const done = socket.chat({ messages: [], onEvent: (e) => events.push(e) });
    await tick();
    const first = FakeWebSocket.instances[0];
    const { request_id: rid } = await nextSent(first);
    first.push({ type: "start", request_id: rid, stream_id: "s1", seq: 1 });
    first.push({ type: "delta", request_id: rid, stream_id: "s1", seq: 2, text: "a" });
    first.drop();
    for (let i = 0; i < 200 && FakeWebSocket.instances.length < 2; i += 1) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const second = FakeWebSocket.instances[1];
    assert.deepEqual(await nextSent(second), { type: "resume", request_id: rid, stream_id: "s1", last_event_id: 2 });
    second.push({ type: "delta", stream_id: "s1", seq: 2, text: "a" });
    second.push({ type: "delta", stream_id: "s1", seq: 3, text: "b" });
    second.push({ type: "done", stream_id: "s1", seq: 4, finish_reason: "stop", attempts: 1, usage: null });
    const final = await done;
    assert.equal(final.type, "done");
    assert.equal(
      events.filter((e) => e.type === "delta").map((e) => e.data.text).join(""),
      "ab",
    );
    assert.ok(events.some((e) => e.type === "resuming"));
    socket.close();
  });
});

describe("ChatProxySocket without server-side resume", () => {
  test("a refused resume frame ends the chat with a friendly error at once", async () => {
    FakeWebSocket.instances = [];
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const done = socket.chat({ messages: [] });
    await tick();
    const first = FakeWebSocket.instances[0];
    const { request_id: rid } = await nextSent(first);
    first.push({ type: "start", request_id: rid, stream_id: "s1", seq: 1 });
    first.drop();
    for (let i = 0; i < 200 && FakeWebSocket.instances.length < 2; i += 1) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const second = FakeWebSocket.instances[1];
    const resume = await nextSent(second);
    assert.equal(resume.request_id, rid);
    second.push({ type: "error", code: "bad_request", message: "Unknown frame 'type'.", request_id: rid });
    const final = await done;
    assert.equal(final.data.code, "network");
    assert.doesNotMatch(final.data.message, /frame/);
    socket.close();
  });
});

describe("withDirective", () => {
  test("appends the directive, with a fresh key when it is limited by times", () => {
    assert.equal(withDirective("hi", ""), "hi");
    assert.equal(withDirective("hi", "[[sim chunks=200 gap=0.03]]"), "hi [[sim chunks=200 gap=0.03]]");
    const a = withDirective("hi", "[[sim status=503 times=1]]");
    const b = withDirective("hi", "[[sim status=503 times=1]]");
    assert.match(a, /^hi \[\[sim status=503 times=1\]\] \[\[sim key=ui-[0-9a-z-]+\]\]$/);
    assert.notEqual(a, b);
  });
});

describe("ChatProxyClient", () => {
  test("remembers the stream id and last event id, and stop() cancels", async () => {
    const { fetch } = fakeFetch([
      () => sseResponse([sse(1, "start", { stream_id: "k" }), sse(2, "delta", { text: "x" }), sse(3, "done", { attempts: 1 })]),
      (url, init) => sseResponse([sse(1, "start", { stream_id: "k2" })], { close: false, signal: init.signal }),
      async () => new Response(null, { status: 204 }),
    ]);
    const client = new ChatProxyClient({ fetch, csrfToken: () => "t" });
    const final = await client.send({ messages: [] });
    assert.equal(final.type, "done");
    assert.equal(client.streamId, "k");
    assert.equal(client.lastEventId, 3);
    assert.equal(client.busy, false);

    const pending = client.send({
      messages: [],
      onEvent: (e) => {
        if (e.type === "start") setTimeout(() => client.stop(), 0);
      },
    });
    assert.equal(client.busy, true);
    const stopped = await pending;
    assert.equal(stopped.data.code, "cancelled");
    assert.equal(client.streamId, "k2");
    assert.equal(client.busy, false);
  });
});
