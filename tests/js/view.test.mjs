// AnswerView with the parts of an answer beyond text (tool calls, reasoning, a refusal), on a
// minimal DOM: the few node methods the view uses, and textContent to read what a page shows.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { AnswerView } from "../../chatproxy/static/chatproxy/view.js";

class Text {
  constructor(data) {
    this.data = data;
  }
  appendData(more) {
    this.data += more;
  }
  get textContent() {
    return this.data;
  }
}

class Element {
  constructor(tagName, ownerDocument) {
    Object.assign(this, { tagName, ownerDocument, childNodes: [], dataset: {}, attributes: {}, className: "" });
  }
  replaceChildren(...nodes) {
    this.childNodes = [...nodes];
  }
  appendChild(node) {
    this.childNodes.push(node);
    return node;
  }
  append(...nodes) {
    this.childNodes.push(...nodes);
  }
  insertBefore(node, before) {
    this.childNodes.splice(this.childNodes.indexOf(before), 0, node);
    return node;
  }
  setAttribute(name, value) {
    this.attributes[name] = value;
  }
  get textContent() {
    return this.childNodes.map((node) => node.textContent).join("");
  }
  set textContent(text) {
    this.childNodes = [new Text(text)];
  }
  find(className) {
    if (this.className === className) return [this];
    return this.childNodes.flatMap((node) => (node instanceof Element ? node.find(className) : []));
  }
}

function page() {
  const document = { createElement: (tag) => new Element(tag, document), createTextNode: (data) => new Text(data) };
  return { element: new Element("div", document), status: new Element("p", document) };
}

const call = (index, id, name, args) => ({ type: "tool_call", data: { index, id, name, arguments: args } });

describe("AnswerView parts", () => {
  test("renders a streamed tool call as its name and growing arguments", () => {
    const { element, status } = page();
    const view = new AnswerView(element, { status });
    view.handle(call(0, "call_1", "get_weather", ""));
    assert.equal(status.textContent, "Answering…");
    view.handle(call(0, null, null, '{"city"'));
    view.handle(call(0, null, null, ': "Paris"}'));
    view.handle({ type: "done", data: { finish_reason: "tool_calls", attempts: 1 } });
    assert.deepEqual(view.toolCalls, [{ index: 0, id: "call_1", name: "get_weather", arguments: '{"city": "Paris"}' }]);
    const [box] = element.find("chatproxy-tool-call");
    assert.equal(box.dataset.callId, "call_1");
    assert.equal(box.dataset.index, "0");
    assert.equal(box.find("chatproxy-tool-name")[0].textContent, "get_weather");
    assert.equal(box.find("chatproxy-tool-arguments")[0].textContent, '{"city": "Paris"}');
    assert.equal(element.dataset.state, "done");
  });

  test("keeps parallel calls apart by index", () => {
    const { element } = page();
    const view = new AnswerView(element);
    view.handle(call(1, "call_b", "get_time", ""));
    view.handle(call(0, "call_a", "get_weather", "{}"));
    view.handle(call(1, null, null, "{}"));
    assert.deepEqual(view.toolCalls.map((c) => [c.index, c.name, c.arguments]), [[0, "get_weather", "{}"], [1, "get_time", "{}"]]);
  });

  test("shows reasoning before the text and a refusal after it", () => {
    const { element } = page();
    const view = new AnswerView(element);
    view.handle({ type: "reasoning", data: { text: "Think", field: "reasoning_content" } });
    view.handle({ type: "delta", data: { text: "Answer" } });
    view.handle({ type: "reasoning", data: { text: "ing.", field: "reasoning_content" } });
    view.handle({ type: "refusal", data: { text: "No." } });
    assert.equal(view.reasoning, "Thinking.");
    assert.equal(view.refusal, "No.");
    assert.equal(view.text, "Answer");
    assert.equal(element.textContent, "ReasoningThinking.AnswerNo.");
    assert.equal(element.find("chatproxy-reasoning")[0].tagName, "details");
  });

  test("a reset empties the parts too", () => {
    const { element } = page();
    const view = new AnswerView(element);
    view.handle(call(0, "call_1", "f", "{"));
    view.handle({ type: "reasoning", data: { text: "x" } });
    view.handle({ type: "reset", data: { reason: "diverged" } });
    assert.deepEqual(view.toolCalls, []);
    assert.equal(view.reasoning, "");
    assert.equal(element.textContent, "");
    view.handle(call(0, "call_2", "f", "{}"));
    assert.deepEqual(view.toolCalls, [{ index: 0, id: "call_2", name: "f", arguments: "{}" }]);
  });

  test("ignores other choices and malformed parts", () => {
    const { element } = page();
    const view = new AnswerView(element);
    view.handle({ type: "delta", data: { text: "second", choice: 1 } });
    view.handle({ type: "tool_call", data: { index: "0", id: "x", name: "f", arguments: "{}" } });
    view.handle({ type: "reasoning", data: { text: 5 } });
    assert.equal(view.text, "");
    assert.deepEqual(view.toolCalls, []);
    assert.equal(element.textContent, "");
  });
});

describe("AnswerView during a fallback", () => {
  test("a retry to a fallback target says where the answer is going", () => {
    const { element, status } = page();
    const note = new Element("p", element.ownerDocument);
    const view = new AnswerView(element, { note, status });
    view.handle({ type: "start", data: { model: "gpt-4o-mini" } });
    view.handle({ type: "retry", data: { attempt: 2, reason: "upstream_error", delay: 0, fallback: "gpt-4o" } });
    assert.equal(note.textContent, "Switching to gpt-4o…");
    assert.equal(element.dataset.state, "reconnecting");
    view.handle({ type: "delta", data: { text: "Hello" } });
    view.handle({ type: "done", data: { attempts: 2, model: "gpt-4o" } });
    assert.equal(status.textContent, "Done (recovered after 2 attempts, answered by gpt-4o).");
    assert.equal(view.text, "Hello");
  });

  test("a plain retry still reconnects, and the done line names no model", () => {
    const { element, status } = page();
    const note = new Element("p", element.ownerDocument);
    const view = new AnswerView(element, { note, status });
    view.handle({ type: "retry", data: { attempt: 2, reason: "stall", delay: 0.1 } });
    assert.equal(note.textContent, "Reconnecting…");
    view.handle({ type: "done", data: { attempts: 2, model: "gpt-4o-mini" } });
    assert.equal(status.textContent, "Done (recovered after 2 attempts).");
  });
});
