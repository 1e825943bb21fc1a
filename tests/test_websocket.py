"""The WebSocket way in: in-process with Channels' communicator, and over a real socket to Daphne."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import websockets
from channels.testing import WebsocketCommunicator

from project.asgi import application
from tests.fixtures_servers import LIVE_LIMITS

pytestmark = pytest.mark.upstream
_unique = itertools.count()
RECEIVE = 5.0  # seconds; a generous cap per frame, never a sleep
GRACE = 0.4  # RESUME.GRACE: how long a stream outlives its socket waiting for a resume


@pytest.fixture
def chatproxy_settings(no_stale_connections, sim, settings):
    settings.CHATPROXY = {
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-ws"},
        "TIMEOUTS": {"FIRST_TOKEN": 1.0, "STALL": 0.5, "KEEPALIVE": 0.25, "GATEWAY": 2.0,
                     "BACKOFF_INITIAL": 0.05, "BACKOFF_MAX": 0.2},
        "PERMISSION": "chatproxy.permissions.allow_any",
        "RESUME": {"GRACE": GRACE},
        # In-process: no StreamRecord writes from a worker thread into the test database.
        "RECORDS": {"ENABLED": False},
    }
    return settings


@pytest.fixture
async def ws(chatproxy_settings):
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                              (b"host", b"localhost")])
    connected, _ = await communicator.connect()
    assert connected
    yield communicator
    await communicator.disconnect()


def chat_frame(request_id: str, directive: str = "chunks=6") -> dict:
    content = f"Tell me about bridges #{next(_unique)} [[sim {directive}]]"
    return {"type": "chat", "request_id": request_id, "messages": [{"role": "user", "content": content}]}


async def frames_until_end(ws, request_ids: set[str]) -> list[dict]:
    """Frames until every request in ``request_ids`` has ended (done or error)."""
    frames, open_ids = [], set(request_ids)
    while open_ids:
        frame = await ws.receive_json_from(timeout=RECEIVE)
        frames.append(frame)
        if frame["type"] in ("done", "error") and frame.get("request_id") in open_ids:
            open_ids.discard(frame["request_id"])
    return frames


async def test_chat_frames(ws, sim):
    await ws.send_json_to(chat_frame("r1"))
    frames = await frames_until_end(ws, {"r1"})
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"
    assert all(f["request_id"] == "r1" and f["stream_id"] == frames[0]["stream_id"] for f in frames)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert len([f for f in frames if f["type"] == "delta"]) == 6


async def test_several_requests_on_one_socket(ws, sim):
    for rid in ("a", "b", "c"):
        await ws.send_json_to(chat_frame(rid, "chunks=10 gap=0.01"))
    frames = await frames_until_end(ws, {"a", "b", "c"})
    for rid in ("a", "b", "c"):
        mine = [f for f in frames if f.get("request_id") == rid]
        assert mine[0]["type"] == "start" and mine[-1]["type"] == "done"
        assert len([f for f in mine if f["type"] == "delta"]) == 10


async def test_stall_recovered_over_websocket(ws, sim):
    await ws.send_json_to(chat_frame("s", "chunks=10 stall_after=4 stall=30 times=1"))
    frames = await frames_until_end(ws, {"s"})
    retries = [f for f in frames if f["type"] == "retry"]
    assert [r["reason"] for r in retries] == ["stall"] and frames[-1]["type"] == "done"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"type": "dance"}), "Unknown frame"),
        (json.dumps({"type": "chat", "messages": [{"role": "user", "content": "x"}]}), "request_id"),
        (json.dumps({"type": "chat", "request_id": "x", "messages": []}), "messages"),
        (json.dumps({"type": "cancel", "request_id": "nope"}), "No running request"),
    ],
)
async def test_bad_frames_keep_the_socket_usable(ws, sim, raw, fragment):
    await ws.send_to(text_data=raw)
    error = await ws.receive_json_from(timeout=RECEIVE)
    assert error["type"] == "error" and error["code"] == "bad_request" and fragment in error["message"]
    await ws.send_json_to(chat_frame("after"))
    frames = await frames_until_end(ws, {"after"})
    assert frames[-1]["type"] == "done"


async def test_cancel(ws, sim):
    await ws.send_json_to(chat_frame("c", "chunks=500 gap=0.02"))
    while (await ws.receive_json_from(timeout=RECEIVE))["type"] != "delta":
        pass
    await ws.send_json_to({"type": "cancel", "request_id": "c"})
    frames = await frames_until_end(ws, {"c"})
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled"
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


async def test_keepalive_frames_while_upstream_is_silent(ws, sim):
    await ws.send_json_to(chat_frame("k", "chunks=2 first_delay=0.8"))
    frames = await frames_until_end(ws, {"k"})
    assert len([f for f in frames if f == {"type": "keepalive"}]) >= 2


async def test_closing_the_socket_stops_upstream_after_the_grace_period(chatproxy_settings, sim):
    ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                   (b"host", b"localhost")])
    assert (await ws.connect())[0]
    await ws.send_json_to(chat_frame("x", "chunks=500 gap=0.02"))
    await ws.send_json_to(chat_frame("y", "chunks=5 stall_after=2 stall=30"))
    await sim.await_until(lambda s: s["active_requests"] == 2, timeout=2.0)
    await ws.disconnect()
    await asyncio.sleep(GRACE / 2)
    assert sim.stats()["active_requests"] == 2  # still generating, waiting for a resume
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=GRACE + 1.0)


async def test_permission_refused(no_stale_connections, sim, settings):
    settings.CHATPROXY = {"UPSTREAM": {"BASE_URL": sim.base_url}, "PERMISSION": "chatproxy.permissions.authenticated"}
    ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                   (b"host", b"localhost")])
    connected, code = await ws.connect()
    assert not connected and code == 4403


async def test_foreign_origin_refused(chatproxy_settings):
    ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://evil.example"),
                                                                   (b"host", b"localhost")])
    connected, _ = await ws.connect()
    assert not connected


async def test_real_websocket_client_against_daphne(daphne, sim):
    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    async with websockets.connect(url, origin=daphne.url.replace("127.0.0.1", "localhost")) as socket:
        await socket.send(json.dumps(chat_frame("live", "chunks=8 stall_after=3 stall=30 times=1")))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(socket.recv(), RECEIVE)))
    assert frames[-1]["type"] == "done"
    assert "retry" in [f["type"] for f in frames]
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=1.0)


async def test_real_client_with_foreign_origin_is_refused(daphne):
    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(url, origin="http://evil.example"):
            pass


async def test_a_stream_that_cannot_start_gets_an_error_frame_and_the_socket_stays(ws, sim, chatproxy_settings,
                                                                                  monkeypatch, caplog):
    """A bad configuration (an SDK that is not installed) or any failure while starting a stream:
    one friendly error frame for that request, nothing internal in it, and the socket still works."""
    from chatproxy import consumers, service
    from chatproxy.upstream import detect_sdk

    missing = "current" if detect_sdk() == "legacy" else "legacy"
    upstream = {**chatproxy_settings.CHATPROXY["UPSTREAM"], "SDK": missing}
    chatproxy_settings.CHATPROXY = {**chatproxy_settings.CHATPROXY, "UPSTREAM": upstream}
    await ws.send_json_to(chat_frame("bad-config"))
    frame = await ws.receive_json_from(timeout=RECEIVE)
    assert frame == {"type": "error", "code": "internal", "request_id": "bad-config",
                     "message": "Something went wrong on our side. Please try again."}
    assert "chatproxy.service" in {r.name for r in caplog.records}  # the cause, logged where it was found

    async def broken(*args, **kwargs):
        raise RuntimeError("sk-test-ws internals")

    monkeypatch.setattr(consumers, "open_stream", broken)
    await ws.send_json_to(chat_frame("broken"))
    frame = await ws.receive_json_from(timeout=RECEIVE)
    assert frame["code"] == "internal" and frame["request_id"] == "broken" and "sk-" not in json.dumps(frame)
    monkeypatch.setattr(consumers, "open_stream", service.open_stream)

    chatproxy_settings.CHATPROXY = {**chatproxy_settings.CHATPROXY,
                                    "UPSTREAM": {**upstream, "SDK": "none"}}  # fixed: the same socket works
    await ws.send_json_to(chat_frame("fixed", "chunks=2"))
    frames = await frames_until_end(ws, {"fixed"})
    assert frames[-1]["type"] == "done"
    assert sim.stats()["total_requests"] == 1


async def test_a_flood_of_frames_gets_an_error_frame_and_close_4008(ws, sim):
    """More than LIMITS["WS_FRAMES_PER_SECOND"] (20 by default) frames in one second: the frames
    up to the cap are answered as usual, the next one gets ``rate_limited`` and the socket closes
    with 4008 (1008, policy violation, in the application's range)."""
    for _ in range(25):
        await ws.send_to(text_data='{"type": "hello"}')
    codes = [(await ws.receive_json_from(timeout=RECEIVE))["code"] for _ in range(21)]
    assert codes == ["bad_request"] * 20 + ["rate_limited"]
    closed = await ws.receive_output(timeout=RECEIVE)
    assert closed == {"type": "websocket.close", "code": 4008}


async def test_frames_at_the_cap_keep_the_socket(ws, sim, chatproxy_settings):
    """20 frames a second for two seconds, then a chat: the socket stays and answers."""
    for window in range(2):
        for _ in range(20):
            await ws.send_to(text_data='{"type": "hello"}')
        for _ in range(20):
            assert (await ws.receive_json_from(timeout=RECEIVE))["code"] == "bad_request"
        if window == 0:
            await asyncio.sleep(1.05)  # the next one-second window
    await asyncio.sleep(1.05)
    await ws.send_json_to(chat_frame("after"))
    frames = await frames_until_end(ws, {"after"})
    assert frames[-1]["type"] == "done"


async def test_a_real_client_flooding_frames_is_closed_with_4008(daphne, sim):
    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    async with websockets.connect(url, origin=daphne.url.replace("127.0.0.1", "localhost")) as socket:
        for _ in range(100):
            await socket.send('{"type": "hello"}')
        frames = []
        try:
            while True:
                frames.append(json.loads(await asyncio.wait_for(socket.recv(), RECEIVE)))
        except websockets.exceptions.ConnectionClosed:
            pass
        except TimeoutError:
            raise AssertionError(f"no close after {len(frames)} frames: {frames[-3:]}") from None
    assert socket.close_code == 4008
    cap = LIVE_LIMITS["WS_FRAMES_PER_SECOND"]
    assert [f["code"] for f in frames] == ["bad_request"] * cap + ["rate_limited"]
