/** The official openai Node SDK against chatproxy's OpenAI-compatible endpoint (see common.mjs). */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { FORECAST_SCHEMA, WEATHER_PARAMETERS, env, question, run } from "./common.mjs";

const proxy = new OpenAI({ baseURL: env.proxy, apiKey: env.key, maxRetries: 0, timeout: 15000 });
const direct = new OpenAI({ baseURL: env.sim, apiKey: "sk-direct", maxRetries: 0, timeout: 15000 });
const tools = [{ type: "function", function: { name: "get_weather", description: "The weather", parameters: WEATHER_PARAMETERS } }];

/** The streamed chunks of one request, and the tool calls and text they add up to. */
async function streamed(client, body) {
  const chunks = [];
  for await (const chunk of await client.chat.completions.create({ ...body, stream: true })) chunks.push(chunk);
  const calls = [];
  let text = "";
  for (const chunk of chunks) {
    for (const choice of chunk.choices) {
      text += choice.delta.content ?? "";
      for (const piece of choice.delta.tool_calls ?? []) {
        const call = (calls[piece.index] ??= { id: "", name: "", arguments: "" });
        call.id += piece.id ?? "";
        call.name += piece.function?.name ?? "";
        call.arguments += piece.function?.arguments ?? "";
      }
    }
  }
  const finish = chunks.flatMap((c) => c.choices.map((choice) => choice.finish_reason).filter(Boolean));
  return { chunks, calls, text, finish };
}

await run({
  async "streamed tool call"() {
    const { faulty, clean } = question();
    const got = await streamed(proxy, { model: "gpt-4o-mini", messages: [{ role: "user", content: faulty }], tools });
    const expected = await streamed(direct, { model: "gpt-4o-mini", messages: [{ role: "user", content: clean }], tools });
    assert.deepEqual(got.calls, expected.calls);
    assert.equal(got.calls[0].name, "get_weather");
    assert.deepEqual(Object.keys(JSON.parse(got.calls[0].arguments)).sort(), ["city", "unit"]);
    assert.deepEqual(got.finish, ["tool_calls"]);
  },

  async "tool result round trip"() {
    const messages = [{ role: "user", content: question().clean }];
    const first = await proxy.chat.completions.create({ model: "gpt-4o-mini", messages, tools });
    const message = first.choices[0].message;
    assert.equal(first.choices[0].finish_reason, "tool_calls");
    const call = message.tool_calls[0];
    const followUp = [...messages, message, { role: "tool", tool_call_id: call.id, content: '{"temp": 21}' }];
    const got = await streamed(proxy, { model: "gpt-4o-mini", messages: followUp, tools });
    const expected = await streamed(direct, { model: "gpt-4o-mini", messages: followUp, tools });
    assert.ok(got.text.startsWith('get_weather returned {"temp": 21}.'), got.text);
    assert.equal(got.text, expected.text);
  },

  async "usage with include_usage"() {
    const { faulty, clean } = question();
    const body = { model: "gpt-4o-mini", stream_options: { include_usage: true } };
    const got = await streamed(proxy, { ...body, messages: [{ role: "user", content: faulty }] });
    const expected = await streamed(direct, { ...body, messages: [{ role: "user", content: clean }] });
    const last = got.chunks.at(-1);
    assert.deepEqual(last.choices, []);
    assert.deepEqual(last.usage, expected.chunks.at(-1).usage);
    assert.ok(last.usage.completion_tokens > 0);
  },

  async "json schema answer"() {
    const { faulty, clean } = question();
    const response_format = { type: "json_schema", json_schema: { name: "forecast", schema: FORECAST_SCHEMA } };
    const got = await streamed(proxy, { model: "gpt-4o-mini", messages: [{ role: "user", content: faulty }], response_format });
    const expected = await streamed(direct, { model: "gpt-4o-mini", messages: [{ role: "user", content: clean }], response_format });
    assert.equal(got.text, expected.text);
    const value = JSON.parse(got.text);
    assert.deepEqual(Object.keys(value).sort(), ["city", "high"]);
  },

  async "stall in the middle of tool-call arguments stays invisible"() {
    const { faulty, clean } = question("count=args stall_after=2 stall=30 times=1");
    const got = await streamed(proxy, { model: "gpt-4o-mini", messages: [{ role: "user", content: faulty }], tools });
    const expected = await streamed(direct, { model: "gpt-4o-mini", messages: [{ role: "user", content: clean }], tools });
    assert.deepEqual(got.calls, expected.calls);
    assert.deepEqual(got.finish, ["tool_calls"]);
  },
});
