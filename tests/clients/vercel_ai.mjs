/** The Vercel AI SDK (`ai` + `@ai-sdk/openai-compatible`) against chatproxy (see common.mjs). */
import assert from "node:assert/strict";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { Output, generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";
import { FORECAST_SCHEMA, WEATHER_PARAMETERS, env, question, run } from "./common.mjs";

const provider = (baseURL, apiKey) =>
  createOpenAICompatible({ name: "chatproxy", baseURL, apiKey, includeUsage: true, supportsStructuredOutputs: true });
const proxy = provider(env.proxy, env.key)("gpt-4o-mini");
const direct = provider(env.sim, "sk-direct")("gpt-4o-mini");
const weather = (execute) =>
  tool({ description: "The weather", inputSchema: jsonSchema(WEATHER_PARAMETERS), ...(execute ? { execute } : {}) });

/** One streamed call: the tool calls (id, name, input), the raw argument deltas and the finish. */
async function streamedCall(model, prompt) {
  const result = streamText({ model, prompt, tools: { get_weather: weather() }, maxRetries: 0 });
  let argumentsText = "";
  for await (const part of result.fullStream) {
    if (part.type === "tool-input-delta") argumentsText += part.delta;
    if (part.type === "error") throw part.error;
  }
  const calls = (await result.toolCalls).map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input }));
  return { calls, argumentsText, finish: await result.finishReason, usage: await result.usage };
}

await run({
  async "streamed tool call"() {
    const { faulty, clean } = question();
    const got = await streamedCall(proxy, faulty);
    const expected = await streamedCall(direct, clean);
    assert.deepEqual(got.calls, expected.calls);
    assert.equal(got.calls[0].name, "get_weather");
    assert.equal(got.argumentsText, expected.argumentsText);
    assert.equal(got.finish, "tool-calls");
  },

  async "tool result round trip"() {
    const prompt = question().clean;
    const run = (model) =>
      generateText({ model, prompt, tools: { get_weather: weather(async () => ({ temp: 21 })) },
                     stopWhen: stepCountIs(2), maxRetries: 0 });
    const got = await run(proxy);
    const expected = await run(direct);
    assert.equal(got.steps.length, 2);
    assert.ok(got.text.startsWith('get_weather returned {"temp":21}.'), got.text);
    assert.equal(got.text, expected.text);
  },

  async "usage with include_usage"() {
    const { faulty, clean } = question();
    const got = streamText({ model: proxy, prompt: faulty, maxRetries: 0 });
    const expected = streamText({ model: direct, prompt: clean, maxRetries: 0 });
    assert.equal(await got.text, await expected.text);
    const usage = await got.usage;
    assert.ok(usage.outputTokens > 0 && usage.inputTokens > 0, JSON.stringify(usage));
    assert.equal(usage.totalTokens, (await expected.usage).totalTokens);
  },

  async "json schema answer"() {
    const { faulty, clean } = question();
    const output = Output.object({ schema: jsonSchema(FORECAST_SCHEMA) });
    const got = await generateText({ model: proxy, prompt: faulty, output, maxRetries: 0 });
    const expected = await generateText({ model: direct, prompt: clean, output, maxRetries: 0 });
    assert.deepEqual(got.output, expected.output);
    assert.deepEqual(Object.keys(got.output).sort(), ["city", "high"]);
  },

  async "stall in the middle of tool-call arguments stays invisible"() {
    const { faulty, clean } = question("count=args stall_after=2 stall=30 times=1");
    const got = await streamedCall(proxy, faulty);
    const expected = await streamedCall(direct, clean);
    assert.deepEqual(got.calls, expected.calls);
    assert.equal(got.argumentsText, expected.argumentsText);
    assert.equal(got.finish, "tool-calls");
  },
});
