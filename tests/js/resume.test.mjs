// Unit tests of resuming in the browser client: the sessionStorage record that lets the page
// survive a reload (ResumeRecord, resume.js), reattaching to a recorded stream (streamChat /
// ChatProxySocket / ChatProxyClient with resumeFrom), expired streams, and the resume back-off
// (reconnect.js).
// Run: node --test tests/js/

import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";

import { FakeWebSocket, fakeFetch, nextSent, sse, sseResponse } from "./fakes.mjs";

import { ChatProxyClient } from "../../chatproxy/static/chatproxy/client.js";
import { resumeDelayMs } from "../../chatproxy/static/chatproxy/reconnect.js";
import { ResumeRecord, recordedFinal } from "../../chatproxy/static/chatproxy/resume.js";
import { streamChat } from "../../chatproxy/static/chatproxy/sse.js";
import { ChatProxySocket } from "../../chatproxy/static/chatproxy/websocket.js";

// ---------------------------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------------------------

/** sessionStorage's interface over a Map; counts writes; can be told to fail. */
class FakeStorage {
  constructor() {
    this.items = new Map();
    this.writes = [];
    this.failWrites = false;
  }

  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }

  setItem(key, value) {
    if (this.failWrites) throw new DOMException("full", "QuotaExceededError");
    this.writes.push(key);
    this.items.set(key, String(value));
  }

  removeItem(key) {
    this.items.delete(key);
  }

  json(key) {
    return JSON.parse(this.getItem(key));
  }
}

/** Timers run by hand: setTimer/clearTimer for ResumeRecord, run() fires what is due. */
class FakeTimers {
  constructor() {
    this.now = 0;
    this.next = 1;
    this.pending = new Map(); // id -> {at, fn}
    this.setTimer = (fn, ms) => {
      const id = this.next++;
      this.pending.set(id, { at: this.now + ms, fn });
      return id;
    };
    this.clearTimer = (id) => this.pending.delete(id);
  }

  advance(ms) {
    this.now += ms;
    for (const [id, timer] of [...this.pending].sort((a, b) => a[1].at - b[1].at)) {
      if (timer.at <= this.now) {
        this.pending.delete(id);
        timer.fn();
      }
    }
  }
}

function newRecord(storage = new FakeStorage(), timers = new FakeTimers()) {
  const record = new ResumeRecord({
    storage,
    intervalMs: 250,
    setTimer: timers.setTimer,
    clearTimer: timers.clearTimer,
  });
  return { record, storage, timers };
}

const START = {
  transport: "sse",
  streamId: "abc123",
  lastEventId: 1,
  user: "Tell me about lakes",
  text: "",
  turns: [{ user: "Hi", text: "Hello!", final: { type: "done", data: { attempts: 1, usage: { total: 3 } } } }],
};

// ---------------------------------------------------------------------------------------------
// ResumeRecord
// ---------------------------------------------------------------------------------------------

describe("ResumeRecord", () => {
  test("nothing recorded: load() gives null and writes nothing", () => {
    const { record, storage } = newRecord();
    assert.equal(record.load(), null);
    assert.equal(storage.writes.length, 0);
  });

  test("start() writes the conversation and the progress at once; load() reads them back", () => {
    const { record, storage } = newRecord();
    record.start(START);
    assert.deepEqual(storage.writes, ["chatproxy.resume", "chatproxy.resume.progress"]);
    assert.equal(record.streamId, "abc123");
    const loaded = newRecord(storage).record.load();
    assert.deepEqual(loaded, {
      transport: "sse",
      streamId: "abc123",
      lastEventId: 1,
      user: "Tell me about lakes",
      text: "",
      // A finished turn keeps only what showing it needs.
      turns: [{ user: "Hi", text: "Hello!", final: { type: "done", data: {} } }],
    });
  });

  test("update() is throttled: one write per interval, with the latest values", () => {
    const { record, storage, timers } = newRecord();
    record.start(START);
    storage.writes.length = 0;
    let text = "";
    for (let seq = 2; seq <= 20; seq += 1) {
      text += `w${seq} `;
      record.update({ lastEventId: seq, text });
      timers.advance(20); // 19 updates, 20 ms apart: 380 ms
    }
    assert.equal(storage.writes.length, 1, "one write in the first 250 ms");
    const written = storage.json("chatproxy.resume.progress");
    assert.ok(written.lastEventId < 20);
    assert.ok(text.startsWith(written.text));
    timers.advance(250);
    assert.equal(storage.writes.length, 2);
    assert.deepEqual(storage.json("chatproxy.resume.progress"), { streamId: "abc123", lastEventId: 20, text });
    timers.advance(1000);
    assert.equal(storage.writes.length, 2, "no write without an update");
    // Only the small progress entry is rewritten, never the conversation.
    assert.ok(storage.writes.every((key) => key === "chatproxy.resume.progress"));
  });

  test("flush() writes the pending update now (pagehide) and cancels the timer", () => {
    const { record, storage, timers } = newRecord();
    record.start(START);
    record.update({ lastEventId: 5, text: "abc" });
    assert.equal(storage.json("chatproxy.resume.progress").lastEventId, 1);
    record.flush();
    assert.deepEqual(storage.json("chatproxy.resume.progress"), { streamId: "abc123", lastEventId: 5, text: "abc" });
    const writes = storage.writes.length;
    timers.advance(1000);
    record.flush(); // nothing pending
    assert.equal(storage.writes.length, writes);
    assert.equal(timers.pending.size, 0);
  });

  test("clear() forgets the record; clear(otherStream) does not", () => {
    const { record, storage, timers } = newRecord();
    record.start(START);
    record.update({ lastEventId: 3, text: "x" });
    record.clear("someone-else");
    assert.notEqual(storage.getItem("chatproxy.resume"), null);
    record.clear("abc123");
    assert.equal(storage.getItem("chatproxy.resume"), null);
    assert.equal(storage.getItem("chatproxy.resume.progress"), null);
    timers.advance(1000); // the pending update died with the record
    assert.equal(storage.getItem("chatproxy.resume.progress"), null);
    record.update({ lastEventId: 4, text: "xy" }); // no stream recorded: ignored
    timers.advance(1000);
    assert.equal(storage.getItem("chatproxy.resume.progress"), null);
    assert.equal(record.load(), null);
  });

  test("adopt() continues recording a loaded stream (after a reload)", () => {
    const { record, storage, timers } = newRecord();
    record.start(START);
    const after = newRecord(storage, timers).record;
    const saved = after.load();
    after.adopt(saved);
    after.update({ lastEventId: 9, text: "more" });
    timers.advance(250);
    assert.equal(after.load().lastEventId, 9);
    assert.equal(after.load().text, "more");
    assert.deepEqual(after.load().turns, saved.turns);
  });

  for (const [name, head, progress] of [
    ["unparsable JSON", "{nope", '{"streamId":"abc123","lastEventId":1,"text":""}'],
    ["another version", { ...START, v: 2 }, { streamId: "abc123", lastEventId: 1, text: "" }],
    ["progress of another stream", { ...START, v: 1 }, { streamId: "zzz", lastEventId: 1, text: "" }],
    ["no progress", { ...START, v: 1 }, null],
    ["no conversation", null, { streamId: "abc123", lastEventId: 1, text: "" }],
    ["a stream id that is not one", { ...START, v: 1, streamId: "../x" }, { streamId: "../x", lastEventId: 1, text: "" }],
    ["a negative event id", { ...START, v: 1 }, { streamId: "abc123", lastEventId: -1, text: "" }],
    ["an unknown transport", { ...START, v: 1, transport: "carrier-pigeon" }, { streamId: "abc123", lastEventId: 1, text: "" }],
    ["a malformed turn", { ...START, v: 1, turns: [{ user: "Hi" }] }, { streamId: "abc123", lastEventId: 1, text: "" }],
  ]) {
    test(`a malformed record is ignored and removed: ${name}`, () => {
      const storage = new FakeStorage();
      const put = (key, value) => {
        if (value !== null) storage.items.set(key, typeof value === "string" ? value : JSON.stringify(value));
      };
      put("chatproxy.resume", head);
      put("chatproxy.resume.progress", progress);
      const { record } = newRecord(storage);
      assert.equal(record.load(), null);
      assert.equal(storage.getItem("chatproxy.resume"), null);
      assert.equal(storage.getItem("chatproxy.resume.progress"), null);
    });
  }

  test("storage that fails or is missing never throws", () => {
    const { record, storage, timers } = newRecord();
    storage.failWrites = true;
    record.start(START);
    record.update({ lastEventId: 2, text: "a" });
    timers.advance(250);
    record.flush();
    assert.equal(record.load(), null);
    const none = new ResumeRecord({ storage: null });
    none.start(START);
    none.update({ lastEventId: 2, text: "a" });
    none.flush();
    assert.equal(none.load(), null);
    none.clear();
  });

  test("recordedFinal keeps an error's code and message, nothing else", () => {
    assert.deepEqual(recordedFinal({ type: "done", data: { usage: { x: 1 } }, seq: 9 }), { type: "done", data: {} });
    assert.deepEqual(
      recordedFinal({ type: "error", data: { code: "cancelled", message: "Stopped.", status: 1 } }),
      { type: "error", data: { code: "cancelled", message: "Stopped." } },
    );
    assert.deepEqual(recordedFinal({ type: "error", data: {} }), {
      type: "error",
      data: { code: "internal", message: "" },
    });
  });

  test("whenever the page goes away, the recorded text is exactly the events up to lastEventId", () => {
    // A stream of deltas and a reset; the page "unloads" (flush) or is killed (no flush) at every
    // point. What a reload finds must continue without a gap or a repeat.
    const events = [];
    let seq = 1;
    for (let i = 0; i < 12; i += 1) events.push({ seq: ++seq, type: "delta", text: `d${i} ` });
    events.push({ seq: ++seq, type: "reset" });
    for (let i = 12; i < 20; i += 1) events.push({ seq: ++seq, type: "delta", text: `e${i} ` });
    const textAfter = (last) => {
      let text = "";
      for (const e of events) {
        if (e.seq > last) break;
        text = e.type === "reset" ? "" : text + e.text;
      }
      return text;
    };
    for (let cut = 0; cut <= events.length; cut += 1) {
      for (const flush of [true, false]) {
        const { record, storage, timers } = newRecord();
        record.start({ ...START, lastEventId: 1, text: "" });
        let shown = "";
        for (const e of events.slice(0, cut)) {
          shown = e.type === "reset" ? "" : shown + e.text;
          record.update({ lastEventId: e.seq, text: shown });
          timers.advance(37);
        }
        if (flush) record.flush();
        const saved = newRecord(storage).record.load();
        assert.equal(saved.text, textAfter(saved.lastEventId), `cut ${cut}`);
        if (flush) assert.equal(saved.text, shown);
        // Resuming delivers the events after lastEventId: together they give the full answer.
        let resumed = saved.text;
        for (const e of events.filter((e) => e.seq > saved.lastEventId)) {
          resumed = e.type === "reset" ? "" : resumed + e.text;
        }
        assert.equal(resumed, textAfter(Infinity));
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Reattaching over SSE
// ---------------------------------------------------------------------------------------------

const DONE = { finish_reason: "stop", attempts: 1, usage: null };

const deltas = (events) => events.filter((e) => e.type === "delta").map((e) => e.data.text).join("");

describe("streamChat with resumeFrom", () => {
  test("GETs the stream after lastEventId instead of POSTing, and drops replayed events", async () => {
    const { fetch, calls } = fakeFetch([
      () => sseResponse([": open\nretry: 3000\n\n", sse(7, "delta", { text: "old" }), sse(8, "delta", { text: " new" }), sse(9, "done", DONE)]),
    ]);
    const events = [];
    const final = await streamChat({
      url: "/chat/stream/",
      fetch,
      resumeFrom: { streamId: "abc123", lastEventId: 7 },
      onEvent: (e) => events.push(e),
    });
    assert.equal(final.type, "done");
    assert.equal(calls.length, 1);
    assert.equal(calls[0].url, "/chat/stream/abc123/");
    assert.equal(calls[0].init.method, "GET");
    assert.equal(calls[0].init.headers["Last-Event-ID"], "7");
    assert.equal(calls[0].init.body, undefined);
    assert.deepEqual(events.map((e) => [e.type, e.seq, e.streamId]), [["delta", 8, "abc123"], ["done", 9, "abc123"]]);
    assert.equal(deltas(events), " new");
  });

  test("a stream the server no longer has (404) ends with a friendly expired error", async () => {
    const { fetch } = fakeFetch([
      () =>
        new Response(JSON.stringify({ error: { code: "not_found", message: "No such stream: it ended more than RESUME.TTL ago" } }), {
          status: 404,
          headers: { "Content-Type": "application/json" },
        }),
    ]);
    const final = await streamChat({ fetch, resumeFrom: { streamId: "gone", lastEventId: 4 } });
    assert.equal(final.data.code, "expired");
    assert.match(final.data.message, /no longer available/);
    assert.doesNotMatch(final.data.message, /TTL/);
  });

  test("an unreachable server while reattaching is retried, then reported as lost", async () => {
    const fail = async () => {
      throw new TypeError("Failed to fetch");
    };
    const { fetch, calls } = fakeFetch([fail, fail]);
    const events = [];
    const final = await streamChat({
      fetch,
      maxResumes: 1,
      resumeFrom: { streamId: "abc", lastEventId: 3 },
      onEvent: (e) => events.push(e.type),
    });
    assert.equal(calls.length, 2);
    assert.deepEqual(events, ["resuming", "error"]);
    assert.equal(final.data.code, "network");
    assert.match(final.data.message, /interrupted/);
  });
});

describe("resume back-off", () => {
  test("the first attempt is quick, later ones double up to the server's retry advice", () => {
    assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => resumeDelayMs(n)), [250, 500, 1000, 2000, 4000, 5000]);
    assert.deepEqual([1, 2, 3, 4].map((n) => resumeDelayMs(n, 3000)), [250, 500, 1000, 2000]);
    assert.equal(resumeDelayMs(5, 3000), 3000);
    assert.equal(resumeDelayMs(1, 1), 1);
    assert.equal(resumeDelayMs(9, 60_000), 5000);
  });

  test("a connection that brought new events resets the count of failed attempts", async () => {
    // Every connection delivers one new delta and drops: with maxResumes 1 the answer still
    // completes, because each resume made progress.
    const answers = [() => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "s" }), sse(2, "delta", { text: "a" })])];
    for (let seq = 3; seq < 8; seq += 1) {
      answers.push(() => sseResponse([sse(seq - 1, "delta", { text: "dup" }), sse(seq, "delta", { text: String(seq) })]));
    }
    answers.push(() => sseResponse([sse(8, "done", DONE)]));
    const { fetch, calls } = fakeFetch(answers);
    const events = [];
    const final = await streamChat({ fetch, csrfToken: "t", maxResumes: 1, onEvent: (e) => events.push(e) });
    assert.equal(final.type, "done");
    assert.equal(calls.length, 7);
    assert.equal(deltas(events), "a34567");
    assert.ok(events.filter((e) => e.type === "resuming").every((e) => e.data.attempt === 1));
  });
});

describe("resuming while the browser is offline", () => {
  let target;
  let saved;
  beforeEach(() => {
    target = new EventTarget();
    saved = Object.getOwnPropertyDescriptor(globalThis, "navigator");
    Object.defineProperty(globalThis, "navigator", { value: { onLine: false }, configurable: true, writable: true });
    globalThis.addEventListener = target.addEventListener.bind(target);
    globalThis.removeEventListener = target.removeEventListener.bind(target);
  });
  afterEach(() => {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    if (saved) Object.defineProperty(globalThis, "navigator", saved);
    else delete globalThis.navigator;
  });

  test("waits for the online event instead of spending attempts", async () => {
    const { fetch, calls } = fakeFetch([
      () => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "s" }), sse(2, "delta", { text: "a" })]),
      () => sseResponse([sse(3, "delta", { text: "b" }), sse(4, "done", DONE)]),
    ]);
    const events = [];
    const done = streamChat({ fetch, csrfToken: "t", maxResumes: 1, onEvent: (e) => events.push(e.type) });
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(calls.length, 1, "no attempt while offline");
    assert.deepEqual(events, ["start", "delta", "resuming"]);
    globalThis.navigator.onLine = true;
    target.dispatchEvent(new Event("online"));
    const final = await done;
    assert.equal(final.type, "done");
    assert.equal(calls.length, 2);
  });

  test("the Stop button still works while waiting", async () => {
    const controller = new AbortController();
    const { fetch, calls } = fakeFetch([
      () => sseResponse(["retry: 1\n\n", sse(1, "start", { stream_id: "s" })]),
      async () => new Response(null, { status: 202 }),
    ]);
    const done = streamChat({ fetch, csrfToken: "t", signal: controller.signal });
    await new Promise((resolve) => setTimeout(resolve, 20));
    controller.abort();
    const final = await done;
    assert.equal(final.data.code, "cancelled");
    assert.equal(calls[1].url, "/chat/stream/s/cancel/");
    assert.equal(calls[1].init.headers["X-CSRFToken"], "t");
  });
});

// ---------------------------------------------------------------------------------------------
// Reattaching over WebSocket
// ---------------------------------------------------------------------------------------------

describe("ChatProxySocket with resumeFrom", () => {
  test("sends a resume frame, not a chat frame, and continues after lastEventId", async () => {
    FakeWebSocket.instances = [];
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const events = [];
    const done = socket.chat({ resumeFrom: { streamId: "s1", lastEventId: 5 }, onEvent: (e) => events.push(e) });
    const ws = FakeWebSocket.instances[0];
    const frame = await nextSent(ws);
    assert.equal(frame.type, "resume");
    assert.equal(frame.stream_id, "s1");
    assert.equal(frame.last_event_id, 5);
    const rid = frame.request_id;
    ws.push({ type: "delta", request_id: rid, stream_id: "s1", seq: 5, text: "dup" });
    ws.push({ type: "delta", request_id: rid, stream_id: "s1", seq: 6, text: "next" });
    ws.push({ type: "done", request_id: rid, stream_id: "s1", seq: 7, ...DONE });
    const final = await done;
    assert.equal(final.type, "done");
    assert.equal(deltas(events), "next");
    assert.equal(ws.sent.length, 0);
    socket.close();
  });

  test("a stream the server no longer has ends with the expired error", async () => {
    FakeWebSocket.instances = [];
    const socket = new ChatProxySocket({ url: "ws://h/ws/chat/", WebSocket: FakeWebSocket });
    const done = socket.chat({ resumeFrom: { streamId: "s1", lastEventId: 5 } });
    const ws = FakeWebSocket.instances[0];
    const { request_id: rid } = await nextSent(ws);
    ws.push({ type: "error", code: "not_found", request_id: rid, stream_id: "s1", message: "That answer can no longer be resumed." });
    const final = await done;
    assert.equal(final.data.code, "expired");
    assert.match(final.data.message, /no longer available/);
    socket.close();
  });
});

describe("ChatProxyClient.resume", () => {
  test("reports the stream and last event id while continuing, over SSE", async () => {
    const { fetch, calls } = fakeFetch([
      () => sseResponse([sse(4, "delta", { text: "x" }), sse(5, "done", DONE)]),
    ]);
    const client = new ChatProxyClient({ fetch, csrfToken: "t" });
    const seen = [];
    const final = await client.resume({
      streamId: "abc",
      lastEventId: 3,
      onEvent: (e) => seen.push([e.type, client.streamId, client.lastEventId]),
    });
    assert.equal(final.type, "done");
    assert.equal(calls[0].init.headers["Last-Event-ID"], "3");
    assert.deepEqual(seen, [["delta", "abc", 4], ["done", "abc", 5]]);
    assert.equal(client.busy, false);
  });

  test("stop() during a resumed answer cancels the stream on the server", async () => {
    const { fetch, calls } = fakeFetch([
      (url, init) => sseResponse([sse(4, "delta", { text: "x" })], { close: false, signal: init.signal }),
      async () => new Response(null, { status: 202 }),
    ]);
    const client = new ChatProxyClient({ fetch, csrfToken: () => "tok" });
    const final = await client.resume({
      streamId: "abc",
      lastEventId: 3,
      onEvent: (e) => {
        if (e.type === "delta") setTimeout(() => client.stop(), 0);
      },
    });
    assert.equal(final.data.code, "cancelled");
    assert.equal(calls[1].url, "/chat/stream/abc/cancel/");
    assert.equal(calls[1].init.method, "POST");
    assert.equal(calls[1].init.headers["X-CSRFToken"], "tok");
  });
});

describe("stopping while the WebSocket is down", () => {
  test("cancels the stream over HTTP, since no cancel frame can be sent", async () => {
    FakeWebSocket.instances = [];
    const { fetch, calls } = fakeFetch([async () => new Response(null, { status: 202 })]);
    const client = new ChatProxyClient({
      transport: "websocket",
      websocketUrl: "ws://h/ws/chat/",
      WebSocket: FakeWebSocket,
      fetch,
      csrfToken: () => "tok",
    });
    const events = [];
    const done = client.send({
      messages: [],
      onEvent: (e) => {
        events.push(e.type);
        if (e.type === "resuming") client.stop(); // the socket is down, the resume not yet sent
      },
    });
    const ws = FakeWebSocket.instances[0];
    const { request_id: rid } = await nextSent(ws);
    ws.push({ type: "start", request_id: rid, stream_id: "s77", seq: 1 });
    ws.drop();
    const final = await done;
    assert.equal(final.data.code, "cancelled");
    assert.deepEqual(events, ["start", "resuming", "error"]);
    assert.equal(calls.length, 1);
    assert.equal(calls[0].url, "/chat/stream/s77/cancel/");
    assert.equal(calls[0].init.method, "POST");
    assert.equal(calls[0].init.headers["X-CSRFToken"], "tok");
    assert.equal(FakeWebSocket.instances.length, 1, "no new socket after the stop");
    client.close();
  });
});
