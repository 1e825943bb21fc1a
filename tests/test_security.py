"""Security: oversized bodies, permissions on every way in, CSRF, WebSocket origins, and the
upstream API key never reaching a client, a log line or the admin.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client
from django.urls import include, path
from django.utils import timezone

from chatproxy import profiles
from chatproxy.models import AccessKey, StreamRecord, TimeoutProfile
from chatproxy.upstream import detect_sdk
from chatproxy.validation import max_body_bytes
from project.asgi import application
from tests.asgi_calls import CSRF_TOKEN, call
from tests.servers import AppServer, simulator_env

CHAT = json.dumps({"messages": [{"role": "user", "content": "Tell me about locks [[sim chunks=3]]"}]}).encode()
OPENAI_CHAT = json.dumps({"model": "gpt-4o-mini",
                          "messages": [{"role": "user", "content": "Locks? [[sim chunks=3]]"}]}).encode()

# A URLconf mounting chatproxy under another prefix (the guard finds chatproxy's views by resolving).
urlpatterns = [path("api/v2/chat/", include("chatproxy.urls"))]


@pytest.fixture
def chat_settings(sim, settings):
    profiles.forget()
    settings.CHATPROXY = {
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-security"},
        "PERMISSION": "chatproxy.permissions.allow_any",
        "LIMITS": {"MAX_INPUT_CHARS": 10_000},  # body cap: 40,000 + 64 KiB = 105,536 bytes
        "RESUME": {"GRACE": 0.0},
        "RECORDS": {"ENABLED": False},
    }
    return settings


# --------------------------------------------------------------------------- oversized bodies


async def test_declared_oversized_body_is_refused_before_reading(chat_settings, sim):
    limit = max_body_bytes()
    assert limit == 40_000 + 64 * 1024
    reply = await call(application, "POST", "/chat/stream/", b"x" * (limit + 1))
    assert reply.status == 413 and reply.receive_calls == 0  # not one byte was read
    assert reply.json() == {"error": {"code": "bad_request",
                                      "message": f"The request body is too large (limit {limit} bytes)."}}
    assert reply.headers["connection"] == "close"
    reply = await call(application, "POST", "/chat/v1/chat/completions", b"x" * (limit + 1))
    assert reply.status == 413 and reply.receive_calls == 0
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "too large" in error["message"] and "param" in error
    reply = await call(application, "POST", "/chat/stream/abc/cancel/", b"x" * (limit + 1))
    assert reply.status == 413 and reply.receive_calls == 0
    assert sim.stats()["total_requests"] == 0


async def test_chunked_oversized_body_stops_being_read_at_the_cap(chat_settings, sim):
    chunks = [b"x" * 20_000] * 50  # 1 MB in 50 messages, no Content-Length
    reply = await call(application, "POST", "/chat/stream/", chunks, content_length=False)
    assert reply.status == 413 and "too large" in reply.json()["error"]["message"]
    assert reply.receive_calls == max_body_bytes() // 20_000 + 1  # one message past the cap, no more


async def test_bodies_under_the_cap_reach_django_whole(chat_settings, sim):
    pieces = [CHAT[:7], CHAT[7:30], b"", CHAT[30:]]
    reply = await call(application, "POST", "/chat/stream/", pieces, content_length=False, leave_after=None)
    assert reply.status == 200 and b"event: done" in reply.body
    padded = CHAT[:-1] + b', "model": null' + b" " * (max_body_bytes() - len(CHAT) - 20) + b"}"
    assert len(padded) <= max_body_bytes()
    reply = await call(application, "POST", "/chat/stream/", padded, leave_after=None)
    assert reply.status == 200 and b"event: done" in reply.body


async def test_malformed_content_length(chat_settings):
    reply = await call(application, "POST", "/chat/stream/", CHAT, content_length=False,
                       headers=[(b"content-length", b"12abc")])
    assert reply.status == 400 and "Content-Length" in reply.json()["error"]["message"]


async def test_other_requests_pass_the_guard_untouched(chat_settings):
    big = b"x" * (max_body_bytes() + 1)
    login = await call(application, "POST", "/admin/login/", big, content_type=b"application/x-www-form-urlencoded")
    assert login.status != 413
    get = await call(application, "GET", "/chat/stream/", big)
    assert get.status == 405  # the view answers; the guard only looks at POSTs


async def test_guard_finds_chatproxy_under_any_prefix(chat_settings, sim):
    chat_settings.ROOT_URLCONF = "tests.test_security"
    reply = await call(application, "POST", "/api/v2/chat/stream/", b"x" * (max_body_bytes() + 1))
    assert reply.status == 413 and reply.receive_calls == 0
    reply = await call(application, "POST", "/api/v2/chat/v1/chat/completions", b"x" * (max_body_bytes() + 1))
    assert reply.status == 413 and reply.json()["error"]["type"] == "invalid_request_error"
    reply = await call(application, "POST", "/api/v2/chat/stream/", CHAT, leave_after=None)
    assert reply.status == 200 and b"event: done" in reply.body


async def test_view_refuses_oversized_bodies_even_without_the_guard(chat_settings, settings):
    """Without the middleware (an app wired as plain Django): the view's own check, and Django's."""
    from django.core.asgi import get_asgi_application

    plain = get_asgi_application()
    reply = await call(plain, "POST", "/chat/stream/", b"x" * (max_body_bytes() + 1))
    assert reply.status == 413 and reply.json()["error"]["code"] == "bad_request"
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000  # below chatproxy's cap: Django refuses first
    reply = await call(plain, "POST", "/chat/stream/", CHAT[:-1] + b" " * 2000 + b"}")
    assert reply.status == 413 and "too large" in reply.json()["error"]["message"]


@pytest.fixture(scope="module")
def uvicorn_server(simulator):
    """uvicorn streams request bodies to the application (Daphne buffers them first)."""
    server = AppServer(simulator_env(simulator.base_url, log_level="ERROR"), server="uvicorn").start()
    yield server
    server.stop()


async def test_real_server_answers_413_without_waiting_for_the_body(uvicorn_server):
    host, port = uvicorn_server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /chat/stream/ HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 10000000000\r\n\r\n" + b"x" * 1000)  # 10 GB announced, 1 kB sent
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")


# --------------------------------------------------------------------------- permissions


def deny_all(request_or_scope) -> bool:
    return False


async def staff_only(request_or_scope) -> bool:
    """An async permission: awaited on every way in, and given the loaded user."""
    user = request_or_scope["user"] if isinstance(request_or_scope, dict) else request_or_scope.user
    return bool(user.is_authenticated and user.is_staff)


def ws_communicator(origin: bytes | None = b"http://localhost", cookie: bytes | None = None):
    headers = [(b"host", b"localhost")]
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, "/ws/chat/", headers=headers)


async def refusals(cookie: bytes | None = None, authorization: bytes | None = None) -> dict[str, int]:
    """The status of every way in (close code for the WebSocket) for one caller."""
    headers = []
    if cookie is not None:
        headers += [(b"cookie", cookie + b"; csrftoken=" + CSRF_TOKEN.encode()), (b"x-csrftoken", CSRF_TOKEN.encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    session = cookie is None
    out = {}
    for name, method, url, body in (("sse", "POST", "/chat/stream/", CHAT),
                                    ("openai", "POST", "/chat/v1/chat/completions", OPENAI_CHAT),
                                    ("models", "GET", "/chat/v1/models", b""),
                                    ("resume", "GET", "/chat/stream/" + "0" * 32 + "/", b""),
                                    ("cancel", "POST", "/chat/stream/" + "0" * 32 + "/cancel/", b"")):
        reply = await call(application, method, url, body, headers=headers, session=session, leave_after=None)
        out[name] = reply.status
        if reply.status >= 400:
            assert "error" in reply.json()
    ws = ws_communicator(cookie=cookie)
    connected, code = await ws.connect()
    out["websocket"] = 200 if connected else code
    if connected:
        await ws.disconnect()
    return out


@pytest.fixture
def permission_settings(chat_settings):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "tests.test_security.deny_all"}
    return chat_settings


@pytest.mark.django_db(transaction=True)
async def test_a_refusing_permission_closes_every_way_in(permission_settings, sim):
    assert await refusals() == {"sse": 403, "openai": 401, "models": 401, "resume": 403, "cancel": 403,
                                "websocket": 4403}
    assert sim.stats()["total_requests"] == 0


@pytest.mark.django_db(transaction=True)
async def test_permission_sees_the_loaded_user_on_every_way_in(permission_settings, sim):
    permission_settings.CHATPROXY = {**permission_settings.CHATPROXY, "PERMISSION": "tests.test_security.staff_only"}
    staff, staff_key = await sync_to_async(_user_with_session_and_key)("staff", is_staff=True)
    plain, plain_key = await sync_to_async(_user_with_session_and_key)("plain", is_staff=False)

    assert await refusals(cookie=plain) == {"sse": 403, "openai": 403, "models": 403, "resume": 403,
                                            "cancel": 403, "websocket": 4403}
    allowed = await refusals(cookie=staff)
    assert allowed == {"sse": 200, "openai": 200, "models": 200, "resume": 404, "cancel": 404, "websocket": 200}
    assert (await refusals(authorization=b"Bearer " + plain_key.encode()))["openai"] == 403
    by_key = await refusals(authorization=b"Bearer " + staff_key.encode())
    assert by_key["openai"] == 200 and by_key["models"] == 200
    assert by_key["sse"] == 403  # keys only open the OpenAI-compatible endpoint


def _user_with_session_and_key(name: str, *, is_staff: bool) -> tuple[bytes, str]:
    user = User.objects.create_user(name, password="pw-123456", is_staff=is_staff)
    client = Client()
    client.force_login(user)
    _, key = AccessKey.generate(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode(), key


@pytest.mark.django_db(transaction=True)
async def test_default_permission_refuses_anonymous_visitors(chat_settings, sim):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "chatproxy.permissions.authenticated"}
    assert await refusals() == {"sse": 403, "openai": 401, "models": 401, "resume": 403, "cancel": 403,
                                "websocket": 4403}


@pytest.mark.django_db(transaction=True)
async def test_only_the_owner_may_resume_or_cancel(chat_settings, sim):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "chatproxy.permissions.authenticated",
                               "RESUME": {"GRACE": 5.0}}
    owner, _ = await sync_to_async(_user_with_session_and_key)("owner", is_staff=False)
    other, _ = await sync_to_async(_user_with_session_and_key)("other", is_staff=False)

    def headers(cookie: bytes):
        return [(b"cookie", cookie + b"; csrftoken=" + CSRF_TOKEN.encode()), (b"x-csrftoken", CSRF_TOKEN.encode())]

    body = json.dumps({"messages": [{"role": "user", "content": "Long [[sim chunks=300 gap=0.02]]"}]}).encode()
    first = await call(application, "POST", "/chat/stream/", body, headers=headers(owner), session=False,
                       leave_after=2)
    assert first.status == 200
    stream_id = json.loads(first.body.split(b"data: ", 1)[1].split(b"\n", 1)[0])["stream_id"]
    url = f"/chat/stream/{stream_id}/"
    for cookie, status in ((other, 404), (None, 403)):
        extra = headers(cookie) if cookie else []
        assert (await call(application, "GET", url, b"", headers=extra, session=False)).status == status
        assert (await call(application, "POST", url + "cancel/", b"", headers=extra, session=False)).status == status
    ws = ws_communicator(cookie=other)
    assert (await ws.connect())[0]
    await ws.send_json_to({"type": "resume", "stream_id": stream_id, "last_event_id": 0})
    assert (await ws.receive_json_from(timeout=5))["code"] == "not_found"
    await ws.send_json_to({"type": "cancel", "request_id": stream_id})
    assert (await ws.receive_json_from(timeout=5))["code"] == "bad_request"
    await ws.disconnect()
    # Nothing of the above touched the stream; its owner cancels it.
    cancel = await call(application, "POST", url + "cancel/", b"", headers=headers(owner), session=False)
    assert cancel.status == 202
    rest = await call(application, "GET", url, b"", headers=headers(owner), session=False, leave_after=None,
                      query=b"last_event_id=2")
    assert rest.status == 200 and b'"code":"cancelled"' in rest.body
    await sim.await_until(lambda s: all(r["closed"] is not None for r in s["requests"]), timeout=3)


# --------------------------------------------------------------------------- CSRF and origins


@pytest.mark.django_db(transaction=True)
async def test_signed_in_session_posts_need_the_csrf_token(chat_settings, sim):
    user, _ = await sync_to_async(_user_with_session_and_key)("csrf-user", is_staff=False)
    no_token = [(b"cookie", user + f"; csrftoken={CSRF_TOKEN}".encode())]
    for url, body in (("/chat/stream/", CHAT), ("/chat/stream/" + "0" * 32 + "/cancel/", b""),
                      ("/chat/v1/chat/completions", OPENAI_CHAT)):
        refused = await call(application, "POST", url, body, headers=no_token, session=False)
        assert refused.status == 403, url
        error = refused.json()["error"]
        assert error["code"] == "csrf_failed" and "X-CSRFToken" in error["message"]
        wrong = await call(application, "POST", url, body, session=False,
                           headers=[*no_token, (b"x-csrftoken", b"x" * 32)])
        assert wrong.status == 403 and wrong.json()["error"]["code"] == "csrf_failed"
        foreign = await call(application, "POST", url, body, session=False,
                             headers=[*no_token, (b"x-csrftoken", CSRF_TOKEN.encode()),
                                      (b"origin", b"http://evil.example")])
        assert foreign.status == 403 and foreign.json()["error"]["code"] == "csrf_failed"
    assert sim.stats()["total_requests"] == 0
    with_token = [*no_token, (b"x-csrftoken", CSRF_TOKEN.encode()), (b"origin", b"http://localhost")]
    ok = await call(application, "POST", "/chat/stream/", CHAT, headers=with_token, session=False, leave_after=None)
    assert ok.status == 200 and b"event: done" in ok.body
    ok = await call(application, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, headers=with_token, session=False)
    assert ok.status == 200 and ok.json()["object"] == "chat.completion"


@pytest.mark.django_db(transaction=True)
async def test_anonymous_posts_need_no_csrf_token(chat_settings, sim):
    """With a permissive PERMISSION an anonymous visitor has no session to forge: no token needed."""
    for headers in ([], [(b"cookie", f"csrftoken={CSRF_TOKEN}".encode()), (b"x-csrftoken", b"x" * 32)]):
        sse = await call(application, "POST", "/chat/stream/", CHAT, headers=headers, session=False, leave_after=None)
        assert sse.status == 200 and b"event: done" in sse.body
        oai = await call(application, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, headers=headers,
                         session=False)
        assert oai.status == 200 and oai.json()["choices"][0]["message"]["content"]
        cancel = await call(application, "POST", "/chat/stream/" + "0" * 32 + "/cancel/", b"", headers=headers,
                            session=False)
        assert cancel.status == 404  # got past authorization: no such stream
    # A bearer key needs none either (no cookie involved).
    _, key = await sync_to_async(_user_with_session_and_key)("csrf-key", is_staff=False)
    by_key = await call(application, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, session=False,
                        headers=[(b"authorization", f"Bearer {key}".encode())])
    assert by_key.status == 200


async def test_get_needs_no_token(chat_settings):
    reply = await call(application, "GET", "/chat/stream/" + "0" * 32 + "/", b"", session=False)
    assert reply.status == 404


@pytest.mark.parametrize(("origin", "accepted"), [
    (b"http://localhost", True),
    (b"http://127.0.0.1:8000", True),
    (b"http://evil.example", False),
    (b"http://localhost.evil.example", False),
    (b"null", False),
    (None, False),
])
@pytest.mark.django_db(transaction=True)  # the consumer closes old database connections on each message
async def test_websocket_origins(chat_settings, origin, accepted):
    ws = ws_communicator(origin=origin)
    connected, _ = await ws.connect()
    assert connected is accepted
    if connected:
        await ws.disconnect()


# --------------------------------------------------------------------------- the upstream key stays secret

CANARY = "sk-canary-0d9c4b7e21f34a5b8c6d"


def _leaks(text: str) -> bool:
    # The whole key, or enough of it to matter (OpenAI's own 401 text quotes the first and last characters).
    return CANARY in text or CANARY[-12:] in text


def _log_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) + repr(record.__dict__) for record in records)


DRIVEN = [  # (way in, body or frame directive): every kind of ending, including failures
    ("sse", "chunks=3"), ("sse", "status=401"), ("sse", "status=403"), ("sse", "status=500"),
    ("sse", "chunks=6 stall_after=2 stall=30"), ("sse", "chunks=6 reset_after=2"),
    ("sse", "chunks=6 malformed_after=2"),
    ("sse", "status=429 retry_after=60"), ("sse", "nonsense=1"),
    ("openai", "chunks=3"), ("openai", "status=401"), ("openai-stream", "chunks=3"), ("openai-stream", "status=401"),
    ("openai-stream", "chunks=6 error_after=2"),
    ("websocket", "chunks=3"), ("websocket", "status=401"),
]


@pytest.mark.upstream  # also with the legacy SDK: each adapter could leak it its own way
@pytest.mark.django_db(transaction=True)
async def test_upstream_key_never_reaches_a_client_or_a_log(chat_settings, sim, caplog, monkeypatch):
    chat_settings.CHATPROXY = {
        **chat_settings.CHATPROXY,
        # The installed SDK ("auto" would take the SDK-less wire with the current one), whose own
        # debug logs must not carry the key either.
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": CANARY, "SDK": detect_sdk() or "none"},
        "TIMEOUTS": {"FIRST_TOKEN": 0.5, "STALL": 0.3, "KEEPALIVE": 0.2, "GATEWAY": 2.0, "MAX_ATTEMPTS": 2,
                     "BACKOFF_INITIAL": 0.01, "BACKOFF_MAX": 0.02},
        "RECORDS": {"ENABLED": True},
    }
    # Tiny timeouts whether they come from settings or from the admin's default profile.
    await TimeoutProfile.objects.filter(name="default").aupdate(
        first_token_timeout=0.5, stall_timeout=0.3, keepalive_interval=0.2, gateway_timeout=2.0, max_attempts=2,
        backoff_initial=0.01, backoff_max=0.02)
    profiles.forget()
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    seen: list[str] = []
    ws = ws_communicator()
    assert (await ws.connect())[0]
    for index, (way, directive) in enumerate(DRIVEN):
        content = f"Secrets #{index} [[sim {directive}]]"
        if way == "websocket":
            await ws.send_json_to({"type": "chat", "request_id": f"r{index}",
                                   "messages": [{"role": "user", "content": content}]})
            while True:
                frame = await ws.receive_output(timeout=5)
                seen.append(frame.get("text", ""))
                if '"type":"done"' in seen[-1] or '"type":"error"' in seen[-1]:
                    break
            continue
        if way == "sse":
            url, body = "/chat/stream/", {"messages": [{"role": "user", "content": content}]}
        else:
            url = "/chat/v1/chat/completions"
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
                    "stream": way == "openai-stream"}
        reply = await call(application, "POST", url, json.dumps(body).encode(), leave_after=None)
        # A failed JSON answer, or a stream refused before its 200, has the upstream's class of status.
        assert reply.status < 500 or way in ("openai", "openai-stream")
        seen.append(reply.body.decode("utf-8", "replace") + repr(reply.headers))

    # An unexpected exception inside the adapter: logged with its traceback, answered "internal".
    from chatproxy import service

    upstream = service.get_upstream()

    async def broken_open(request):
        raise RuntimeError("the adapter broke")

    monkeypatch.setattr(upstream, "open", broken_open)
    reply = await call(application, "POST", "/chat/stream/", CHAT, leave_after=None)
    assert b'"code":"internal"' in reply.body
    seen.append(reply.body.decode())
    monkeypatch.undo()

    for extra in ("/chat/v1/models", "/"):
        reply = await call(application, "GET", extra, b"", leave_after=None)
        seen.append(reply.body.decode("utf-8", "replace"))
    await ws.disconnect()
    await sim.await_until(lambda s: all(r["closed"] is not None for r in s["requests"]), timeout=5)
    await asyncio.sleep(0.3)  # records are written, signals dispatched

    assert _leaks(_log_text([logging.makeLogRecord({"msg": f"key={CANARY}"})]))  # the detector works
    assert any(r.name.startswith(("openai", "httpx", "httpcore")) for r in caplog.records)  # SDK debug logs seen
    assert any("credentials" in r.getMessage() for r in caplog.records)  # the 401s were logged ...
    assert any(r.exc_info for r in caplog.records)  # ... and the broken adapter's traceback
    assert not _leaks(_log_text(caplog.records))  # ... without the key
    assert not any(_leaks(text) for text in seen)
    assert "Authorization" not in "".join(seen) or "Bearer <key>" in "".join(seen)


@pytest.mark.django_db
def test_upstream_key_never_reaches_the_admin(admin_client, admin_user, settings):
    settings.CHATPROXY = {"UPSTREAM": {"API_KEY": CANARY, "BASE_URL": "http://127.0.0.1:9/v1"}}
    key, _ = AccessKey.generate(admin_user, "laptop")
    record = StreamRecord.objects.create(
        stream_id="a" * 32, user=admin_user, username="admin", model="gpt-4o-mini", profile="default",
        started=timezone.now(), time_to_first_token=0.4, longest_gap=0.2, attempts=2, retry_reasons="stall",
        outcome="done", duration=3.0, chars_sent=120)
    default = TimeoutProfile.objects.get(name="default")
    pages = [
        "/admin/", "/admin/chatproxy/",
        "/admin/chatproxy/accesskey/", "/admin/chatproxy/accesskey/add/",
        f"/admin/chatproxy/accesskey/{key.pk}/change/",
        "/admin/chatproxy/timeoutprofile/", "/admin/chatproxy/timeoutprofile/add/",
        f"/admin/chatproxy/timeoutprofile/{default.pk}/change/",
        "/admin/chatproxy/streamrecord/", f"/admin/chatproxy/streamrecord/{record.pk}/change/",
        "/admin/chatproxy/streamrecord/stats/", "/admin/chatproxy/streamrecord/stats/?window=7d",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        assert not _leaks(response.content.decode()), page


@pytest.fixture(scope="module")
def canary_server(simulator):
    """The sample project in its real-API configuration, the simulator standing in for the API."""
    server = AppServer({
        "OPENAI_API_KEY": CANARY,
        "OPENAI_BASE_URL": simulator.base_url,
        "CHATPROXY_TIMEOUTS": json.dumps({"FIRST_TOKEN": 0.5, "STALL": 0.3, "KEEPALIVE": 0.2, "GATEWAY": 2.0,
                                          "MAX_ATTEMPTS": 2, "BACKOFF_INITIAL": 0.01, "BACKOFF_MAX": 0.02}),
        "CHATPROXY_RESUME": json.dumps({"GRACE": 0.2}),
        "DJANGO_DEBUG": "1",
        "DJANGO_LOG_LEVEL": "DEBUG",
    }, capture_stderr=True).start()
    server.manage("createsuperuser", "--noinput", "--username", "root", "--email", "root@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": "root-pass-123"})
    yield server
    server.stop()


@pytest.mark.upstream
async def test_upstream_key_never_reaches_the_live_servers_log_clients_or_admin(canary_server, sim):
    import aiohttp
    import websockets
    import yarl

    seen: list[bytes] = []
    async with aiohttp.ClientSession(canary_server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get("/") as response:
            seen.append(await response.read())
        token = session.cookie_jar.filter_cookies(yarl.URL(canary_server.url))["csrftoken"].value
        session.headers["X-CSRFToken"] = token
        for index, directive in enumerate(("chunks=3", "status=401", "status=500", "chunks=6 stall_after=2 stall=30",
                                           "chunks=6 reset_after=2", "nonsense=1")):
            body = {"messages": [{"role": "user", "content": f"Live secrets #{index} [[sim {directive}]]"}]}
            async with session.post("/chat/stream/", json=body) as response:
                seen.append(await response.read() + repr(response.headers).encode())
            for stream in (False, True):
                body = {"model": "gpt-4o-mini", "stream": stream,
                        "messages": [{"role": "user", "content": f"Live secrets #{index} [[sim {directive}]]"}]}
                async with session.post("/chat/v1/chat/completions", json=body) as response:
                    seen.append(await response.read() + repr(response.headers).encode())
        for bad in (b"{nope", b'{"messages": []}', b"x" * 1_000_000):
            async with session.post("/chat/stream/", data=bad, headers={"Content-Type": "application/json"}) as r:
                seen.append(await r.read())
        async with session.get("/chat/stream/" + "0" * 32 + "/") as response:
            seen.append(await response.read())

        url = canary_server.url.replace("http://", "ws://") + "/ws/chat/"
        async with websockets.connect(url, origin=canary_server.url.replace("127.0.0.1", "localhost")) as socket:
            for request_id, directive in (("ok", "chunks=3"), ("refused", "status=401")):
                await socket.send(json.dumps({"type": "chat", "request_id": request_id, "messages": [
                    {"role": "user", "content": f"WebSocket secrets [[sim {directive}]]"}]}))
                while True:
                    frame = await asyncio.wait_for(socket.recv(), 5)
                    seen.append(frame.encode() if isinstance(frame, str) else frame)
                    if '"type":"done"' in seen[-1].decode() or '"type":"error"' in seen[-1].decode():
                        break
            await socket.send("{broken")
            seen.append((await asyncio.wait_for(socket.recv(), 5)).encode())

        async with session.post("/admin/login/", data={"username": "root", "password": "root-pass-123",
                                                       "csrfmiddlewaretoken": token, "next": "/admin/"}) as response:
            assert response.status == 200 and "Log out" in await response.text()
        for page in ("/admin/", "/admin/chatproxy/accesskey/", "/admin/chatproxy/accesskey/add/",
                     "/admin/chatproxy/timeoutprofile/", "/admin/chatproxy/timeoutprofile/add/",
                     "/admin/chatproxy/streamrecord/", "/admin/chatproxy/streamrecord/stats/"):
            async with session.get(page) as response:
                assert response.status == 200, page
                seen.append(await response.read())

    await sim.await_until(lambda s: all(r["closed"] is not None for r in s["requests"]), timeout=5)
    assert len(sim.stats()["requests"]) >= 12
    await asyncio.sleep(0.5)  # the last log lines are written
    log = canary_server.log()
    assert "credentials" in log and "Bad Request" in log  # the failures were logged ...
    assert not _leaks(log)  # ... and the key was not
    assert not any(_leaks(page.decode("utf-8", "replace")) for page in seen)
