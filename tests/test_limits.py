"""Per-user limits (``CHATPROXY["LIMITS"]``): concurrent streams across workers, requests per minute.

In-process for the wire shapes of every way in (429 + ``Retry-After``; an error frame on the
WebSocket) and the mechanics (slots, expiry, identities); two live Daphne workers sharing one cache
for the cross-worker count.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.core.cache import caches
from django.core.checks import run_checks

from chatproxy import limits, outage, profiles
from chatproxy.profiles import resolve_policy
from project.asgi import application
from tests.asgi_calls import call
from tests.fixtures_servers import LIVE_RESUME, LIVE_TIMEOUTS, csrf_session
from tests.servers import AppServer, simulator_env

_unique = itertools.count()


def chat(directive: str = "chunks=4") -> bytes:
    content = f"Tell me about rivers #{next(_unique)} [[sim {directive}]]"
    return json.dumps({"messages": [{"role": "user", "content": content}]}).encode()


def openai_chat(directive: str = "chunks=4", stream: bool = False) -> bytes:
    content = f"Tell me about canals #{next(_unique)} [[sim {directive}]]"
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
                       "stream": stream}).encode()


LONG = "chunks=400 gap=0.02"  # about 8 s: still running while the test looks


@pytest.fixture
def limit_settings(sim, settings):
    caches["default"].clear()
    profiles.forget()  # the timeouts below, not a default profile another test loaded
    settings.CHATPROXY = {
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-limits"},
        "TIMEOUTS": {"FIRST_TOKEN": 1.0, "STALL": 0.5, "KEEPALIVE": 0.25, "GATEWAY": 2.0, "DEADLINE": 20.0},
        "PERMISSION": "chatproxy.permissions.allow_any",
        "LIMITS": {"MAX_STREAMS_PER_USER": 2},
        "RESUME": {"GRACE": 0.0},
        "RECORDS": {"ENABLED": False},
    }
    yield settings
    caches["default"].clear()


class Running:
    """Streams held open by clients that have read their first bytes; ``close()`` leaves them."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task] = []
        self.gone: list[asyncio.Event] = []

    async def start(self, path: str = "/chat/stream/", body: bytes | None = None, client=("10.0.0.1", 1)) -> None:
        first = asyncio.Event()
        gone = asyncio.Event()

        async def receive_all():
            return await _held_call(path, body or chat(LONG), client, first, gone)

        self.tasks.append(asyncio.ensure_future(receive_all()))
        self.gone.append(gone)
        await asyncio.wait_for(first.wait(), 5)

    async def close(self, index: int | None = None) -> None:
        chosen = range(len(self.tasks)) if index is None else [index]
        for i in chosen:
            self.gone[i].set()
        await asyncio.gather(*(self.tasks[i] for i in chosen))


async def _held_call(path, body, client, first: asyncio.Event, gone: asyncio.Event) -> int:
    """An SSE request whose client stays until ``gone`` is set; ``first`` when its first bytes came."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": list(client),
             "server": ["localhost", 80],
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), (b"cookie", b"csrftoken=" + b"k" * 32),
                         (b"x-csrftoken", b"k" * 32)]}
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    status = 0

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            first.set()
            if not message.get("more_body"):
                gone.set()

    await application(scope, receive, send)
    return status


async def slots_free(who: str = "ip:10.0.0.1") -> None:
    """Wait until ``who`` holds no lease (releases happen after the stream ends)."""
    for _ in range(100):
        if limits.running(who) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("leases still held")


# --------------------------------------------------------------------------- every way in


@pytest.mark.django_db(transaction=True)  # the WebSocket consumer closes old database connections
async def test_third_stream_is_refused_on_every_way_in_then_allowed_again(limit_settings, sim):
    running = Running()
    await running.start()
    await running.start("/chat/v1/chat/completions", openai_chat(LONG, stream=True))
    await sim.await_until(lambda s: s["active_requests"] == 2, timeout=2)

    sse = await call(application, "POST", "/chat/stream/", chat(), client=("10.0.0.1", 2))
    assert sse.status == 429 and sse.headers["retry-after"] == str(limits.BUSY_RETRY_AFTER)
    assert sse.json()["error"]["code"] == "rate_limited" and "at most 2" in sse.json()["error"]["message"]

    oai = await call(application, "POST", "/chat/v1/chat/completions", openai_chat(), client=("10.0.0.1", 3))
    assert oai.status == 429 and oai.headers["retry-after"] == str(limits.BUSY_RETRY_AFTER)
    error = oai.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited" and "param" in error

    ws = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://localhost"),
                                                                   (b"host", b"localhost")])
    ws.scope["client"] = ["10.0.0.1", 4]
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "chat", "request_id": "w", "messages": [{"role": "user", "content": "x"}]})
    frame = await ws.receive_json_from(timeout=5)
    assert frame["type"] == "error" and frame["code"] == "rate_limited" and frame["request_id"] == "w"
    assert frame["retry_after"] == limits.BUSY_RETRY_AFTER and "at most 2" in frame["message"]

    # Another visitor has a budget of their own.
    other = await call(application, "POST", "/chat/stream/", chat(), client=("10.0.0.2", 1), leave_after=None)
    assert other.status == 200 and b"event: done" in other.body

    # One stream ends: its slot is free again, on every way in.
    await running.close(0)
    for _ in range(100):
        again = await call(application, "POST", "/chat/stream/", chat(), client=("10.0.0.1", 5), leave_after=None)
        if again.status != 429:
            break
        await asyncio.sleep(0.02)
    assert again.status == 200 and b"event: done" in again.body
    await ws.send_json_to({"type": "chat", "request_id": "w2", "messages": [{"role": "user", "content": "x"}]})
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frame = await ws.receive_json_from(timeout=5)
        if frame["type"] != "keepalive":
            frames.append(frame)
    assert frames[-1]["type"] == "done"
    await ws.disconnect()
    await running.close(1)
    await slots_free()
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=2)


async def test_bad_requests_take_no_slot(limit_settings, sim):
    for _ in range(5):
        reply = await call(application, "POST", "/chat/stream/", b'{"messages": []}', client=("10.0.0.1", 1))
        assert reply.status == 400
    assert limits.running("ip:10.0.0.1") == 0


async def test_every_ending_frees_the_slot(limit_settings, sim):
    """done, upstream error, client gone, cancel: after each, the visitor has both slots again."""
    for directive in ("chunks=3", "status=400", "status=500"):
        reply = await call(application, "POST", "/chat/stream/", chat(directive), client=("10.0.0.1", 1),
                           leave_after=None)
        assert reply.status == 200
        await slots_free()
    running = Running()
    await running.start()
    await running.close()
    await slots_free()
    reply = await call(application, "POST", "/chat/v1/chat/completions", openai_chat("status=503"),
                       client=("10.0.0.1", 1))
    assert reply.json()["error"]["code"] == "upstream_unavailable"  # (a 200 if the retries outlasted KEEPALIVE)
    await slots_free()
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=2)


# --------------------------------------------------------------------------- requests per minute


async def test_requests_per_minute(limit_settings, sim):
    limit_settings.CHATPROXY = {**limit_settings.CHATPROXY, "LIMITS": {"REQUESTS_PER_MINUTE": 3}}
    for _ in range(3):
        ok = await call(application, "POST", "/chat/stream/", chat("chunks=2"), client=("10.0.0.9", 1),
                        leave_after=None)
        assert ok.status == 200
    refused = await call(application, "POST", "/chat/stream/", chat(), client=("10.0.0.9", 1))
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "3 per minute" in refused.json()["error"]["message"]
    oai = await call(application, "POST", "/chat/v1/chat/completions", openai_chat(), client=("10.0.0.9", 1))
    assert oai.status == 429 and oai.json()["error"]["type"] == "rate_limit_error"
    other = await call(application, "POST", "/chat/stream/", chat("chunks=2"), client=("10.0.0.10", 1),
                       leave_after=None)
    assert other.status == 200


def test_requests_per_minute_window_resets(monkeypatch, settings):
    settings.CHATPROXY = {"LIMITS": {"REQUESTS_PER_MINUTE": 1, "MAX_STREAMS_PER_USER": None}}
    caches["default"].clear()
    now = [60.0 * 16_667 + 20]  # 20 s into a minute
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    limits.admit("u:1", 10)
    with pytest.raises(limits.LimitExceeded) as refused:
        limits.admit("u:1", 10)
    assert refused.value.retry_after == 40
    now[0] += 40  # the next minute
    limits.admit("u:1", 10)


# --------------------------------------------------------------------------- mechanics


def test_leases_lapse_when_a_worker_crashed(monkeypatch, settings):
    """A lease nobody gives back (its worker died) is counted for at least its ttl, then lapses
    (within twice its class's length, the class being the power of two at least ttl)."""
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": 2}}
    caches["default"].clear()
    start = 128.0 * 13_000_000 + 127.5  # the last half second of a 128 s window: the worst case
    clock = [start]
    monkeypatch.setattr(limits.time, "time", lambda: clock[0])  # limits' windows and LocMem's expiry
    limits.admit("u:7", ttl=100)
    limits.admit("u:7", ttl=100)  # both taken, never released
    for elapsed in (0, 60, 99.9):
        clock[0] = start + elapsed
        with pytest.raises(limits.LimitExceeded):
            limits.admit("u:7", ttl=100)
    assert limits.lease_class(100) == 7  # 128 s: lapsed once the window after next begins
    clock[0] = start + 128.5
    assert limits.running("u:7") == 0
    limits.admit("u:7", ttl=100)


def test_release_gives_back_one_lease_once(settings):
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": 2}}
    caches["default"].clear()
    first = limits.admit("u:8", ttl=100)
    second = limits.admit("u:8", ttl=100)
    assert limits.running("u:8") == 2
    first.release_now()
    first.release_now()  # twice is harmless: the other stream's lease stays counted
    first.release()
    assert limits.running("u:8") == 1
    limits.admit("u:8", ttl=100)
    with pytest.raises(limits.LimitExceeded):
        limits.admit("u:8", ttl=100)
    second.release_now()
    assert limits.running("u:8") == 1


def test_refused_admission_takes_nothing(settings):
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": 1}}
    caches["default"].clear()
    limits.admit("u:9", ttl=100)
    for _ in range(3):
        with pytest.raises(limits.LimitExceeded):
            limits.admit("u:9", ttl=100)
    assert limits.running("u:9") == 1


def test_leases_of_every_length_count_together(settings):
    """A short lease's admission sees the long ones (and the other way round)."""
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": 3}}
    caches["default"].clear()
    for ttl in (1, 10_000, 10**9):  # the smallest class, a middle one, beyond the largest
        limits.admit("u:10", ttl=ttl)
    for ttl in (30, 3_000_000):
        with pytest.raises(limits.LimitExceeded):
            limits.admit("u:10", ttl=ttl)
    assert limits.lease_class(1) == limits.MIN_CLASS and limits.lease_class(10**9) == limits.MAX_CLASS


class CountingCache:
    """The cache's calls and the keys they touch, counted (the real cache answers them)."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.calls = 0
        self.keys = 0

    def __getattr__(self, name):
        method = getattr(self.cache, name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.keys += len(args[0]) if name.endswith("_many") else 1
            return method(*args, **kwargs)

        return counted


@pytest.mark.parametrize("max_streams", [4, 100_000])
def test_admission_costs_the_same_whatever_the_limit(settings, monkeypatch, max_streams):
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": max_streams}}
    caches["default"].clear()
    counting = CountingCache(caches["default"])
    monkeypatch.setattr(limits, "_cache", lambda: counting)
    leases = [limits.admit("u:11", ttl=330) for _ in range(3)]
    for lease in leases:
        lease.release_now()
    # add + incr + one get_many per admission, one decr per release; the keys read are fixed
    assert counting.calls == 3 * 3 + 3
    assert counting.keys == 3 * (2 + 2 * (limits.MAX_CLASS - limits.MIN_CLASS + 1)) + 3


async def test_slot_ttl_covers_the_whole_stream(limit_settings, sim, monkeypatch):
    seen = []
    aadmit = limits.aadmit

    async def spy(who, ttl):
        seen.append((who, ttl))
        return await aadmit(who, ttl)

    monkeypatch.setattr(limits, "aadmit", spy)
    reply = await call(application, "POST", "/chat/stream/", chat(), client=("10.0.0.3", 1), leave_after=None)
    assert reply.status == 200
    # DEADLINE (20 s in settings, unless a profile says otherwise) + GRACE 0 + the margin
    assert seen == [("ip:10.0.0.3", resolve_policy("gpt-4o-mini").deadline + limits.SLOT_MARGIN)]


def test_identities():
    class User:
        is_authenticated = True
        pk = 42

    assert limits.identity(User(), "1.2.3.4") == "u:42"
    assert limits.identity(AnonymousUser(), "1.2.3.4") == "ip:1.2.3.4"
    assert limits.identity(None, None) == "ip:unknown"
    assert limits.identity_of({"user": User(), "client": ["5.6.7.8", 1]}) == "u:42"
    assert limits.identity_of({"user": AnonymousUser(), "client": ["5.6.7.8", 1]}) == "ip:5.6.7.8"
    assert limits.identity_of({"user": AnonymousUser(), "client": None}) == "ip:unknown"


@pytest.mark.parametrize(
    ("limits_setting", "errors"),
    [
        ({}, []),
        ({"REQUESTS_PER_MINUTE": 60}, []),
        ({"REQUESTS_PER_MINUTE": None, "MAX_STREAMS_PER_USER": None}, []),
        ({"REQUESTS_PER_MINUTE": 0}, ["REQUESTS_PER_MINUTE"]),
        ({"REQUESTS_PER_MINUTE": "60"}, ["REQUESTS_PER_MINUTE"]),
        ({"MAX_STREAMS_PER_USER": 0}, ["MAX_STREAMS_PER_USER"]),
        ({"MAX_MESSAGES": None}, ["MAX_MESSAGES"]),
    ],
)
def test_limits_checks(settings, limits_setting, errors):
    settings.CHATPROXY = {"UPSTREAM": {"API_KEY": "sk-x"}, "LIMITS": limits_setting}
    found = [e for e in run_checks(tags=["chatproxy"]) if e.id == "chatproxy.E006"]
    assert sorted(str(e.msg).split("'")[3] for e in found) == errors
    if found and "PER_" in errors[0]:
        assert "None" in found[0].hint


def test_unknown_limits_key_is_reported(settings):
    settings.CHATPROXY = {"UPSTREAM": {"API_KEY": "sk-x"}, "LIMITS": {"REQUESTS_PER_MINUTES": 5}}
    warnings = [e for e in run_checks(tags=["chatproxy"]) if e.id == "chatproxy.W002"]
    assert any("REQUESTS_PER_MINUTES" in str(w.msg) for w in warnings)


# --------------------------------------------------------------------------- across workers


@pytest.fixture(scope="module")
def two_workers(simulator, tmp_path_factory):
    """Two Daphne processes sharing one cache (a file cache: the test stand-in for Redis)."""
    env = simulator_env(simulator.base_url, log_level="ERROR", timeouts=LIVE_TIMEOUTS, resume=LIVE_RESUME,
                        limits={"MAX_STREAMS_PER_USER": 1})
    env["DJANGO_CACHE_DIR"] = str(tmp_path_factory.mktemp("shared-cache"))
    servers = [AppServer(env).start(), AppServer(env).start()]
    yield servers
    for server in servers:
        server.stop()


async def test_the_limit_holds_across_workers(two_workers, sim):
    first = await csrf_session(two_workers[0].url)
    second = await csrf_session(two_workers[1].url)
    try:
        body = {"messages": [{"role": "user", "content": f"A long one #{next(_unique)} [[sim {LONG}]]"}]}
        async with first.post("/chat/stream/", json=body) as running:
            assert running.status == 200
            head = await running.content.readuntil(b"event: delta")
            start = head.split(b"event: start\ndata: ", 1)[1].split(b"\n", 1)[0]
            async with second.post("/chat/stream/", json=json.loads(chat())) as refused:
                assert refused.status == 429 and refused.headers["Retry-After"] == str(limits.BUSY_RETRY_AFTER)
                assert (await refused.json())["error"]["code"] == "rate_limited"
            cancel = f"/chat/stream/{json.loads(start)['stream_id']}/cancel/"
            async with first.post(cancel) as cancelled:
                assert cancelled.status == 202
            await running.read()
        for _ in range(100):  # the first worker frees its slot when the stream has ended
            async with second.post("/chat/stream/", json=json.loads(chat("chunks=3"))) as again:
                if again.status != 429:
                    assert again.status == 200 and b"event: done" in await again.read()
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the slot was never freed")
    finally:
        await first.close()
        await second.close()
    await sim.await_until(lambda s: s["active_requests"] == 0, timeout=3)



# --------------------------------------------------------------------------- on Redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from tests.e2e.stack import HOST, redis_ping, start_redis, wait_until

    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        wait_until(lambda: redis_ping(port), "redis", [proc], timeout=10)
        yield f"redis://{HOST}:{port}/0"
    finally:
        proc.stop()


@pytest.fixture
def redis_limits(redis_server, settings):
    settings.CACHES = {**settings.CACHES,
                       "limits": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_server}}
    settings.CHATPROXY = {"LIMITS": {"MAX_STREAMS_PER_USER": 3}, "RESUME": {"CACHE": "limits"}}
    caches["limits"].clear()
    yield settings
    caches["limits"].clear()


def test_on_redis_concurrent_admissions_never_exceed_the_limit(redis_limits):
    """Eight threads (each its own Redis connections, as workers would) admit and release in a loop."""
    import threading

    held = 0
    most = 0
    admitted = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal held, most, admitted
        for _ in range(40):
            try:
                lease = limits.admit("u:20", ttl=330)
            except limits.LimitExceeded:
                continue
            with lock:
                held += 1
                admitted += 1
                most = max(most, held)
            time.sleep(0.001)
            with lock:
                held -= 1
            lease.release_now()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Racing admissions may both be refused (never both admitted past the limit): only the cap is exact.
    assert 0 < most <= 3, (most, admitted)
    assert admitted >= 8, (most, admitted)
    assert limits.running("u:20") == 0


def test_on_redis_a_crashed_workers_leases_lapse(redis_limits, monkeypatch):
    start = 64.0 * 27_000_000 + 10
    clock = [start]
    monkeypatch.setattr(limits, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    for _ in range(3):
        limits.admit("u:21", ttl=60)  # never released
    with pytest.raises(limits.LimitExceeded):
        limits.admit("u:21", ttl=60)
    clock[0] = start + 59
    assert limits.running("u:21") == 3
    clock[0] = start + 2 * 64
    assert limits.running("u:21") == 0
    limits.admit("u:21", ttl=60)


@pytest.mark.parametrize("when", ["allow", "refuse"])
async def test_when_the_cache_is_down(limit_settings, sim, when):
    """RESUME.CACHE is a Redis nobody listens on: LIMITS.WHEN_CACHE_DOWN serves the stream without
    the limits ("allow") or answers 503 ``unavailable`` with Retry-After ("refuse"); never a 500,
    and one warning for all the failed calls."""
    with socket.socket() as probe:  # a port with nothing behind it: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limit_settings.CACHES = {**limit_settings.CACHES, "down": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}}}
    limit_settings.CHATPROXY = {**limit_settings.CHATPROXY, "RESUME": {"CACHE": "down", "GRACE": 0.0},
                                "LIMITS": {"MAX_STREAMS_PER_USER": 2, "WHEN_CACHE_DOWN": when}}
    down = outage.of_cache("down")
    outages_before, failures_before = down.outages, down.failures if down.down else 0
    replies = [await call(application, "POST", "/chat/stream/", chat("chunks=2"), client=("10.0.0.7", 1),
                          leave_after=None) for _ in range(3)]
    if when == "allow":
        assert [r.status for r in replies] == [200, 200, 200]
        assert all(b"event: done" in r.body for r in replies)
    else:
        assert [r.status for r in replies] == [503, 503, 503]
        assert replies[0].json()["error"]["code"] == "unavailable"
        assert replies[0].headers["retry-after"] == "5"
    # At most one outage (one warning) for every failed call of the three requests.
    assert down.down and down.outages <= outages_before + 1 and down.failures >= failures_before + 3
