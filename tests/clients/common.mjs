/**
 * common.mjs: what the client scripts share. Each script is run by tests/test_clients.py with
 * PROXY_URL (chatproxy's /chat/v1), API_KEY (a chatproxy key) and SIM_URL (the simulator's /v1,
 * asked directly for the answer to compare with). A script prints one "ok <name>" line per
 * scenario and exits non-zero on the first failure.
 */

export const env = {
  proxy: mustHave("PROXY_URL"),
  key: mustHave("API_KEY"),
  sim: mustHave("SIM_URL"),
};

function mustHave(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

let counter = 0;

/** A user message about the weather, unique per call (the simulator counts `times=N` per text). */
export function question(directive = "") {
  const base = `What is the weather in Paris today? #${process.pid}-${Date.now()}-${counter++}`;
  return { faulty: directive ? `${base} [[sim ${directive}]]` : base, clean: base };
}

export const WEATHER_PARAMETERS = {
  type: "object",
  properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
  required: ["city", "unit"],
};

export const FORECAST_SCHEMA = {
  type: "object",
  properties: { city: { type: "string" }, high: { type: "integer", minimum: -30, maximum: 45 } },
  required: ["city", "high"],
};

/** Run the scenarios in order: "ok <name>" each, or the error and exit code 1. */
export async function run(scenarios) {
  for (const [name, scenario] of Object.entries(scenarios)) {
    try {
      await scenario();
      console.log(`ok ${name}`);
    } catch (error) {
      console.log(`FAILED ${name}`);
      console.error(error);
      process.exit(1);
    }
  }
}
