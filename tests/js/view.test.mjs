// Unit tests of AnswerView (view.js) on a minimal DOM double: what the page says during a fallback.
// Run: node --test tests/js/

import assert from "node:assert/strict";
import { test } from "node:test";

import { AnswerView } from "../../chatproxy/static/chatproxy/view.js";

/** The few DOM members AnswerView uses: a text node, dataset, attributes, textContent. */
function element() {
  const el = {
    dataset: {},
    attributes: {},
    textContent: "",
    hidden: false,
    ownerDocument: {
      createTextNode: (data) => ({ data, appendData(more) { this.data += more; } }),
    },
    replaceChildren() {},
    setAttribute(name, value) { this.attributes[name] = value; },
  };
  return el;
}

function view() {
  const note = element();
  const status = element();
  return { answer: new AnswerView(element(), { note, status }), note, status };
}

test("a retry to a fallback target says where the answer is going", () => {
  const { answer, note, status } = view();
  answer.handle({ type: "start", data: { model: "gpt-4o-mini" } });
  answer.handle({ type: "retry", data: { attempt: 2, reason: "upstream_error", delay: 0, fallback: "gpt-4o" } });
  assert.equal(note.textContent, "Switching to gpt-4o…");
  assert.equal(answer.element.dataset.state, "reconnecting");
  answer.handle({ type: "delta", data: { text: "Hello" } });
  answer.handle({ type: "done", data: { attempts: 2, model: "gpt-4o" } });
  assert.equal(status.textContent, "Done (recovered after 2 attempts, answered by gpt-4o).");
  assert.equal(answer.text, "Hello");
});

test("a plain retry still reconnects, and the done line names no model", () => {
  const { answer, note, status } = view();
  answer.handle({ type: "retry", data: { attempt: 2, reason: "stall", delay: 0.1 } });
  assert.equal(note.textContent, "Reconnecting…");
  answer.handle({ type: "done", data: { attempts: 2, model: "gpt-4o-mini" } });
  assert.equal(status.textContent, "Done (recovered after 2 attempts).");
});
