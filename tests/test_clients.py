"""Third-party clients against chatproxy's OpenAI-compatible endpoint (Daphne + the simulator).

Each client does what apps built on it do: a streamed tool call (name and arguments exact), a
tool-result round trip, usage with ``include_usage``, a JSON-schema answer, and a stall in the
middle of a tool call's arguments that it never notices. Every answer is compared with the
simulator's own answer to the same conversation, asked directly with the same client.

* the official ``openai`` Node SDK and the Vercel AI SDK (``ai`` + ``@ai-sdk/openai-compatible``):
  the scripts in ``tests/clients/`` (pinned in its package-lock.json; ``npm ci`` there installs
  them), run with node; the Node SDK's Responses API (``responses.create`` with function tools)
  too;
* LangChain's ``ChatOpenAI`` with ``bind_tools`` (``langchain-openai``, requirements-test.txt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_servers import new_api_key

CLIENTS = Path(__file__).resolve().parent / "clients"


@pytest.fixture(scope="module")
def api_key(daphne: Any) -> str:
    return new_api_key(daphne, "clients")


SCENARIOS = [
    "streamed tool call",
    "tool result round trip",
    "usage with include_usage",
    "json schema answer",
    "stall in the middle of tool-call arguments stays invisible",
]


def _run_node(script: str, daphne: Any, api_key: str, sim: Any) -> subprocess.CompletedProcess[str]:
    """Run one client script against chatproxy and the simulator; it must exit 0."""
    node = shutil.which("node")
    if node is None or not (CLIENTS / "node_modules").is_dir():
        pytest.fail("node and tests/clients/node_modules are needed: run `npm ci` in tests/clients")
    env = {"PATH": str(Path(node).parent), "PROXY_URL": f"{daphne.url}/chat/v1", "API_KEY": api_key,
           "SIM_URL": sim.base_url, "NODE_NO_WARNINGS": "1"}
    done = subprocess.run([node, script], cwd=CLIENTS, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("script", ["openai_node.mjs", "vercel_ai.mjs"])
def test_javascript_clients(script: str, daphne: Any, api_key: str, sim: Any) -> None:
    done = _run_node(script, daphne, api_key, sim)
    assert done.stdout.split("\n")[:-1] == [f"ok {name}" for name in SCENARIOS]
    stalled = [r for r in sim.requests() if r["faults"].get("stall_after") == 2]
    assert [r["attempt"] for r in stalled] == [1, 2], "the stall scenario did not make two attempts"


def test_openai_node_responses_function_calls(daphne: Any, api_key: str, sim: Any) -> None:
    """The Node SDK's ``responses.create`` with function tools: the same tool call the simulator
    makes, a ``function_call_output`` round trip, and a stall inside the arguments it never sees."""
    done = _run_node("openai_node_responses.mjs", daphne, api_key, sim)
    assert done.stdout.split("\n")[:-1] == [f"ok {name}" for name in (
        "streamed function call", "function call output round trip",
        "stall in the middle of function-call arguments stays invisible")]
    stalled = [r for r in sim.requests() if r["faults"].get("stall_after") == 2]
    assert [r["attempt"] for r in stalled] == [1, 2], "the stall scenario did not make two attempts"


# --------------------------------------------------------------------------- LangChain


def weather_tool() -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


_asked = iter(range(1_000_000))


def question(directive: str = "") -> tuple[str, str]:
    base = f"What is the weather in Paris today? #langchain-{next(_asked)}"
    return (f"{base} [[sim {directive}]]" if directive else base), base


@pytest.fixture
async def chat(daphne: Any, api_key: str, sim: Any) -> Any:
    """``make(direct=False, **options)``: a ``ChatOpenAI`` on chatproxy (or on the simulator itself).

    Each test's models share one HTTP client of its own: LangChain's default one is cached for the
    process, and its connections would outlive the test's event loop."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import openai

    http = openai.DefaultAsyncHttpxClient()

    def make(direct: bool = False, **kwargs: Any) -> Any:
        url, key = (sim.base_url, "sk-direct") if direct else (f"{daphne.url}/chat/v1", api_key)
        return langchain_openai.ChatOpenAI(model="gpt-4o-mini", base_url=url, api_key=key, max_retries=0,
                                           timeout=15, http_async_client=http, **kwargs)
    yield make
    await http.aclose()


async def streamed_message(model: Any, prompt: Any) -> Any:
    message = None
    async for chunk in model.astream(prompt):
        message = chunk if message is None else message + chunk
    return message


async def test_langchain_streamed_tool_call_with_bind_tools(chat: Any) -> None:
    faulty, clean = question()
    got = await streamed_message(chat().bind_tools([weather_tool()]), faulty)
    expected = await streamed_message(chat(direct=True).bind_tools([weather_tool()]), clean)
    assert got.tool_calls == expected.tool_calls
    assert got.tool_calls[0]["name"] == "get_weather" and set(got.tool_calls[0]["args"]) == {"city", "unit"}
    assert got.response_metadata["finish_reason"] == "tool_calls"


async def test_langchain_tool_result_round_trip(chat: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    history: list[Any] = [HumanMessage(question()[1])]
    model = chat().bind_tools([weather_tool()])
    first = await model.ainvoke(history)
    call = first.tool_calls[0]
    history += [first, ToolMessage(content=json.dumps({"temp": 21}), tool_call_id=call["id"])]
    got = await streamed_message(model, history)
    expected = await streamed_message(chat(direct=True).bind_tools([weather_tool()]), history)
    assert got.content.startswith('get_weather returned {"temp": 21}.') and got.content == expected.content


async def test_langchain_usage_with_include_usage(chat: Any) -> None:
    faulty, clean = question()
    got = await streamed_message(chat(stream_usage=True), faulty)
    expected = await streamed_message(chat(direct=True, stream_usage=True), clean)
    assert got.content == expected.content
    assert got.usage_metadata == expected.usage_metadata and got.usage_metadata["output_tokens"] > 0


async def test_langchain_json_schema_answer(chat: Any) -> None:
    schema = {"title": "forecast", "type": "object", "required": ["city", "high"],
              "properties": {"city": {"type": "string"}, "high": {"type": "integer", "minimum": -30, "maximum": 45}}}
    faulty, clean = question()
    got = await chat().with_structured_output(schema, method="json_schema").ainvoke(faulty)
    expected = await chat(direct=True).with_structured_output(schema, method="json_schema").ainvoke(clean)
    assert got == expected and set(got) == {"city", "high"}


async def test_langchain_stall_in_tool_call_arguments_is_invisible(chat: Any, sim: Any) -> None:
    faulty, clean = question("count=args stall_after=2 stall=30 times=1")
    got = await streamed_message(chat().bind_tools([weather_tool()]), faulty)
    expected = await streamed_message(chat(direct=True).bind_tools([weather_tool()]), clean)
    assert got.tool_calls == expected.tool_calls
    assert [r["attempt"] for r in sim.requests() if r["faults"]] == [1, 2]
