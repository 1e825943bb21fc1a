"""Tool calls, reasoning and usage on the native ways in: ``tool_call`` / ``reasoning`` events on
SSE (a real Daphne) and the same frames on the WebSocket, both streaming from the simulator."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from tests import test_websocket
from tests.sseclient import read_sse
from tests.test_fidelity_sdk import WEATHER, question
from tests.test_websocket import frames_until_end

# The WebSocket module's fixtures, used here as they are.
chatproxy_settings = test_websocket.chatproxy_settings
ws = test_websocket.ws

pytestmark = pytest.mark.upstream


async def sse(client: aiohttp.ClientSession, body: dict[str, Any]) -> Any:
    async with client.post("/chat/stream/", json=body) as response:
        return await read_sse(response, time.monotonic())


def assembled(calls: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """``tool_call`` event data put together by index (what a page shows)."""
    whole: dict[int, dict[str, str]] = {}
    for call in calls:
        into = whole.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
        for key in into:
            into[key] += call[key] or ""
    return whole


async def test_sse_tool_call_events_and_usage(client: aiohttp.ClientSession, sim: Any) -> None:
    messages, _ = question("count=args stall_after=2 stall=30 times=1")
    result = await sse(client, {"messages": messages, "tools": [WEATHER]})
    calls = [event.data for event in result.named("tool_call")]
    assert set(calls[0]) == {"index", "id", "name", "arguments"}
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert all(call["id"] is None and call["name"] is None for call in calls[1:])
    whole = assembled(calls)
    assert set(json.loads(whole[0]["arguments"])) == {"city", "unit"}
    assert [event.event for event in result.events].count("reset") == 0  # the restart matched the call
    done = result.named("done")[0].data
    assert done["finish_reason"] == "tool_calls" and done["usage"]["completion_tokens"] > 0 and done["attempts"] == 2


async def test_sse_reasoning_events(client: aiohttp.ClientSession, sim: Any) -> None:
    messages, _ = question()
    result = await sse(client, {"messages": messages, "model": "sim-reasoner"})
    reasoning = result.named("reasoning")
    assert reasoning and all(event.data["field"] == "reasoning_content" for event in reasoning)
    names = [event.event for event in result.events]
    assert names.index("reasoning") < names.index("delta")


async def test_native_tool_fields_are_checked(client: aiohttp.ClientSession) -> None:
    messages, _ = question()
    async with client.post("/chat/stream/", json={"messages": messages, "tool_choice": "auto"}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["message"] == "'tool_choice' needs 'tools'."


async def test_websocket_tool_call_frames(ws: Any, sim: Any) -> None:
    messages, _ = question()
    await ws.send_json_to({"type": "chat", "request_id": "t1", "messages": messages, "tools": [WEATHER]})
    frames = await frames_until_end(ws, {"t1"})
    calls = [frame for frame in frames if frame["type"] == "tool_call"]
    assert calls and all(frame["request_id"] == "t1" for frame in calls)
    assert calls[0]["name"] == "get_weather"
    assert set(json.loads(assembled(calls)[0]["arguments"])) == {"city", "unit"}
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "tool_calls"
