"""The simulator's Anthropic Messages mode, driven by the official ``anthropic`` SDK (and raw
aiohttp where the SDK would hide the wire): text, thinking and tool-use streams, non-streamed
answers, the same text as over Chat Completions, Anthropic's error shapes, pings-only streams and
the in-band ``overloaded_error``. Runs with ``-o asyncio_mode=auto``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from chatproxy.simulator.process import SimulatorProcess
from chatproxy.simulator.text import answer_tokens

anthropic = pytest.importorskip("anthropic")

MODEL = "claude-sim"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def sim(isolated_sim: SimulatorProcess) -> SimulatorProcess:
    return isolated_sim


def client_for(sim: SimulatorProcess, read: float = 5.0) -> Any:
    return anthropic.AsyncAnthropic(
        base_url=sim.url, api_key="sk-ant-test", max_retries=0, timeout=anthropic.Timeout(read, connect=2.0)
    )


@pytest_asyncio.fixture
async def claude(sim: SimulatorProcess) -> AsyncIterator[Any]:
    client = client_for(sim)
    yield client
    await client.close()


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def raw_events(sim: SimulatorProcess, body: dict[str, Any]) -> list[tuple[str, str]]:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/messages", json=body, headers=headers) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
    for frame in raw.split("\n\n"):
        if frame:
            name, data = frame.split("\n", 1)
            events.append((name.removeprefix("event: "), data.removeprefix("data: ")))
    return events


async def test_text_stream_and_whole_answer_match_chat_completions(claude: Any, sim: SimulatorProcess) -> None:
    expected = "".join(answer_tokens([{"role": "system", "content": "Be brief."}, *user("Describe the sea.")]))
    whole = await claude.messages.create(
        model=MODEL, max_tokens=100, system="Be brief.", messages=user("Describe the sea.")
    )
    assert whole.content[0].text == expected and whole.stop_reason == "end_turn"
    assert whole.usage.output_tokens == 20
    async with claude.messages.stream(
        model=MODEL, max_tokens=100, system="Be brief.", messages=user("Describe the sea.")
    ) as stream:
        pieces = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == expected and len(pieces) == 20
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 20
    assert [r["api"] for r in sim.requests()] == ["messages", "messages"]


async def test_wire_events_in_order(sim: SimulatorProcess) -> None:
    events = await raw_events(
        sim, {"model": MODEL, "max_tokens": 2, "messages": user("q [[sim chunks=5]]"), "stream": True}
    )
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"stop_reason":"max_tokens"' in events[-2][1] and '"output_tokens":2' in events[-2][1]


async def test_thinking_then_text(claude: Any) -> None:
    async with claude.messages.stream(
        model=MODEL,
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=user("q [[sim chunks=3]]"),
    ) as stream:
        kinds = [e.delta.type async for e in stream if e.type == "content_block_delta"]
        final = await stream.get_final_message()
    assert kinds == ["thinking_delta"] * 8 + ["signature_delta"] + ["text_delta"] * 3
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].signature


async def test_tool_use_stream_and_round_trip(claude: Any) -> None:
    msgs: list[Any] = user("Weather in Paris?")
    async with claude.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=msgs) as stream:
        partial = [e.delta.partial_json async for e in stream if e.type == "content_block_delta"]
        final = await stream.get_final_message()
    (use,) = final.content
    assert final.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "get_weather"
    assert use.id.startswith("toolu_") and set(use.input) == {"city"} and len(partial) > 3
    whole = await claude.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=msgs)
    assert whole.content[0].input == use.input and whole.content[0].id == use.id
    msgs += [
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, clear"}]},
    ]
    answer = await claude.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=msgs)
    assert answer.content[0].text.startswith("get_weather returned 21 C, clear. ") and answer.stop_reason == "end_turn"


async def test_errors_use_anthropic_shapes(claude: Any, sim: SimulatorProcess) -> None:
    async with aiohttp.ClientSession() as session:  # the SDK itself refuses to send these
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        async with session.post(
            f"{sim.url}/v1/messages", json={"model": MODEL, "messages": user("q")}, headers=headers
        ) as r:
            assert r.status == 400 and (await r.json())["error"] == {
                "type": "invalid_request_error",
                "message": "max_tokens: Field required",
            }
        async with session.post(f"{sim.url}/v1/messages", json={}, headers={"x-api-key": "k"}) as r:
            assert r.status == 400 and "anthropic-version" in (await r.json())["error"]["message"]
    with pytest.raises(anthropic.InternalServerError) as info:
        await claude.messages.create(model=MODEL, max_tokens=10, messages=user("q [[sim error=overloaded]]"))
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    sim.set_fault(MODEL, "status=429 retry_after=120")
    with pytest.raises(anthropic.RateLimitError) as limited:
        await claude.messages.create(model=MODEL, max_tokens=10, messages=user("q"))
    assert limited.value.response.headers["retry-after"] == "120"
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    sim.set_fault(MODEL, "error=context_length_exceeded")
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await claude.messages.create(model=MODEL, max_tokens=10, messages=user("q"))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/messages", json={}, headers={"anthropic-version": "2023-06-01"}) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"


async def test_pings_only_is_a_stall_the_pings_do_not_hide(sim: SimulatorProcess) -> None:
    started = time.monotonic()
    body = {"model": MODEL, "max_tokens": 10, "messages": user("q [[sim pings_only]]"), "stream": True}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/messages", json=body, headers=headers) as resp:
            frames = []
            while time.monotonic() - started < 0.7:
                frames.append(await resp.content.readuntil(b"\n\n"))
    assert len(frames) >= 2 and set(frames) == {b'event: ping\ndata: {"type": "ping"}\n\n'}
    stats = await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1)
    assert stats["requests"][-1]["keepalives"] >= 2 and stats["requests"][-1]["first_chunk"] is None


async def test_in_band_overloaded_error_after_the_200(claude: Any) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        async with claude.messages.stream(
            model=MODEL, max_tokens=100, messages=user("q [[sim error_after=3]]")
        ) as stream:
            pieces = []
            async for text in stream.text_stream:
                pieces.append(text)
    assert len(pieces) == 3
    assert info.value.body["error"]["type"] == "overloaded_error"


async def test_stall_and_reset_mid_stream(sim: SimulatorProcess) -> None:
    client = client_for(sim, read=0.3)
    pieces: list[str] = []
    try:
        with pytest.raises(anthropic.APITimeoutError):
            async with client.messages.stream(
                model=MODEL, max_tokens=100, messages=user("q [[sim stall_after=4 stall=5]]")
            ) as stream:
                async for text in stream.text_stream:
                    pieces.append(text)
        assert len(pieces) == 4
        with pytest.raises(anthropic.APIConnectionError):
            async with client.messages.stream(
                model=MODEL, max_tokens=100, tools=[WEATHER], messages=user("Weather? [[sim count=args reset_after=2]]")
            ) as stream:
                async for _ in stream:
                    pass
    finally:
        await client.close()
    assert sim.requests()[-1]["outcome"] == "reset"


async def test_usage_delay_holds_the_end_of_the_message(sim: SimulatorProcess) -> None:
    started = time.monotonic()
    events = await raw_events(
        sim, {"model": MODEL, "max_tokens": 50, "messages": user("q [[sim chunks=3 usage_delay=0.3]]"), "stream": True}
    )
    assert time.monotonic() - started >= 0.3
    assert [name for name, _ in events][-2:] == ["message_delta", "message_stop"]
