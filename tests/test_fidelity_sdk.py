"""Full answer fidelity through the OpenAI-compatible endpoint, driven by the official openai SDK.

Each answer is compared with what the simulator itself sends for the same conversation (asked
directly, with the same SDK): tool calls (id, name, arguments), the usage chunk, JSON-schema
content, reasoning and logprobs must come through as the upstream sent them, and a stall in the
middle of a tool call's arguments must stay invisible (the call is made again and matched, never
spliced). Runs in both virtualenvs (``-m upstream``): with openai 3.x as the client here and the
current adapter inside Daphne, and with openai 0.27.6 as both.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from tests.fixtures_servers import new_api_key

openai = pytest.importorskip("openai")
LEGACY = not hasattr(openai, "AsyncOpenAI")

pytestmark = pytest.mark.upstream

_unique = itertools.count()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "forecast",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "high": {"type": "integer", "minimum": -30, "maximum": 45}},
            "required": ["city", "high"],
        },
    },
}


def question(directive: str = "") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages with ``directive``, the same conversation without it) about the weather."""
    base = f"What is the weather in Paris today? #{next(_unique)}"
    faulty = f"{base} [[sim {directive}]]" if directive else base
    return [{"role": "user", "content": faulty}], [{"role": "user", "content": base}]


@pytest.fixture(scope="module")
def api_key(daphne: Any) -> str:
    return new_api_key(daphne, "fidelity")


class Client:
    """One chat-completions call, streamed (the chunks as dicts) or not, through either SDK generation."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self._client = None if LEGACY else openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                                             timeout=15)

    async def chunks(self, **kwargs: Any) -> list[dict[str, Any]]:
        if self._client is None:
            stream = await openai.ChatCompletion.acreate(api_base=self.base_url, api_key=self.api_key, stream=True,
                                                         request_timeout=15, **kwargs)
            return [chunk.to_dict_recursive() async for chunk in stream]
        stream = await self._client.chat.completions.create(stream=True, **kwargs)
        return [chunk.model_dump(exclude_unset=True) async for chunk in stream]

    async def completion(self, **kwargs: Any) -> dict[str, Any]:
        if self._client is None:
            answer = await openai.ChatCompletion.acreate(api_base=self.base_url, api_key=self.api_key,
                                                         request_timeout=15, **kwargs)
            result: dict[str, Any] = answer.to_dict_recursive()
            return result
        completion = await self._client.chat.completions.create(**kwargs)
        return completion.model_dump(exclude_unset=True)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


@pytest.fixture
async def proxy(daphne: Any, api_key: str) -> Any:
    client = Client(f"{daphne.url}/chat/v1", api_key)
    yield client
    await client.aclose()


@pytest.fixture
async def direct(sim: Any) -> Any:
    client = Client(sim.base_url, "sk-direct")
    yield client
    await client.aclose()


def deltas(chunks: list[dict[str, Any]], choice: int = 0) -> list[dict[str, Any]]:
    return [c["delta"] for chunk in chunks for c in chunk.get("choices") or [] if c["index"] == choice]


def tool_calls(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The streamed tool calls put together: [{"id", "name", "arguments"}] by index."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas(chunks):
        for piece in delta.get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.get("id") or ""
            function = piece.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for chunk in chunks for c in chunk.get("choices") or [] if c.get("finish_reason")]


def text(chunks: list[dict[str, Any]], field: str = "content") -> str:
    return "".join(delta.get(field) or "" for delta in deltas(chunks))


async def test_a_streamed_tool_call_comes_through_exactly(proxy: Client, direct: Client, sim: Any) -> None:
    messages, clean = question()
    ask = {"model": "gpt-4o-mini", "tools": [WEATHER, TIME], "stream_options": {"include_usage": True}}
    got = await proxy.chunks(messages=messages, **ask)
    expected = await direct.chunks(messages=clean, **ask)
    assert tool_calls(got) == tool_calls(expected)
    assert tool_calls(got)[0]["name"] == "get_weather"
    assert json.loads(tool_calls(got)[0]["arguments"]).keys() == {"city", "unit"}
    heads = [piece for delta in deltas(got) for piece in delta.get("tool_calls") or [] if piece.get("id")]
    assert heads[0]["type"] == "function" and heads[0]["function"]["arguments"] == ""
    assert finish_reasons(got) == ["tool_calls"]
    assert got[-1]["choices"] == [] and got[-1]["usage"] == expected[-1]["usage"]


async def test_parallel_tool_calls_keep_their_indexes(proxy: Client, direct: Client) -> None:
    messages, clean = question()
    ask = {"model": "gpt-4o-mini", "tools": [WEATHER, TIME], "parallel_tool_calls": True}
    got = tool_calls(await proxy.chunks(messages=messages, **ask))
    assert got == tool_calls(await direct.chunks(messages=clean, **ask))
    assert [call["name"] for call in got] == ["get_weather", "get_time"]


async def test_a_tool_result_round_trip(proxy: Client, direct: Client) -> None:
    messages, _ = question()
    first = await proxy.completion(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    follow_up = [*messages, {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
                 {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    got = await proxy.chunks(model="gpt-4o-mini", messages=follow_up, tools=[WEATHER])
    expected = await direct.chunks(model="gpt-4o-mini", messages=follow_up, tools=[WEATHER])
    assert text(got).startswith('get_weather returned {"temp": 21}.') and text(got) == text(expected)
    assert finish_reasons(got) == ["stop"]


async def test_a_stall_in_the_middle_of_tool_call_arguments_is_invisible(
    proxy: Client, direct: Client, sim: Any
) -> None:
    messages, clean = question("count=args stall_after=2 stall=30 times=1")
    got = await proxy.chunks(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    assert tool_calls(got) == tool_calls(await direct.chunks(model="gpt-4o-mini", messages=clean, tools=[WEATHER]))
    assert finish_reasons(got) == ["tool_calls"]
    attempts = [r for r in sim.requests() if r["faults"]]
    assert [r["attempt"] for r in attempts] == [1, 2] and attempts[0]["outcome"] == "client_disconnected"


async def test_usage_with_include_usage(proxy: Client, direct: Client) -> None:
    messages, clean = question()
    ask = {"model": "gpt-4o-mini", "stream_options": {"include_usage": True}}
    got = await proxy.chunks(messages=messages, **ask)
    expected = await direct.chunks(messages=clean, **ask)
    assert text(got) == text(expected)
    assert got[-1]["choices"] == [] and got[-1]["usage"] == expected[-1]["usage"]
    assert got[-1]["usage"]["completion_tokens"] > 0


async def test_a_json_schema_answer(proxy: Client, direct: Client) -> None:
    messages, clean = question()
    got = text(await proxy.chunks(model="gpt-4o-mini", messages=messages, response_format=SCHEMA))
    assert got == text(await direct.chunks(model="gpt-4o-mini", messages=clean, response_format=SCHEMA))
    value = json.loads(got)
    assert set(value) == {"city", "high"} and -30 <= value["high"] <= 45
    whole = await proxy.completion(model="gpt-4o-mini", messages=messages, response_format=SCHEMA)
    assert json.loads(whole["choices"][0]["message"]["content"]) == value


async def test_reasoning_logprobs_and_several_choices(proxy: Client, direct: Client) -> None:
    messages, clean = question()
    ask = {"model": "sim-reasoner", "logprobs": True, "top_logprobs": 2, "n": 2, "max_tokens": 12}
    got = await proxy.chunks(messages=messages, **ask)
    expected = await direct.chunks(messages=clean, **ask)
    for choice in (0, 1):
        assert [d for d in deltas(got, choice) if d.get("content") or d.get("reasoning_content")] == \
               [d for d in deltas(expected, choice) if d.get("content") or d.get("reasoning_content")]
    assert text(got, "reasoning_content") and text(got)
    logprobs = [c["logprobs"] for chunk in got for c in chunk["choices"] if c.get("logprobs")]
    assert logprobs == [c["logprobs"] for chunk in expected for c in chunk["choices"] if c.get("logprobs")]
    assert finish_by_choice(got) == finish_by_choice(expected) == {0: "length", 1: "length"}
    whole = await proxy.completion(messages=messages, **ask)
    assert [c["message"]["content"] for c in whole["choices"]] == [text(got, "content"), text_of(got, 1)]
    assert [c["finish_reason"] for c in whole["choices"]] == ["length", "length"]
    assert whole["choices"][0]["message"]["reasoning_content"] == text(got, "reasoning_content")


def finish_by_choice(chunks: list[dict[str, Any]]) -> dict[int, str]:
    return {c["index"]: c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")}


def text_of(chunks: list[dict[str, Any]], choice: int) -> str:
    return "".join(delta.get("content") or "" for delta in deltas(chunks, choice))


async def test_a_refusal(proxy: Client, direct: Client) -> None:
    messages, _ = question("refuse")
    got = await proxy.chunks(model="gpt-4o-mini", messages=messages)
    expected = await direct.chunks(model="gpt-4o-mini", messages=messages)
    assert text(got, "refusal") and text(got, "refusal") == text(expected, "refusal")
    assert not text(got)
    whole = await proxy.completion(model="gpt-4o-mini", messages=messages)
    assert whole["choices"][0]["message"]["refusal"] == text(got, "refusal")


@pytest.mark.parametrize(("fault", "status", "code"), [
    ("error=model_not_found", 404, "model_not_found"),
    ("error=context_length_exceeded", 400, "context_length_exceeded"),
    ("error=content_filter", 400, "content_filter"),
])
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "whole"])
async def test_request_errors_reach_the_client_as_what_they_are(
    proxy: Client, fault: str, status: int, code: str, streamed: bool
) -> None:
    messages, _ = question(fault)
    errors = (openai.error.OpenAIError,) if LEGACY else (openai.APIStatusError,)
    with pytest.raises(errors) as caught:
        if streamed:
            await proxy.chunks(model="gpt-4o-mini", messages=messages)
        else:
            await proxy.completion(model="gpt-4o-mini", messages=messages)
    error = caught.value
    body = error.json_body["error"] if LEGACY else error.body
    assert (error.http_status if LEGACY else error.status_code) == status
    assert body["code"] == code and body["type"] == "invalid_request_error"
    assert "check your message" not in body["message"]


async def test_the_200_waits_for_the_upstream_headers_at_most_keepalive(daphne: Any, api_key: str) -> None:
    """A slow upstream (headers after 0.8 s, KEEPALIVE 0.3 s): the 200 is committed after about
    KEEPALIVE, not before the upstream could refuse, and not after a gateway would give up."""
    import time

    import aiohttp

    from tests.fixtures_servers import LIVE_TIMEOUTS

    messages, _ = question("headers_delay=0.8")
    body = {"model": "gpt-4o-mini", "messages": messages, "stream": True}
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{daphne.url}/chat/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {api_key}"}) as response:
            waited = time.monotonic() - started
            text = await response.text()
    keepalive = LIVE_TIMEOUTS["KEEPALIVE"]
    assert response.status == 200
    assert keepalive * 0.9 <= waited < 0.75, waited  # the upstream answers its headers at 0.8 s
    assert text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("delay", "usage_arrives"), [(0.3, True), (1.5, False)], ids=["late", "never-in-time"])
async def test_a_late_usage_chunk_never_fails_a_finished_answer(
    proxy: Client, direct: Client, sim: Any, delay: float, usage_arrives: bool
) -> None:
    """The usage chunk comes ``delay`` s after the finish chunk (STALL is 0.5 s): in time it is passed
    on; too late, the finished answer still ends as it is, with no retry and no error."""
    messages, clean = question(f"usage_delay={delay}")
    ask = {"model": "gpt-4o-mini", "stream_options": {"include_usage": True}}
    got = await proxy.chunks(messages=messages, **ask)
    expected = await direct.chunks(messages=clean, **ask)
    assert text(got) == text(expected) and finish_reasons(got) == ["stop"]
    assert got[-1]["choices"] == []
    usage = got[-1].get("usage")
    if usage_arrives:  # (the directive counts as prompt tokens)
        assert usage["completion_tokens"] == expected[-1]["usage"]["completion_tokens"]
    else:
        assert usage is None
    assert [r["attempt"] for r in sim.requests() if r["faults"]] == [1]
