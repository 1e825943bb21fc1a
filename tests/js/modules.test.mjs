// The browser client's module layout: chatproxy.js, the public entry point, re-exports the public
// API from the modules beside it; those modules import each other without a cycle, by relative
// paths that a browser resolves under /static/chatproxy/ with no bundler.
// Run: node --test tests/js/

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { describe, test } from "node:test";

const STATIC = new URL("../../chatproxy/static/chatproxy/", import.meta.url);
const DEMO_TEMPLATE = new URL("../../templates/index.html", import.meta.url);
const ENTRY = "chatproxy.js";

/** The public API, by the module that defines each name. */
const PUBLIC_API = {
  "client.js": ["ChatProxyClient"],
  "demo.js": ["mountChat", "withDirective"],
  "endpoints.js": ["getCookie", "websocketUrl"],
  "events.js": ["TERMINAL_EVENTS"],
  "parser.js": ["SSEParser"],
  "reconnect.js": ["resumeDelayMs"],
  "resume.js": ["ResumeRecord", "recordedFinal"],
  "sse.js": ["streamChat"],
  "view.js": ["AnswerView"],
  "websocket.js": ["ChatProxySocket"],
};

const moduleFiles = () => readdirSync(STATIC).filter((name) => name.endsWith(".js")).sort();

/** The specifiers `file` imports or re-exports from (static `import` / `export ... from`). */
function importsOf(file) {
  const code = readFileSync(new URL(file, STATIC), "utf-8").replace(/\/\*[\s\S]*?\*\//g, "");
  const specifiers = [];
  const statement = /^(?:import|export)\b[^;]*?\bfrom\s*"([^"]+)"|^import\s*"([^"]+)"/gm;
  for (const match of code.matchAll(statement)) specifiers.push(match[1] ?? match[2]);
  assert.doesNotMatch(code, /\bimport\s*\(/, `${file}: a dynamic import() is not followed here`);
  return specifiers;
}

describe("the entry point", () => {
  test("re-exports exactly the public API, as the modules define it", async () => {
    const entry = await import(new URL(ENTRY, STATIC));
    const expected = Object.values(PUBLIC_API).flat().sort();
    assert.deepEqual(Object.keys(entry).sort(), expected);
    for (const [file, names] of Object.entries(PUBLIC_API)) {
      const module = await import(new URL(file, STATIC));
      for (const name of names) assert.equal(entry[name], module[name], `${name} from ${file}`);
    }
  });

  test("holds no code of its own", () => {
    const code = readFileSync(new URL(ENTRY, STATIC), "utf-8")
      .replace(/\/\*[\s\S]*?\*\//g, "")
      .replace(/^\s*\/\/.*$/gm, "");
    const statements = code.split(";").map((s) => s.trim()).filter(Boolean);
    for (const s of statements) assert.match(s, /^export \{[^}]*\} from "\.\/[a-z]+\.js"$/, s);
  });
});

describe("the module graph", () => {
  const graph = new Map(moduleFiles().map((file) => [file, importsOf(file)]));

  test("imports only files beside it, by paths a browser resolves as they are", () => {
    for (const [file, specifiers] of graph) {
      for (const specifier of specifiers) {
        // Flat and relative: Django's static files (and the package data glob
        // `static/chatproxy/*`) hold them side by side, wherever STATIC_URL points.
        assert.match(specifier, /^\.\/[a-z]+\.js$/, `${file} imports ${specifier}`);
        assert.ok(graph.has(specifier.slice(2)), `${file} imports ${specifier}, which is missing`);
      }
    }
  });

  test("has no cycle", () => {
    const done = new Set();
    const visit = (file, path) => {
      if (path.includes(file)) assert.fail(`import cycle: ${[...path, file].join(" -> ")}`);
      if (done.has(file)) return;
      for (const specifier of graph.get(file)) visit(specifier.slice(2), [...path, file]);
      done.add(file);
    };
    for (const file of graph.keys()) visit(file, []);
  });

  test("every module is reached from the entry point", () => {
    const reached = new Set();
    const walk = (file) => {
      if (reached.has(file)) return;
      reached.add(file);
      for (const specifier of graph.get(file)) walk(specifier.slice(2));
    };
    walk(ENTRY);
    assert.deepEqual([...reached].sort(), [...graph.keys()].sort());
  });
});

describe("the demo page", () => {
  test("preloads every module of the graph, and nothing else", () => {
    const html = readFileSync(DEMO_TEMPLATE, "utf-8");
    const preload = /<link rel="modulepreload" href="\{% static 'chatproxy\/([^']+)' %\}">/g;
    const preloaded = [...html.matchAll(preload)].map((match) => match[1]).sort();
    assert.deepEqual(preloaded, moduleFiles());
  });
});
