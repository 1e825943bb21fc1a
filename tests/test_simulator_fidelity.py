"""The simulator's per-model fault rules and its Chat Completions fidelity, through the real
current openai SDK: tool calls (streamed and whole, parallel, round trips), usage, JSON output,
``n``, logprobs, reasoning deltas, refusals, named request errors, and faults inside tool-call
arguments. Runs with ``-o asyncio_mode=auto``."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatproxy.simulator.answers import AnswerRequest, ToolSpec, plan_answer, schema_value
from chatproxy.simulator.faults import DirectiveError, FaultRules, Faults
from chatproxy.simulator.process import SimulatorProcess
from chatproxy.simulator.text import answer_tokens

httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")

MODEL = "gpt-4o-mini"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "number"},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "mood": {"enum": ["calm", "busy"]},
    },
    "required": ["title", "score", "count", "ok", "tags", "mood"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def ruled() -> Iterator[SimulatorProcess]:
    """An instance started with a rule: gpt-4o always answers 503 there."""
    with SimulatorProcess(quiet=True, faults={"gpt-4o": "status=503"}) as proc:
        yield proc


@pytest.fixture
def sim(isolated_sim: SimulatorProcess) -> SimulatorProcess:
    return isolated_sim


def client_for(sim: SimulatorProcess, read: float = 5.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=openai.Timeout(read, connect=2.0)
    )


@pytest_asyncio.fixture
async def oai(sim: SimulatorProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    client = client_for(sim)
    yield client
    await client.close()


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def tool_stream(stream: Any) -> tuple[dict[int, dict[str, str]], list[Any]]:
    """Tool calls assembled from ``delta.tool_calls`` the way clients do, and the raw chunks."""
    calls: dict[int, dict[str, str]] = {}
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return calls, chunks


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_rules_match_exact_before_glob_and_count_times() -> None:
    rules = FaultRules({"gpt-*": "stall_first=5"})
    rules.set("gpt-4o", "status=503 times=2")
    assert rules.match("gpt-4o").model == "gpt-4o"  # type: ignore[union-attr]
    assert rules.match("gpt-4o-mini").model == "gpt-*"  # type: ignore[union-attr]
    assert rules.match("claude") is None
    rule = rules.match("gpt-4o")
    assert rule is not None
    rule.hits = 2  # used up: the glob applies again
    assert rules.match("gpt-4o").model == "gpt-*"  # type: ignore[union-attr]
    rules.reset()
    assert [r["model"] for r in rules.as_list()] == ["gpt-*"]
    with pytest.raises(DirectiveError, match="stall_aftr"):
        rules.set("x", "stall_aftr=3")


def test_schema_values_match_their_schema() -> None:
    import random

    value = schema_value(SCHEMA, random.Random(1))
    assert list(value) == list(SCHEMA["properties"])
    assert isinstance(value["title"], str) and isinstance(value["score"], float)
    assert isinstance(value["count"], int) and isinstance(value["ok"], bool)
    assert all(isinstance(t, str) for t in value["tags"]) and value["mood"] in ("calm", "busy")


def test_plan_is_deterministic_and_per_model_only_when_asked() -> None:
    msgs = user("Weather in Paris?")
    tools = (ToolSpec("get_weather", WEATHER["function"]["parameters"]),)  # type: ignore[index]
    one = plan_answer(AnswerRequest(model="a", messages=msgs, faults=Faults(), tools=tools))
    two = plan_answer(AnswerRequest(model="b", messages=msgs, faults=Faults(), tools=tools))
    assert one[0].calls == two[0].calls and one[0].finish == "tool_calls"
    text_a = plan_answer(AnswerRequest(model="a", messages=msgs, faults=Faults(per_model=True)))[0]
    text_b = plan_answer(AnswerRequest(model="b", messages=msgs, faults=Faults(per_model=True)))[0]
    assert text_a.text("content") != text_b.text("content")
    assert plan_answer(AnswerRequest(model="a", messages=msgs, faults=Faults()))[0].text("content") == "".join(
        answer_tokens(msgs)
    )


# ---------------------------------------------------------------------------------------------
# Per-model rules on an instance
# ---------------------------------------------------------------------------------------------


async def test_startup_rule_fails_one_model_only_and_instances_are_independent(
    ruled: SimulatorProcess, sim: SimulatorProcess
) -> None:
    ruled.reset()
    bad, good = client_for(ruled), client_for(sim)
    try:
        with pytest.raises(openai.InternalServerError):
            await bad.chat.completions.create(model="gpt-4o", messages=user("hi"), stream=True)
        ok = await bad.chat.completions.create(model=MODEL, messages=user("hi"))
        assert ok.choices[0].message.content == "".join(answer_tokens(user("hi")))
        # The same model on the other instance answers.
        other = await good.chat.completions.create(model="gpt-4o", messages=user("hi"))
        assert other.choices[0].message.content == ok.choices[0].message.content
    finally:
        await bad.close()
        await good.close()
    log = ruled.requests()
    assert [(r["model"], r["rule"], r["outcome"]) for r in log] == [
        ("gpt-4o", "gpt-4o", "status"),
        (MODEL, None, "complete"),
    ]
    assert [r["model"] for r in sim.requests()] == ["gpt-4o"]


async def test_runtime_rules_set_listed_cleared_and_reset(ruled: SimulatorProcess) -> None:
    ruled.reset()
    client = client_for(ruled, read=0.3)
    try:
        rules = ruled.set_fault("gpt-4o-mini", "status=429 retry_after=120")
        assert {r["model"] for r in rules} == {"gpt-4o", "gpt-4o-mini"}
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model=MODEL, messages=user("q"))
        assert info.value.response.headers["retry-after"] == "120"
        ruled.set_fault("gpt-4o-mini", "error=context_length_exceeded")
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL, messages=user("q"), stream=True)
        assert bad.value.code == "context_length_exceeded" and bad.value.param == "messages"
        ruled.set_fault("sim-*", "error=model_not_found")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="sim-fast", messages=user("q"))
        assert missing.value.code == "model_not_found" and "`sim-fast`" in missing.value.message
        ruled.set_fault("gpt-4o-mini", "stall_first=30")
        stream = await client.chat.completions.create(model=MODEL, messages=user("q"), stream=True)
        with pytest.raises(openai.APITimeoutError):
            async for _ in stream:
                pass
        ruled.set_fault("gpt-4o-mini", "reset_after=3 times=1")  # the rule's own uses
        with pytest.raises(openai.APIConnectionError):
            async for _ in await client.chat.completions.create(model=MODEL, messages=user("q"), stream=True):
                pass
        again = await client.chat.completions.create(model=MODEL, messages=user("q"))
        assert again.choices[0].finish_reason == "stop"
        with pytest.raises(ValueError, match="stall_aftr"):
            ruled.set_fault("x", "stall_aftr=1")
        assert [r["model"] for r in ruled.clear_faults("sim-*")] == ["gpt-4o", "gpt-4o-mini"]
        assert ruled.clear_faults() == []
        ruled.reset()
        assert [r["model"] for r in ruled.fault_rules()] == ["gpt-4o"]
    finally:
        await client.close()


async def test_message_directives_win_over_the_rule(ruled: SimulatorProcess) -> None:
    ruled.reset()
    client = client_for(ruled)
    try:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=user("q [[sim status=429]]"))
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


async def test_streamed_tool_call_matches_the_whole_one(oai: openai.AsyncOpenAI) -> None:
    msgs = user("What is the weather in Paris?")
    whole = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[TIME, WEATHER])
    calls, chunks = await tool_stream(
        await oai.chat.completions.create(
            model=MODEL, messages=msgs, tools=[TIME, WEATHER], stream=True, stream_options={"include_usage": True}
        )
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"  # named in the question
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit", "days"} and args["unit"] in ("celsius", "fahrenheit")
    assert 1 <= args["days"] <= 7
    assert calls == {0: {"id": call.id, "name": "get_weather", "arguments": call.function.arguments}}
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    head = first.choices[0].delta.tool_calls[0]
    assert head.id.startswith("call_") and head.type == "function" and head.function.arguments == ""
    fragments = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls][1:]
    assert len(fragments) > 3 and all(f.choices[0].delta.tool_calls[0].id is None for f in fragments)
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 1 + len(fragments)


async def test_parallel_calls_forced_choice_and_none(oai: openai.AsyncOpenAI) -> None:
    msgs = user("Weather and time, please")
    both = await oai.chat.completions.create(
        model=MODEL, messages=msgs, tools=[WEATHER, TIME], parallel_tool_calls=True
    )
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    assert len({c.id for c in both.choices[0].message.tool_calls}) == 2
    calls, _ = await tool_stream(
        await oai.chat.completions.create(
            model=MODEL, messages=msgs, tools=[WEATHER, TIME], parallel_tool_calls=True, stream=True
        )
    )
    assert [calls[i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    forced = await oai.chat.completions.create(
        model=MODEL,
        messages=msgs,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert forced.choices[0].message.tool_calls[0].function.name == "get_time"
    assert forced.choices[0].message.tool_calls[0].function.arguments == "{}"
    none = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"


async def test_tool_result_round_trip(oai: openai.AsyncOpenAI) -> None:
    msgs: list[Any] = user("Weather in Paris?")
    first = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    msgs += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21, "sky": "clear"}'},
    ]
    stream = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith('get_weather returned {"temp": 21, "sky": "clear"}. ')
    whole = await oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER])
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"tools": [{"type": "function"}]}, "tools[0].function", "Missing required parameter"),
        ({"tools": [{"type": "fn", "function": {"name": "x"}}]}, "tools[0].type", "Supported values"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "pattern"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
            "Invalid schema",
        ),
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
        ({"response_format": {"type": "json_object"}}, "messages", "must contain the word 'json'"),
        ({"n": 0}, "n", "below minimum"),
        ({"top_logprobs": 3}, "top_logprobs", "'logprobs' must be set"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ],
)
async def test_malformed_requests_are_openai_400s(
    oai: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str, fragment: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=MODEL, messages=user("q"), **kwargs)
    assert info.value.param == param and fragment in info.value.message


async def test_tool_messages_must_answer_tool_calls(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="preceeding message with 'tool_calls'"):
        await oai.chat.completions.create(
            model=MODEL, messages=[*user("q"), {"role": "tool", "tool_call_id": "call_x", "content": "1"}]
        )
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError, match="call_1"):
        await oai.chat.completions.create(
            model=MODEL, messages=[*user("q"), {"role": "assistant", "tool_calls": [call]}, *user("again")]
        )


async def test_stall_and_reset_inside_tool_call_arguments(sim: SimulatorProcess) -> None:
    client = client_for(sim, read=0.3)
    calls: dict[int, dict[str, str]] = {}
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=user("Weather? [[sim count=args stall_after=2 stall=5]]"),
            tools=[WEATHER],
            stream=True,
        )
        with pytest.raises(openai.APITimeoutError):
            calls, _ = await tool_stream(stream)
    finally:
        await client.close()
    record = sim.requests()[-1]
    assert record["chunks"] == 3 and record["outcome"] == "client_disconnected"  # the call's head + 2 fragments
    client = client_for(sim)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user("Weather? [[sim count=args reset_after=3]]"), tools=[WEATHER], stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            await tool_stream(stream)
    finally:
        await client.close()
    assert not calls
    assert sim.requests()[-1]["outcome"] == "reset" and sim.requests()[-1]["chunks"] == 4


# ---------------------------------------------------------------------------------------------
# Usage, JSON, n, logprobs, reasoning, refusals, length
# ---------------------------------------------------------------------------------------------


async def test_usage_chunk_comes_after_the_finish_chunk(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim chunks=4]]"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 4
    assert usage.total_tokens == usage.prompt_tokens + 4 and usage.completion_tokens_details.reasoning_tokens == 0
    plain = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim chunks=4]]"))
    assert plain.usage.model_dump() == usage.model_dump()


async def test_json_schema_and_json_object_answers(oai: openai.AsyncOpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    whole = await oai.chat.completions.create(model=MODEL, messages=user("Review it"), response_format=fmt)  # type: ignore[arg-type]
    value = json.loads(whole.choices[0].message.content)
    assert list(value) == list(SCHEMA["properties"]) and value["mood"] in ("calm", "busy")  # type: ignore[arg-type]
    stream = await oai.chat.completions.create(
        model=MODEL,
        messages=user("Review it"),
        response_format=fmt,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 5
    obj = await oai.chat.completions.create(
        model=MODEL, messages=user("Answer in JSON"), response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(obj.choices[0].message.content)["answer"], str)


async def test_n_choices_are_distinct_and_interleaved(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim chunks=5]]"), n=3)
    texts = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts[0] == "".join(answer_tokens(user("q"), n=5))
    stream = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim chunks=5]]"), n=3, stream=True)
    got: dict[int, str] = {0: "", 1: "", 2: ""}
    finishes = {}
    async for chunk in stream:
        (choice,) = chunk.choices
        got[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert [got[i] for i in range(3)] == texts and finishes == {0: "stop", 1: "stop", 2: "stop"}


async def test_logprobs_per_token(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim chunks=3]]"), logprobs=True, top_logprobs=2, stream=True
    )
    entries = [e async for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 3 and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    assert entries[0].top_logprobs[0].token == entries[0].token
    whole = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim chunks=3]]"), logprobs=True)
    assert [e.token for e in whole.choices[0].logprobs.content] == [e.token for e in entries]


async def test_reasoning_deltas_come_before_content(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="sim-reasoner", messages=user("q [[sim chunks=3]]"), stream=True)
    kinds = []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            kinds.append("r")
        elif delta.content:
            kinds.append("c")
    assert kinds == ["r"] * 8 + ["c"] * 3
    whole = await oai.chat.completions.create(
        model="o3-mini", messages=user("q [[sim chunks=3 reasoning=2]]"), stream_options=None
    )
    assert len(whole.choices[0].message.model_extra["reasoning_content"].split()) == 2
    assert whole.usage.completion_tokens_details.reasoning_tokens == 2
    plain = await oai.chat.completions.create(model=MODEL, messages=user("q"))
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


async def test_refusal_and_length_and_content_filter(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim refuse]]"), stream=True)
    chunks = [c async for c in stream]
    refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks)
    assert refusal.startswith("I'm sorry") and not any(c.choices[0].delta.content for c in chunks)
    whole = await oai.chat.completions.create(model=MODEL, messages=user("q [[sim refuse]]"))
    assert whole.choices[0].message.refusal == refusal and whole.choices[0].message.content is None
    cut = await oai.chat.completions.create(model=MODEL, messages=user("Weather?"), tools=[WEATHER], max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    filtered = await oai.chat.completions.create(
        model=MODEL, messages=user("q [[sim content_filter_after=2]]"), stream=True
    )
    chunks = [c async for c in filtered]
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 2


async def test_usage_delay_is_silence_between_the_finish_and_the_usage_chunk(sim: Any) -> None:
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "q [[sim chunks=3 usage_delay=0.3]]"}]}
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.base_url}/chat/completions", json=body,
                                headers={"Authorization": "Bearer k"}) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    arrivals.append((time.monotonic(), line))
    finish = next(at for at, line in arrivals if b'"finish_reason":"stop"' in line)
    usage = next(at for at, line in arrivals if b'"choices":[]' in line)
    # Measured at the client: the finish line can be read a little late (the loop was busy) while the
    # usage line comes on time, so the gap seen can be a hair under the 0.3 s slept. Without the delay
    # the two lines arrive within milliseconds, so a 0.25 s floor still proves the silence.
    assert usage - finish >= 0.25
    assert arrivals[-1][1].strip() == b"data: [DONE]"
