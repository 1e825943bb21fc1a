/** The official openai Node SDK's Responses API against chatproxy's /chat/v1/responses (see common.mjs). */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { WEATHER_PARAMETERS, env, question, run } from "./common.mjs";

const proxy = new OpenAI({ baseURL: env.proxy, apiKey: env.key, maxRetries: 0, timeout: 15000 });
const direct = new OpenAI({ baseURL: env.sim, apiKey: "sk-direct", maxRetries: 0, timeout: 15000 });
const weather = { name: "get_weather", description: "The weather", parameters: WEATHER_PARAMETERS };
const tools = [{ type: "function", ...weather, strict: true }];  // the Responses API's flat shape

/** The simulator's own tool call for `content` (asked over Chat Completions). */
async function directCall(content) {
  const completion = await direct.chat.completions.create({
    model: "gpt-4o-mini", messages: [{ role: "user", content }], tools: [{ type: "function", function: weather }],
  });
  const call = completion.choices[0].message.tool_calls[0];
  return { call_id: call.id, name: call.function.name, arguments: call.function.arguments };
}

/** The function calls of a Responses stream put together from its events, and the event types. */
async function streamed(body) {
  const calls = {};
  const types = [];
  let final = null;
  let last = 0;
  for await (const event of await proxy.responses.create({ ...body, stream: true })) {
    assert.equal(event.sequence_number, last + 1);
    last = event.sequence_number;
    types.push(event.type);
    if (event.type === "response.output_item.added" && event.item.type === "function_call") {
      calls[event.item.id] = { call_id: event.item.call_id, name: event.item.name, arguments: "" };
    } else if (event.type === "response.function_call_arguments.delta") {
      calls[event.item_id].arguments += event.delta;
    } else if (event.type === "response.completed") {
      final = event.response;
    }
  }
  return { calls: Object.values(calls), types, final };
}

const pick = (output) => output.filter((item) => item.type === "function_call")
  .map(({ call_id, name, arguments: args }) => ({ call_id, name, arguments: args }));

await run({
  async "streamed function call"() {
    const { faulty, clean } = question();
    const got = await streamed({ model: "gpt-4o-mini", input: faulty, tools });
    assert.deepEqual(got.calls, [await directCall(clean)]);
    assert.deepEqual(pick(got.final.output), got.calls);
    assert.ok(got.types.includes("response.function_call_arguments.done"));
  },

  async "function call output round trip"() {
    const { clean } = question();
    const first = await proxy.responses.create({ model: "gpt-4o-mini", input: clean, tools });
    const [call] = pick(first.output);
    assert.deepEqual(call, await directCall(clean));
    const second = await proxy.responses.create({
      model: "gpt-4o-mini", tools,
      input: [{ role: "user", content: clean }, ...first.output,
              { type: "function_call_output", call_id: call.call_id, output: '{"temp": 21}' }],
    });
    assert.ok(second.output_text.startsWith('get_weather returned {"temp": 21}.'), second.output_text);
  },

  async "stall in the middle of function-call arguments stays invisible"() {
    const { faulty, clean } = question("count=args stall_after=2 stall=30 times=1");
    const got = await streamed({ model: "gpt-4o-mini", input: faulty, tools });
    assert.deepEqual(got.calls, [await directCall(clean)]);
    assert.equal(got.types.filter((t) => t === "response.output_item.added").length, 1);
  },
});
