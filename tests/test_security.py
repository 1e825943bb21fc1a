"""Security (SPEC 10): oversized bodies, permissions on every way in, CSRF, WebSocket origins, and the
upstream API key never reaching a client, a log line or the admin.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from django.urls import include, path

from chatproxy.validation import max_body_bytes
from project.asgi import application
from tests.asgi_calls import call
from tests.servers import AppServer

pytestmark = pytest.mark.upstream

CHAT = json.dumps({"messages": [{"role": "user", "content": "Tell me about locks [[sim chunks=3]]"}]}).encode()
OPENAI_CHAT = json.dumps({"model": "gpt-4o-mini",
                          "messages": [{"role": "user", "content": "Locks? [[sim chunks=3]]"}]}).encode()

# A URLconf mounting chatproxy under another prefix (the guard finds chatproxy's views by resolving).
urlpatterns = [path("api/v2/chat/", include("chatproxy.urls"))]


@pytest.fixture
def chat_settings(sim, settings):
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
    server = AppServer({"CHATPROXY_SIMULATOR_URL": simulator.base_url, "DJANGO_DEBUG": "1",
                        "DJANGO_LOG_LEVEL": "ERROR"}, server="uvicorn").start()
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
