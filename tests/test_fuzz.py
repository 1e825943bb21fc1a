"""Fuzzing every way in: no input gives a 5xx, a traceback or a leaked key, nor leaves a stream.

Two parts:

* Hypothesis, in-process against ``project.asgi.application`` (the ``RequestSizeGuard``, the
  middleware, the views and the WebSocket consumer, streaming from the simulator): at least
  :data:`EXAMPLES` generated bodies per HTTP way in and as many frames on one socket. Valid
  requests start real streams, which the client leaves after the first bytes (or cancels); at the
  end no stream runs, the simulator has no open request, the journal and the per-user slots are
  empty, and a normal request still gets its whole answer.
* A hand-written list of nasty inputs (:data:`NASTY_HTTP`, :data:`NASTY_FRAMES`) sent as raw bytes
  to the live Daphne (socket-level HTTP, a real WebSocket client), then normal requests.

The outcome counts are printed (``pytest -s tests/test_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from django.core.cache import caches
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatproxy import profiles, resume, signals
from chatproxy.core import ChatStream
from project.asgi import application
from tests.asgi_calls import SESSION_HEADERS, Reply, call

EXAMPLES = int(os.environ.get("CHATPROXY_FUZZ_EXAMPLES", "1000"))
CANARY = "sk-canary-fuzz-4f1d2a9c0b7e"  # the upstream key: must never show up anywhere
MAX_INPUT_CHARS = 3000
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"/")


# --------------------------------------------------------------------------- environment


@pytest.fixture
def fuzz_settings(sim, settings):
    caches["default"].clear()  # no per-user slot left over from another test
    profiles.forget()  # the timeouts below, not a default profile another test loaded
    settings.CHATPROXY = {
        "UPSTREAM": {
            "BASE_URL": sim.base_url,
            "API_KEY": CANARY,
            "MODELS": ["gpt-4o-mini", "gpt-4o"],
            "EXTRA_BODY": {"max_tokens": 3},  # short answers: valid requests finish fast
        },
        "TIMEOUTS": {"FIRST_TOKEN": 1.0, "STALL": 0.5, "KEEPALIVE": 0.25, "GATEWAY": 2.0, "DEADLINE": 5.0,
                     "BACKOFF_INITIAL": 0.01, "BACKOFF_MAX": 0.05},
        "PERMISSION": "chatproxy.permissions.allow_any",
        # No frame cap: the fuzzer sends its examples' frames over one socket as fast as it can.
        "LIMITS": {"MAX_MESSAGES": 8, "MAX_INPUT_CHARS": MAX_INPUT_CHARS, "MAX_STREAMS_PER_USER": 4,
                   "WS_FRAMES_PER_SECOND": None},
        "RESUME": {"GRACE": 0.0},  # a stream stops as soon as its client leaves
        "RECORDS": {"ENABLED": False},
    }
    return settings


class Streams:
    """The streams started and not yet finished (the signals), to prove none is left running."""

    def __init__(self) -> None:
        self.started = 0
        self.running: set[str] = set()

    async def on_started(self, stream: ChatStream, **kwargs: Any) -> None:
        self.started += 1
        self.running.add(stream.stream_id)

    async def on_finished(self, stream: ChatStream, **kwargs: Any) -> None:
        self.running.discard(stream.stream_id)


@pytest.fixture
def runner(fuzz_settings) -> Iterator[asyncio.Runner]:
    """One event loop for all examples of a test (one upstream pool, one journal)."""
    with asyncio.Runner() as loop_runner:
        yield loop_runner


@pytest.fixture
def streams() -> Iterator[Streams]:
    counter = Streams()
    signals.stream_started.connect(counter.on_started, sender=ChatStream, dispatch_uid="fuzz-started")
    signals.stream_finished.connect(counter.on_finished, sender=ChatStream, dispatch_uid="fuzz-finished")
    yield counter
    signals.stream_started.disconnect(sender=ChatStream, dispatch_uid="fuzz-started")
    signals.stream_finished.disconnect(sender=ChatStream, dispatch_uid="fuzz-finished")


async def assert_nothing_left(sim, streams: Streams) -> None:
    """No stream runs, every upstream request of this test is closed, the journal and the slots are empty."""
    # (The simulator's log holds only this test's requests; its active count may include another's.)
    await sim.await_until(lambda s: all(r["closed"] is not None for r in s["requests"]), timeout=5.0)
    for _ in range(100):
        if not streams.running and not resume.journal().tracked:
            break
        await asyncio.sleep(0.05)
    assert not streams.running, streams.running
    assert not resume.journal().tracked
    await asyncio.sleep(0.1)  # slot releases run in a worker thread
    cache = caches["default"]
    held = [key for key in cache._cache if ":chatproxy:slot:" in key]  # LocMemCache
    assert not held, held


async def normal_request_works() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "And now a normal question"}]}).encode()
    reply = await call(application, "POST", "/chat/stream/", body, leave_after=None)
    assert reply.status == 200 and reply.complete and b"event: done" in reply.body, reply.body[-300:]
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "And again"}]}).encode()
    reply = await call(application, "POST", "/chat/v1/chat/completions", body)
    assert reply.status == 200 and reply.json()["object"] == "chat.completion"


def check_reply(reply: Reply, *, openai_shape: bool) -> None:
    assert 200 <= reply.status < 500, (reply.status, reply.body[:500])
    assert not TRACEBACK.search(reply.body), reply.body[:2000]
    assert CANARY.encode() not in reply.body
    if reply.status >= 400:
        error = reply.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        if openai_shape:
            assert {"message", "type", "code"} <= set(error), error
        else:
            assert set(error) == {"code", "message"}, error
    else:
        content_type = reply.headers.get("content-type", "")
        assert content_type.startswith(("text/event-stream", "application/json")), reply.headers


# --------------------------------------------------------------------------- strategies

any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
nasty_text = st.sampled_from([
    "", " ", "\x00", "\u2028\u2029", "🙂" * 20, "a" * (MAX_INPUT_CHARS + 1), "[[sim status=500]]",
    "[[sim chunks=2]]", "[[sim nonsense=1]]", "<script>alert(1)</script>", "' OR 1=1 --", "%s%n{0}",
])
text = st.one_of(st.text(max_size=40), any_text, nasty_text)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), text,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=5
)
numbers = st.one_of(
    st.integers(0, 2), st.integers(1, 50), st.floats(0, 2), st.integers(-3, 5), st.floats(-3, 3), st.integers(),
    st.floats(), st.just(10**400), st.just(-(2**64)), json_values,
)
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool", "", "User"]), json_values)
parts = st.lists(st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": text}),
                           json_values), max_size=3)
good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=40)})
message = st.one_of(
    good_message,
    st.fixed_dictionaries({"role": roles, "content": st.one_of(text, parts, json_values)},
                          optional={"name": text, "prefix": json_values}),
    json_values,
)
messages = st.one_of(
    st.lists(good_message, min_size=1, max_size=3),
    st.lists(good_message, min_size=1, max_size=3),  # twice: about half the bodies can start a stream
    st.lists(message, max_size=4),
    st.integers(9, 12).map(lambda n: [{"role": "user", "content": "x"}] * n),  # over MAX_MESSAGES
    json_values,
)
models = st.one_of(st.sampled_from(["gpt-4o-mini", "gpt-4o"]),
                   st.sampled_from(["gpt-4o-mini", "gpt-4o", "gpt-5", "", "gpt-4o\x00", "x" * 300]), json_values)


def sometimes(one_in: int) -> Any:
    """True about once in ``one_in`` draws (``st.integers`` would favour its bounds); shrinks to False."""
    return st.sampled_from([False] * (one_in - 1) + [True])


@st.composite
def native_bodies(draw: Any) -> Any:
    body: dict[Any, Any] = {"messages": draw(messages)}
    for name, strategy in (("model", models), ("temperature", numbers), ("max_tokens", numbers), ("seed", numbers)):
        if draw(sometimes(4)):
            body[name] = draw(strategy)
    if draw(sometimes(10)):
        body[draw(text)] = draw(json_values)  # an unknown field (or a known one twice)
    if draw(sometimes(15)):
        del body["messages"]
    return body


OPENAI_OPTIONAL = {
    "stream": st.one_of(st.booleans(), st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "temperature": numbers, "max_tokens": numbers, "max_completion_tokens": numbers, "seed": numbers,
    "top_p": numbers, "presence_penalty": numbers, "frequency_penalty": numbers, "n": numbers,
    "stop": st.one_of(text, st.lists(text, max_size=6), json_values),
    "tools": json_values, "response_format": json_values, "user": text, "logit_bias": json_values,
}


@st.composite
def openai_bodies(draw: Any) -> Any:
    body: dict[Any, Any] = {"model": draw(models), "messages": draw(messages)}
    for name in draw(st.lists(st.sampled_from(sorted(OPENAI_OPTIONAL)), max_size=3, unique=True)):
        body[name] = draw(OPENAI_OPTIONAL[name])
    if draw(sometimes(15)):
        del body[draw(st.sampled_from(["model", "messages"]))]
    return body


def _deep(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def wire_bodies(draw: Any, bodies: Any) -> bytes:
    """A body as bytes: usually well-formed JSON of ``bodies``, sometimes broken in every way."""
    kind = draw(st.sampled_from(["json"] * 19 + ["binary", "any json", "deep", "oversized", "truncated", "flipped"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "any json":
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == "deep":
        return _deep(draw(st.integers(1, 3000)))
    if kind == "oversized":  # the guard answers 413
        return b'{"messages": [{"role": "user", "content": "' + b"x" * draw(st.integers(80_000, 150_000)) + b'"}]}'
    encoded = json.dumps(draw(bodies), ensure_ascii=draw(st.booleans()), allow_nan=True)
    raw = encoded.encode("utf-8", "surrogatepass")
    if kind == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "flipped" and raw:  # one byte replaced (broken UTF-8, broken syntax)
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return raw


content_types = st.sampled_from(
    [b"application/json"] * 12
    + [None, b"text/plain", b"application/json; charset=utf-8", b"multipart/form-data; boundary=xx",
       b"application/x-www-form-urlencoded", b"Application/JSON", b"application/json\xff", b"application/jsonx"]
)


@st.composite
def http_requests(draw: Any, bodies: Any) -> dict[str, Any]:
    body = draw(wire_bodies(bodies))
    chunked = draw(sometimes(6))
    if chunked and body:
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        edges = [0, *cuts, len(body)]
        body_parts: Any = [body[a:b] for a, b in itertools.pairwise(edges)]
    else:
        body_parts = body
    return {
        "method": draw(st.sampled_from(["POST"] * 30 + ["GET", "PUT", "DELETE", "PATCH"])),
        "body": body_parts,
        "content_type": draw(content_types),
        "content_length": not chunked or draw(st.booleans()),
        "session": not draw(sometimes(20)),  # sometimes no CSRF cookie/token: 403
    }


# --------------------------------------------------------------------------- Hypothesis: HTTP


def _fuzz_http(runner: asyncio.Runner, sim: Any, streams: Streams, path: str, bodies: Any, openai_shape: bool) -> None:
    outcomes: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(request=http_requests(bodies))
    def example(request: dict[str, Any]) -> None:
        reply = runner.run(call(application, path=path, **request))
        outcomes[reply.status] += 1
        check_reply(reply, openai_shape=openai_shape)

    example()
    runner.run(assert_nothing_left(sim, streams))
    runner.run(normal_request_works())
    print(f"\nfuzz {path}: {sum(outcomes.values())} requests, statuses {dict(sorted(outcomes.items()))}, "
          f"{streams.started} streams started and stopped")
    assert sum(outcomes.values()) >= EXAMPLES


def test_fuzz_sse_endpoint(runner, sim, streams):
    _fuzz_http(runner, sim, streams, "/chat/stream/", native_bodies(), openai_shape=False)


def test_fuzz_openai_endpoint(runner, sim, streams):
    _fuzz_http(runner, sim, streams, "/chat/v1/chat/completions", openai_bodies(), openai_shape=True)


stream_ids = st.one_of(st.text(st.characters(exclude_categories=(), exclude_characters="/"), min_size=1,
                                max_size=80),
                       st.text("0123456789abcdef", min_size=32, max_size=32))
header_values = st.one_of(st.binary(max_size=20), st.integers(-5, 10**15).map(lambda n: str(n).encode()),
                          st.sampled_from([b"\xb2", b"\xb9", b"\xbd", b"\xd9\xa3", b"1e3", b" 7", b"-1", b"0x10"]))


queries = st.one_of(
    st.just(b""), st.text(max_size=20).map(lambda t: b"last_event_id=" + t.encode()),
    header_values.map(lambda v: b"last_event_id=" + v), st.binary(max_size=30),
)


def test_fuzz_resume_and_cancel(runner, sim, streams):
    """Resume and cancel: ids and Last-Event-ID values of every kind (fewer examples: no body)."""
    outcomes: Counter[int] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=max(50, EXAMPLES // 4))
    @given(stream_id=stream_ids, last=st.one_of(st.none(), header_values), query=queries,
           cancel=st.booleans())
    def example(stream_id: str, last: bytes | None, query: bytes, cancel: bool) -> None:
        path = f"/chat/stream/{stream_id}/" + ("cancel/" if cancel else "")
        headers = [(b"last-event-id", last)] if last is not None else []
        reply = runner.run(call(application, "POST" if cancel else "GET", path, b"", headers=headers, query=query))
        outcomes[reply.status] += 1
        try:
            query.decode()
        except UnicodeDecodeError:  # Django itself refuses it before any view: an empty 400
            assert reply.status == 400 and not reply.body
            return
        check_reply(reply, openai_shape=False)

    example()
    print(f"\nfuzz resume/cancel: {sum(outcomes.values())} requests, statuses {dict(sorted(outcomes.items()))}")


# --------------------------------------------------------------------------- Hypothesis: WebSocket


@st.composite
def ws_frames(draw: Any) -> tuple[str, Any, Any]:
    """(kind, payload, request_id or None): kind "text" or "bytes" (the ASGI message key)."""
    kind = draw(st.sampled_from(["frame"] * 16 + ["binary", "text", "any json", "deep", "oversized"]))
    if kind == "binary":
        return "bytes", draw(st.binary(max_size=200)), None
    if kind == "text":
        return "text", draw(any_text), None
    if kind == "any json":
        return "text", json.dumps(draw(json_values), allow_nan=True), None
    if kind == "deep":
        return "text", _deep(draw(st.integers(1, 3000))).decode(), None
    if kind == "oversized":
        return "text", '{"type": "chat", "request_id": "big", "x": "' + "y" * 900_000 + '"}', "big"
    frame: dict[Any, Any] = {"type": draw(st.one_of(st.sampled_from(["chat"] * 6 + ["cancel", "resume", "ping"]),
                                                    json_values))}
    plain_id = st.from_regex(r"\Ar[0-9]{1,6}\Z")
    request_id = draw(st.one_of(plain_id, plain_id, text, json_values))
    if not draw(sometimes(10)):
        frame["request_id"] = request_id
    if frame["type"] == "chat":
        frame.update(draw(native_bodies()))
    elif frame["type"] == "resume":
        frame["stream_id"] = draw(st.one_of(stream_ids, json_values))
        frame["last_event_id"] = draw(numbers)
    encoded = json.dumps(frame, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if draw(sometimes(10)):
        return "bytes", encoded.encode("utf-8", "surrogatepass"), request_id
    return "text", encoded, request_id


class Socket:
    """One communicator for every example, and the bookkeeping to wait for each frame's replies."""

    def __init__(self) -> None:
        self.ws: WebsocketCommunicator | None = None
        self.sentinel = 0
        self.frames: Counter[str] = Counter()

    async def open(self) -> None:
        self.ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                             (b"host", b"localhost")])
        connected, _ = await self.ws.connect()
        assert connected

    async def receive(self) -> dict[str, Any]:
        assert self.ws is not None
        message = await self.ws.receive_output(timeout=5.0)
        assert message["type"] == "websocket.send", f"the socket was closed: {message}"
        raw = message.get("text") or ""
        assert not TRACEBACK.search(raw.encode("utf-8", "surrogatepass")) and CANARY not in raw, raw[:2000]
        frame = json.loads(raw)
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
        if frame["type"] == "error":
            assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str) and frame["message"]
        self.frames[frame["type"]] += 1
        return frame

    async def exchange(self, kind: str, payload: Any, request_id: Any) -> None:
        """Send one frame, then make sure every reply it causes has arrived and its stream ended.

        A ``cancel`` for its request_id follows: either it stops the stream the frame started (whose
        frames end with ``done``/``error``), or it is refused at once. A cancel for a fresh id then
        marks the end of the replies.
        """
        assert self.ws is not None
        # send_input rather than send_to, which refuses empty frames
        await self.ws.send_input({"type": "websocket.receive", kind: payload})
        if isinstance(request_id, str) and request_id:
            await self.ws.send_json_to({"type": "cancel", "request_id": request_id})
        self.sentinel += 1
        marker = f"sentinel-{self.sentinel}"
        await self.ws.send_json_to({"type": "cancel", "request_id": marker})
        started: set[str] = set()
        ended: set[str] = set()
        while True:
            frame = await self.receive()
            rid = frame.get("request_id")
            if frame["type"] == "start":
                started.add(rid)
            elif frame["type"] in ("done", "error") and rid in started:
                ended.add(rid)
            if rid == marker:
                break
        while started - ended:
            frame = await self.receive()
            if frame["type"] in ("done", "error"):
                ended.add(frame.get("request_id"))


@pytest.mark.django_db(transaction=True)  # the consumer closes old database connections on each message
def test_fuzz_websocket_frames(runner, sim, streams):
    socket = Socket()
    runner.run(socket.open())

    @FUZZ_SETTINGS
    @given(frame=ws_frames())
    def example(frame: tuple[str, Any, Any]) -> None:
        runner.run(socket.exchange(*frame))

    example()
    # The same socket still works: a normal chat gets its whole answer.
    assert socket.ws is not None
    runner.run(socket.ws.send_json_to({"type": "chat", "request_id": "normal",
                                       "messages": [{"role": "user", "content": "Still there?"}]}))

    async def until_done() -> dict[str, Any]:
        while True:
            frame = await socket.receive()
            if frame.get("request_id") == "normal" and frame["type"] in ("done", "error"):
                return frame

    assert runner.run(until_done())["type"] == "done"
    runner.run(socket.ws.disconnect())
    runner.run(assert_nothing_left(sim, streams))
    runner.run(normal_request_works())
    print(f"\nfuzz websocket: {socket.sentinel} frames, replies {dict(socket.frames)}, "
          f"{streams.started} streams started and stopped")


# --------------------------------------------------------------------------- nasty inputs, live Daphne

CHAT = b'{"messages": [{"role": "user", "content": "hello"}]}'


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _user(content: Any) -> bytes:
    return _json({"messages": [{"role": "user", "content": content}]})


def _raw_user(content: bytes) -> bytes:
    return b'{"messages": [{"role": "user", "content": "' + content + b'"}]}'


#: (name, method, path, extra headers, body or None, expected status or None for "any 4xx")
NASTY_HTTP: list[tuple[str, str, str, list[tuple[str, str]], bytes | None, int | None]] = [
    # broken UTF-8
    ("invalid UTF-8 byte", "POST", "/chat/stream/", [], _raw_user(b"\xff\xfe"), 400),
    ("encoded lone surrogate", "POST", "/chat/stream/", [], _raw_user(b"\xed\xa0\x80"), 400),
    ("escaped lone surrogate", "POST", "/chat/stream/", [], _raw_user(b"\\ud800"), 400),
    ("overlong UTF-8", "POST", "/chat/stream/", [], _raw_user(b"\xc0\xaf"), 400),
    ("UTF-16 body", "POST", "/chat/stream/", [("Content-Type", "application/json; charset=utf-16")],
     CHAT.decode().encode("utf-16"), 400),
    ("BOM before JSON", "POST", "/chat/stream/", [], b"\xef\xbb\xbf" + CHAT, 400),
    # deep nesting
    ("100k nested arrays", "POST", "/chat/stream/", [], b"[" * 100_000 + b"]" * 100_000, 400),
    ("50k nested objects", "POST", "/chat/stream/", [], b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400),
    ("nesting inside content", "POST", "/chat/stream/", [], _user([[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]]), 400),
    ("openai: deep content parts", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [[[[[[[[[[]]]]]]]]]]}]}), 400),
    # huge numbers
    ("temperature 1e999999", "POST", "/chat/stream/", [], CHAT[:-1] + b', "temperature": 1e999999}', 400),
    ("max_tokens with 5000 digits", "POST", "/chat/stream/", [], CHAT[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}",
     400),
    ("seed 2**64", "POST", "/chat/stream/", [], CHAT[:-1] + b', "seed": 18446744073709551616}', 400),
    ("NaN temperature", "POST", "/chat/stream/", [], CHAT[:-1] + b', "temperature": NaN}', 400),
    ("Infinity max_tokens", "POST", "/chat/v1/chat/completions", [],
     b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}', 400),
    ("negative zero temperature", "POST", "/chat/stream/", [], CHAT[:-1] + b', "temperature": -0.0}', 200),
    ("openai: top_p 1e308", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "top_p": 1e308}), 400),
    # nulls
    ("null body", "POST", "/chat/stream/", [], b"null", 400),
    ("messages null", "POST", "/chat/stream/", [], b'{"messages": null}', 400),
    ("null message", "POST", "/chat/stream/", [], b'{"messages": [null]}', 400),
    ("null role and content", "POST", "/chat/stream/", [], b'{"messages": [{"role": null, "content": null}]}', 400),
    ("role a list", "POST", "/chat/stream/", [], b'{"messages": [{"role": ["user"], "content": "x"}]}', 400),
    ("openai: role an object", "POST", "/chat/v1/chat/completions", [],
     b'{"model": "gpt-4o", "messages": [{"role": {"a": 1}, "content": "x"}]}', 400),
    ("NUL byte in JSON", "POST", "/chat/stream/", [], b'{"messages": [{"role": "user", "content": "a\x00b"}]}', 400),
    ("escaped NUL in content", "POST", "/chat/stream/", [], _user("a\u0000b"), 200),
    ("NUL in model", "POST", "/chat/stream/", [], CHAT[:-1] + b', "model": "gpt-4o-mini\\u0000"}', 400),
    ("openai: model null", "POST", "/chat/v1/chat/completions", [],
     b'{"model": null, "messages": [{"role": "user", "content": "x"}]}', 200),
    # unknown fields
    ("unknown top-level field", "POST", "/chat/stream/", [], CHAT[:-1] + b', "stream": true}', 400),
    ("__proto__ field", "POST", "/chat/stream/", [], CHAT[:-1] + b', "__proto__": {"admin": true}}', 400),
    ("duplicate keys", "POST", "/chat/stream/", [], b'{"messages": [], "messages": [{"role": "user", "content": "x"}]}',
     200),
    ("openai: tools", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
     400),
    ("openai: n=500", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": 500}), 400),
    ("openai: stream 'yes'", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), 400),
    ("openai: unknown model", "POST", "/chat/v1/chat/completions", [],
     _json({"model": "gpt-99", "messages": [{"role": "user", "content": "x"}]}), None),
    # wrong content types
    ("text/plain", "POST", "/chat/stream/", [("Content-Type", "text/plain")], CHAT, 415),
    ("form-encoded", "POST", "/chat/stream/", [("Content-Type", "application/x-www-form-urlencoded")],
     b"messages=hello", 415),
    ("multipart", "POST", "/chat/stream/", [("Content-Type", "multipart/form-data; boundary=zz")],
     b"--zz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nb\r\n--zz--\r\n", 415),
    ("malformed multipart", "POST", "/chat/stream/", [("Content-Type", "multipart/form-data; boundary=zz")],
     b"--zz\r\n" + b"a" * 2000 + b"\r\n", 415),
    ("no content type", "POST", "/chat/stream/", [("Content-Type", None)], CHAT, 415),
    ("content type with junk", "POST", "/chat/stream/", [("Content-Type", "application/json;;;===")], CHAT, None),
    ("openai: text/plain", "POST", "/chat/v1/chat/completions", [("Content-Type", "text/plain")], CHAT, 415),
    # empty messages
    ("empty body", "POST", "/chat/stream/", [], b"", 400),
    ("whitespace body", "POST", "/chat/stream/", [], b"   \n ", 400),
    ("empty object", "POST", "/chat/stream/", [], b"{}", 400),
    ("empty list", "POST", "/chat/stream/", [], b'{"messages": []}', 400),
    ("empty message", "POST", "/chat/stream/", [], b'{"messages": [{}]}', 400),
    ("only an assistant message", "POST", "/chat/stream/", [], b'{"messages": [{"role": "assistant", "content": "x"}]}',
     400),
    ("empty content", "POST", "/chat/stream/", [], _user(""), 200),
    # sizes
    ("201 messages", "POST", "/chat/stream/", [], _json({"messages": [{"role": "user", "content": "x"}] * 201}), 413),
    ("200,001 characters", "POST", "/chat/stream/", [], _user("x" * 200_001), 413),
    ("2 MB body", "POST", "/chat/stream/", [], b'{"messages": "' + b"x" * 2_000_000 + b'"}', 413),
    ("openai: 2 MB body", "POST", "/chat/v1/chat/completions", [], b'{"model": "' + b"x" * 2_000_000 + b'"}', 413),
    ("model of 10,000 characters", "POST", "/chat/stream/", [], CHAT[:-1] + b', "model": "' + b"m" * 10_000 + b'"}',
     400),
    # headers and methods
    ("bad Content-Length", "POST", "/chat/stream/", [("Content-Length", "12abc")], CHAT, None),
    ("PUT", "PUT", "/chat/stream/", [], CHAT, 405),
    ("DELETE", "DELETE", "/chat/v1/chat/completions", [], None, 405),
    ("OPTIONS", "OPTIONS", "/chat/stream/", [], None, 405),
    ("bearer key, non-hex prefix", "POST", "/chat/v1/chat/completions",
     [("Authorization", "Bearer cpk_zzzzzzzzzzzz_x")], CHAT, 401),
    ("bearer key of 8 KB", "POST", "/chat/v1/chat/completions", [("Authorization", "Bearer cpk_" + "a" * 8000)],
     CHAT, 401),
    ("empty bearer", "POST", "/chat/v1/chat/completions", [("Authorization", "Bearer ")], CHAT, 401),
    # Anonymous visitors (the live server allows them) need no CSRF token; signed-in sessions do
    # (tests/test_security.py).
    ("anonymous, no CSRF token", "POST", "/chat/stream/", [("X-CSRFToken", None)], CHAT, 200),
    ("anonymous, foreign Origin", "POST", "/chat/stream/", [("Origin", "http://evil.example")], CHAT, 200),
    ("Last-Event-ID superscript two", "GET", "/chat/stream/" + "0" * 32 + "/", [("Last-Event-ID", "\xb2")], None, 400),
    ("Last-Event-ID Arabic digit", "GET", "/chat/stream/" + "0" * 32 + "/", [("Last-Event-ID", "\xd9\xa3")], None, 400),
    ("resume: non-ASCII id", "GET", "/chat/stream/%C3%A9t%C3%A9/", [], None, 404),
    ("resume: 300-character id", "GET", "/chat/stream/" + "a" * 300 + "/", [], None, 404),
    ("resume: %00 id", "GET", "/chat/stream/%00/", [], None, 404),
    ("cancel: unknown id", "POST", "/chat/stream/" + "f" * 32 + "/cancel/", [], None, 404),
]


async def raw_http(url: str, method: str, path: str, headers: list[tuple[str, str | None]], body: bytes | None,
                   *, chunked: list[bytes] | None = None) -> tuple[int, bytes, bytes]:
    """One request over a plain socket: exactly these bytes, ``Connection: close``.

    Returns (status, the response head in lower case, the body); status 0 when the server closed
    the connection without an answer.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    base = {"Host": f"{host}:{port}", "Connection": "close", "Content-Type": "application/json",
            "Cookie": SESSION_HEADERS[0][1].decode(), "X-CSRFToken": SESSION_HEADERS[1][1].decode()}
    if body is not None:
        base["Content-Length"] = str(len(body))
    if chunked is not None:
        base["Transfer-Encoding"] = "chunked"
    for name, value in headers:
        base.pop(name, None)
        if value is not None:
            base[name] = value
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in base.items()) + "\r\n"
    writer.write(head.encode("latin-1"))
    if body:
        writer.write(body)
    for piece in chunked or ():
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    if chunked is not None:
        writer.write(b"0\r\n\r\n")
    try:
        await writer.drain()
        response = await asyncio.wait_for(_read_response(reader), 15)
    except (ConnectionResetError, BrokenPipeError):
        response = (0, b"", b"")
    writer.close()
    return response


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    head = head.lower()
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"http/") else 0
    if b"text/event-stream" in head:
        # A stream: read until its end event, then close (the stream stops after the grace period).
        while b"event: done" not in rest and b"event: error" not in rest and b"data: [DONE]" not in rest:
            chunk = await reader.read(65536)
            if not chunk:
                break
            rest += chunk
        return status, head, rest
    while chunk := await reader.read(65536):
        rest += chunk
    return status, head, rest


@pytest.mark.parametrize(("name", "method", "path", "headers", "body", "expected"), NASTY_HTTP,
                         ids=[case[0] for case in NASTY_HTTP])
async def test_nasty_http(daphne, sim, name, method, path, headers, body, expected):
    status, head, payload = await raw_http(daphne.url, method, path, headers, body)
    assert status != 0, "no HTTP answer"
    assert status < 500, (status, payload[:500])
    assert not TRACEBACK.search(payload), payload[:2000]
    assert CANARY.encode() not in payload and b"sk-simulator" not in payload
    if expected is not None:
        assert status == expected, (status, payload[:500])
    else:
        assert 400 <= status < 500 or status == 200, status
    if status >= 400 and b"content-type: application/json" in head:
        error = json.loads(payload)["error"]
        assert isinstance(error["message"], str) and error["message"]
    elif status >= 400:  # refused by the server before the application: only protocol-level problems
        assert name in ("bad Content-Length",), (name, head, payload[:300])


async def test_nasty_chunked_bodies(daphne, sim):
    """Chunked uploads (no Content-Length): a small one is served, one past the cap is refused."""
    status, _, payload = await raw_http(daphne.url, "POST", "/chat/stream/", [], None, chunked=[CHAT[:10], CHAT[10:]])
    assert status == 200 and b"event: done" in payload
    status, _, payload = await raw_http(daphne.url, "POST", "/chat/stream/", [], None, chunked=[b"x" * 500_000] * 3)
    assert status == 413 and "too large" in json.loads(payload)["error"]["message"]


NASTY_FRAMES: list[tuple[str, str | bytes]] = [
    ("binary, invalid UTF-8", b"\xff\xfe\xfd"),
    ("binary JSON", b'{"type": "ping"}'),
    ("not JSON", "{not json"),
    ("JSON string", '"chat"'),
    ("JSON null", "null"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000),
    ("huge number", '{"type": "resume", "stream_id": "x", "last_event_id": 1' + "0" * 5000 + "}"),
    ("NaN", '{"type": "chat", "request_id": "n", "messages": [], "temperature": NaN}'),
    ("escaped lone surrogate", '{"type": "chat", "request_id": "s", "messages": [{"role": "user", '
                               '"content": "\\udc00"}]}'),
    ("unknown type", '{"type": "__proto__"}'),
    ("type null", '{"type": null}'),
    ("request_id object", '{"type": "chat", "request_id": {}, "messages": [{"role": "user", "content": "x"}]}'),
    ("request_id 10,000 characters", json.dumps({"type": "chat", "request_id": "r" * 10_000,
                                                  "messages": [{"role": "user", "content": "x"}]})),
    ("unknown field", '{"type": "chat", "request_id": "u", "messages": [{"role": "user", "content": "x"}], '
                      '"stream": true}'),
    ("empty tools", '{"type": "chat", "request_id": "t", "messages": [{"role": "user", "content": "x"}], '
                    '"tools": []}'),
    ("empty messages", '{"type": "chat", "request_id": "e", "messages": []}'),
    ("null messages", '{"type": "chat", "request_id": "e", "messages": null}'),
    ("cancel unknown", '{"type": "cancel", "request_id": "nope"}'),
    ("cancel request_id list", '{"type": "cancel", "request_id": ["a"]}'),
    ("resume unknown", '{"type": "resume", "stream_id": "' + "0" * 32 + '", "last_event_id": 0}'),
    ("resume non-ASCII id", '{"type": "resume", "stream_id": "\\u00e9t\\u00e9", "last_event_id": 0}'),
    ("resume negative id", '{"type": "resume", "stream_id": "x", "last_event_id": -1}'),
    ("resume boolean id", '{"type": "resume", "stream_id": "x", "last_event_id": true}'),
    # above chatproxy's cap (LIMITS: 865,536 bytes), below Daphne's own (1 MiB, which closes the socket)
    ("frame of 950 kB", '{"type": "chat", "request_id": "big", "pad": "' + "x" * 950_000 + '"}'),
]


async def test_nasty_websocket_frames(daphne, sim):
    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    origin = daphne.url.replace("127.0.0.1", "localhost")
    async with websockets.connect(url, origin=origin, max_size=None) as socket:
        for name, frame in NASTY_FRAMES:
            await socket.send(frame)
            reply = json.loads(await asyncio.wait_for(socket.recv(), 5))
            assert reply["type"] == "error" and reply["message"], (name, reply)
            assert reply["code"] in ("bad_request", "not_found"), (name, reply)
        await socket.send(json.dumps({"type": "chat", "request_id": "ok",
                                      "messages": [{"role": "user", "content": "Fine after all that?"}]}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frame = json.loads(await asyncio.wait_for(socket.recv(), 5))
            if frame["type"] != "keepalive":
                frames.append(frame)
        assert frames[-1]["type"] == "done"


async def test_frame_over_daphnes_limit_closes_only_that_socket(daphne, sim):
    url = daphne.url.replace("http://", "ws://") + "/ws/chat/"
    origin = daphne.url.replace("127.0.0.1", "localhost")
    async with websockets.connect(url, origin=origin) as socket:
        await socket.send("x" * 1_500_000)  # Daphne's websocket_max_message_size is 1 MiB
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 5)
    async with websockets.connect(url, origin=origin) as socket:
        await socket.send('{"type": "cancel", "request_id": "x"}')
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["code"] == "bad_request"


async def test_daphne_answers_normally_after_the_nasty_inputs(client, sim):
    async with client.post("/chat/stream/", json={"messages": [{"role": "user", "content": "Normal?"}]}) as response:
        assert response.status == 200
        assert b"event: done" in await response.read()
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=3.0)
