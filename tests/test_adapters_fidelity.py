"""Every upstream adapter (both SDK generations and the SDK-less one) yields what a chunk carries:
a plain ``str`` for a lone text delta, the chunk's ``choices`` as sent for anything more."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatproxy.upstream import build_upstream
from chatproxy.upstream.base import Upstream, UpstreamRequest
from tests.test_adapters import ADAPTERS
from tests.test_fidelity_sdk import WEATHER

pytestmark = pytest.mark.upstream


@pytest.fixture(params=ADAPTERS, ids=["-".join(adapter) for adapter in ADAPTERS])
async def adapter(request: pytest.FixtureRequest, sim: Any) -> AsyncIterator[Upstream]:
    sdk, http_client = request.param
    upstream = build_upstream(sdk=sdk, http_client=http_client, base_url=sim.base_url, api_key="sk-test")
    yield upstream
    await upstream.aclose()


async def items(adapter: Upstream, model: str = "gpt-4o-mini", **params: Any) -> tuple[list[Any], Any]:
    request = UpstreamRequest(model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                              params=params, connect_timeout=2.0, total_timeout=10.0)
    stream = await adapter.open(request)
    try:
        got = [item async for item in stream]
    finally:
        await stream.aclose()
    return got, stream


def plain(value: Any) -> Any:
    """An SDK object (the legacy SDK's OpenAIObject) as plain JSON values."""
    return json.loads(json.dumps(value))


async def test_text_deltas_stay_plain_strings(adapter: Upstream) -> None:
    got, stream = await items(adapter)
    assert got and all(type(item) is str for item in got)
    assert stream.finish_reason == "stop" and stream.usage["completion_tokens"] == len(got)


async def test_a_tool_call_comes_as_its_choices(adapter: Upstream) -> None:
    got, stream = await items(adapter, tools=[WEATHER])
    assert all(isinstance(item, list) for item in got)
    first = plain(got[0])[0]
    call = first["delta"]["tool_calls"][0]
    assert (call["index"], call["type"], call["function"]) == (0, "function", {"name": "get_weather", "arguments": ""})
    arguments = "".join(plain(item)[0]["delta"]["tool_calls"][0]["function"]["arguments"] for item in got[1:])
    assert set(json.loads(arguments)) == {"city", "unit"}
    assert stream.finish_reason == "tool_calls" and stream.usage["completion_tokens"] == len(got)


async def test_reasoning_logprobs_and_other_choices_come_as_choices(adapter: Upstream) -> None:
    got, stream = await items(adapter, model="sim-reasoner", n=2, logprobs=True)
    choices = [choice for item in got for choice in plain(item)]
    assert {choice["index"] for choice in choices} == {0, 1}
    assert any(choice["delta"].get("reasoning_content") for choice in choices)
    assert all(choice["logprobs"]["content"] for choice in choices if choice["delta"].get("content"))
    assert stream.finish_reason == "stop"
