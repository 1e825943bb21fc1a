"""Resumable streams on one worker: replay by id, then live; cancel; owner only.

Across two workers behind nginx with Redis: tests/e2e/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import pytest
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures_servers import LIVE_RESUME, csrf_session
from tests.sseclient import SSEItem, parse_block, read_sse

pytestmark = pytest.mark.upstream
_unique = itertools.count()


def chat(directive: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Tell me about tides #{next(_unique)} [[sim {directive}]]"}]}


async def read_until(session: aiohttp.ClientSession, body: dict, stop_id: int) -> list[SSEItem]:
    """POST a chat and read its events up to id ``stop_id`` (or the end), then drop the connection."""
    async with session.post("/chat/stream/", json=body) as response:
        assert response.status == 200
        got: list[SSEItem] = []
        buffer = ""
        async for chunk in response.content.iter_any():
            buffer += chunk.decode()
            *blocks, buffer = buffer.split("\n\n")
            for block in blocks:
                item = parse_block(block, time.monotonic())
                if item is not None and item.kind == "event":
                    got.append(item)
                    if item.id >= stop_id or item.event in ("done", "error"):
                        return got
    return got


async def resume(session: aiohttp.ClientSession, stream_id: str, last_id: int, *, query: bool = False):
    started = time.monotonic()
    if query:
        request = session.get(f"/chat/stream/{stream_id}/", params={"last_event_id": str(last_id)})
    else:
        request = session.get(f"/chat/stream/{stream_id}/", headers={"Last-Event-ID": str(last_id)})
    async with request as response:
        return await read_sse(response, started)


def assert_exact(events: list[SSEItem], clean_text: str) -> None:
    ids = [e.id for e in events]
    assert ids == list(range(1, len(ids) + 1)), ids  # no duplicate, no gap
    assert events[-1].event == "done"
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == clean_text


async def clean_text_for(session, directive: str, body: dict) -> str:
    content = body["messages"][0]["content"].split(" [[")[0]
    length = next(w for w in directive.split() if w.startswith("chunks="))
    body = {"messages": [{"role": "user", "content": f"{content} [[sim {length}]]"}]}
    events = await read_until(session, body, 10**6)
    return "".join(e.data["text"] for e in events if e.event == "delta")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=30), use_query=st.booleans(), stall=st.booleans())
def test_resume_at_any_point_gives_exact_text(daphne, simulator, cut, use_query, stall):
    directive = "chunks=24 gap=0.01" + (" stall_after=6 stall=30 times=1" if stall else "")

    async def scenario():
        session = await csrf_session(daphne.url)
        try:
            body = chat(directive)
            first = await read_until(session, body, cut)
            stream_id = first[0].data["stream_id"]
            rest = await resume(session, stream_id, first[-1].id, query=use_query)
            assert rest.status == 200
            assert_exact(first + rest.events, await clean_text_for(session, directive, body))
        finally:
            await session.close()

    asyncio.run(scenario())


async def test_resume_after_the_end_replays_from_the_store(client, sim):
    body = chat("chunks=10")
    everything = await read_until(client, body, 10**6)
    await asyncio.sleep(0.3)  # the journal has written the last batch and forgotten the stream
    again = await resume(client, everything[0].data["stream_id"], 0)
    assert [(e.id, e.event, e.data) for e in again.events] == [(e.id, e.event, e.data) for e in everything]
    tail = await resume(client, everything[0].data["stream_id"], 5)
    assert [e.id for e in tail.events] == list(range(6, len(everything) + 1))


async def test_generation_continues_while_the_client_is_away(client, sim):
    body = chat("chunks=40 gap=0.02")
    first = await read_until(client, body, 3)
    await asyncio.sleep(LIVE_RESUME["GRACE"] / 2)  # away, but within the grace period
    started = time.monotonic()
    rest = await resume(client, first[0].data["stream_id"], first[-1].id)
    assert rest.first_byte - started < 0.5
    assert_exact(first + rest.events, await clean_text_for(client, "chunks=40", body))
    assert sim.stats()["requests"][0]["outcome"] == "complete"


async def test_cancel_endpoint(client, sim):
    first = await read_until(client, chat("chunks=400 gap=0.02"), 3)
    stream_id = first[0].data["stream_id"]
    async with client.post(f"/chat/stream/{stream_id}/cancel/") as response:
        assert response.status == 202
    rest = await resume(client, stream_id, first[-1].id)
    assert rest.events[-1].event == "error" and rest.events[-1].data["code"] == "cancelled"
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


async def test_unknown_foreign_and_malformed_ids(client, daphne, sim):
    assert (await resume(client, "0" * 32, 0)).status == 404
    first = await read_until(client, chat("chunks=5"), 10**6)
    stream_id = first[0].data["stream_id"]
    async with client.get(f"/chat/stream/{stream_id}/", headers={"Last-Event-ID": "x"}) as response:
        assert response.status == 400
    async with client.post("/chat/stream/nope/cancel/") as response:
        assert response.status == 404
    # Another (signed-in) user cannot see it.
    daphne.manage("createsuperuser", "--noinput", "--username", "mallory", "--email", "m@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "mallory-pass-1"})
    other = await csrf_session(daphne.url)
    try:
        async with other.post("/admin/login/", data={"username": "mallory", "password": "mallory-pass-1",
                                                       "csrfmiddlewaretoken": other.headers["X-CSRFToken"],
                                                       "next": "/"}) as response:
            assert response.status == 200
        other.headers["X-CSRFToken"] = other.cookie_jar.filter_cookies(yarl.URL(daphne.url))["csrftoken"].value
        assert (await resume(other, stream_id, 0)).status == 404
        async with other.post(f"/chat/stream/{stream_id}/cancel/") as response:
            assert response.status == 404
    finally:
        await other.close()


async def test_websocket_resume(daphne, sim):
    import websockets

    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    origin = daphne.url.replace("127.0.0.1", "localhost")
    frame = {"type": "chat", "request_id": "r", **chat("chunks=30 gap=0.02")}
    async with websockets.connect(url, origin=origin) as socket:
        await socket.send(json.dumps(frame))
        first = []
        while len(first) < 5:
            message = json.loads(await asyncio.wait_for(socket.recv(), 5))
            if message["type"] != "keepalive":
                first.append(message)
    async with websockets.connect(url, origin=origin) as socket:
        await socket.send(json.dumps({"type": "resume", "request_id": "r2", "stream_id": first[0]["stream_id"],
                                      "last_event_id": first[-1]["seq"]}))
        rest = []
        while not rest or rest[-1]["type"] not in ("done", "error"):
            message = json.loads(await asyncio.wait_for(socket.recv(), 5))
            if message["type"] != "keepalive":
                rest.append(message)
    assert [f["seq"] for f in first + rest] == list(range(1, len(first) + len(rest) + 1))
    assert rest[-1]["type"] == "done" and all(f["request_id"] == "r2" for f in rest)
