"""``POST /chat/stream/`` served by a real Daphne, streaming from the simulator over real HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import pytest

from tests.fixtures_servers import LIVE_RESUME, LIVE_TIMEOUTS
from tests.sseclient import read_sse

pytestmark = pytest.mark.upstream

TIMEOUTS = LIVE_TIMEOUTS
_unique = itertools.count()


def chat(directive: str = "", text: str = "Tell me about lakes") -> dict:
    message = f"{text} #{next(_unique)}" + (f" [[sim {directive}]]" if directive else "")
    return {"messages": [{"role": "user", "content": message}]}


async def stream(client: aiohttp.ClientSession, body: dict, **kwargs):
    started = time.monotonic()
    async with client.post("/chat/stream/", json=body) as response:
        return await read_sse(response, started, **kwargs)


async def test_headers_and_wire_format(client, sim):
    result = await stream(client, chat("chunks=8"))
    assert result.status == 200
    assert result.headers["Content-Type"].startswith("text/event-stream")
    assert result.headers["Cache-Control"] == "no-cache"
    assert result.headers["X-Accel-Buffering"] == "no"
    assert result.body.startswith(b": open\nretry: 3000\n\n")
    events = result.events
    assert events[0].event == "start" and events[-1].event == "done"
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert set(events[0].data) == {"stream_id", "model", "profile"}
    assert len(result.named("delta")) == 8 and result.text.strip()
    assert set(events[-1].data) == {"finish_reason", "attempts", "usage", "model"}


async def test_first_bytes_leave_before_the_upstream_answers(client, sim):
    result = await stream(client, chat("chunks=3 first_delay=0.8"))
    # Daphne sends headers only with the first body chunk: ": open" makes that immediate.
    assert result.first_byte - result.started < 0.4
    assert result.named("done")


async def test_keepalive_comments_while_upstream_is_silent(client, sim):
    result = await stream(client, chat("chunks=3 first_delay=0.9"))
    comments = [i for i in result.items if i.kind == "comment" and i.comment == "keepalive"]
    assert len(comments) >= 2
    times = [result.first_byte, *[c.at for c in comments], result.named("delta")[0].at]
    assert max(b - a for a, b in itertools.pairwise(times)) < TIMEOUTS["KEEPALIVE"] + 0.3


async def test_mid_stream_stall_is_recovered_with_exact_text(client, sim):
    body = chat("chunks=16 stall_after=5 stall=30 times=1")
    result = await stream(client, body)
    assert [r.data["reason"] for r in result.named("retry")] == ["stall"]
    assert not result.named("reset")
    content = body["messages"][0]["content"].split(" [[")[0] + " [[sim chunks=16]]"
    clean = await stream(client, {"messages": [{"role": "user", "content": content}]})
    assert result.text == clean.text
    assert result.named("done")[0].data["attempts"] == 2


async def test_upstream_failure_is_one_friendly_error(client, sim):
    result = await stream(client, chat("status=400"))
    errors = result.named("error")
    assert len(errors) == 1 and result.events[-1].event == "error"
    assert errors[0].data["code"] == "bad_request"
    message = errors[0].data["message"]
    assert message and "400" not in message and "sim" not in message.lower()
    assert "sk-" not in result.body.decode()


async def test_client_disconnect_stops_the_upstream_after_the_grace_period(client, sim):
    async with client.post("/chat/stream/", json=chat("chunks=400 gap=0.02")) as response:
        await read_sse(response, time.monotonic(), stop_after="delta")
    left = time.monotonic()
    # Generation goes on for RESUME.GRACE waiting for a resume, then the upstream closes at once.
    await asyncio.sleep(LIVE_RESUME["GRACE"] / 2)
    assert sim.stats()["active_requests"] == 1
    await sim.await_until(lambda s: s["total_requests"] == 1 and s["active_requests"] == 0, timeout=2.0)
    closed = sim.stats()["requests"][0]["closed"] - sim.stats()["requests"][0]["started"]
    assert time.monotonic() - left <= LIVE_RESUME["GRACE"] + 1.0 and closed < 8.0


async def test_cancelled_during_a_stall_stops_the_upstream(client, sim):
    async with client.post("/chat/stream/", json=chat("chunks=10 stall_after=2 stall=30 times=1")) as response:
        await read_sse(response, time.monotonic(), stop_after="delta")
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=LIVE_RESUME["GRACE"] + 1.0)


async def test_concurrent_streams(client, sim):
    results = await asyncio.gather(*(stream(client, chat("chunks=20 gap=0.01")) for _ in range(20)))
    assert all(r.events[-1].event == "done" and len(r.named("delta")) == 20 for r in results)
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"messages": []}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "Unknown field"),
        ({"messages": [{"role": "user", "content": "hi"}] * 201}, 413, "Too many messages"),
        ([1, 2], 400, "JSON object"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_problem(client, sim, body, status, fragment):
    async with client.post("/chat/stream/", json=body) as response:
        assert response.status == status
        payload = await response.json()
    assert payload["error"]["code"] == "bad_request"
    assert fragment in payload["error"]["message"]
    assert sim.stats()["total_requests"] == 0


async def test_not_json_and_wrong_method(client, daphne):
    async with client.post("/chat/stream/", data=b"{nope", headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        assert "not valid JSON" in (await response.json())["error"]["message"]
    async with client.post("/chat/stream/", data=b"hello", headers={"Content-Type": "text/plain"}) as response:
        assert response.status == 415
    async with client.get("/chat/stream/") as response:
        assert response.status == 405 and response.headers["Allow"] == "POST"
