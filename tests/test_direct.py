"""``chatproxy.asgi.DirectStreams``: the stream-opening endpoints served from ASGI, past Django's
handler and middleware (the sample project's ``http`` app), versus the same requests through Django.

The rest of the suite already drives both paths: the live servers and ``tests/asgi_calls.py`` use
``project.asgi.application`` (DirectStreams), Django's test clients use Django's handler. Here:
what the direct path promises on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading

import pytest
from django.utils import translation

from chatproxy.asgi import DirectStreams, RequestSizeGuard
from project.asgi import application
from tests.asgi_calls import call
from tests.test_security import chat_settings as security_settings  # noqa: F401 (a fixture)

CHAT = json.dumps({"messages": [{"role": "user", "content": "Tell me about tides [[sim chunks=3]]"}]}).encode()
SLOW_CHAT = json.dumps({"messages": [{"role": "user", "content": "Slowly [[sim chunks=4 gap=0.5]]"}]}).encode()
OPENAI_CHAT = json.dumps({"model": "gpt-4o-mini", "stream": True,
                          "messages": [{"role": "user", "content": "Tides? [[sim chunks=3]]"}]}).encode()

seen_languages: list[str] = []


def record_language(request) -> bool:  # a PERMISSION callable: runs inside the view
    seen_languages.append(translation.get_language())
    return True


def explode(request) -> bool:
    raise RuntimeError("a bug in a permission callable")


@pytest.fixture
def chat_settings(security_settings):  # noqa: F811 (pytest passes the imported fixture)
    """test_security's settings (simulator, allow_any, no grace, no records), without the per-user
    stream limit: every call here comes from one address."""
    limits = {**security_settings.CHATPROXY["LIMITS"], "MAX_STREAMS_PER_USER": None}
    security_settings.CHATPROXY = {**security_settings.CHATPROXY, "LIMITS": limits}
    return security_settings


def use_isolated_simulator(settings, isolated_sim) -> None:
    upstream = {**settings.CHATPROXY["UPSTREAM"], "BASE_URL": isolated_sim.base_url}
    settings.CHATPROXY = {**settings.CHATPROXY, "UPSTREAM": upstream}


def django_path() -> RequestSizeGuard:
    """The same project with every request through Django's handler and middleware."""
    http = application.application_mapping["http"]
    assert isinstance(http, DirectStreams)
    return RequestSizeGuard(http.app)


async def test_sse_and_openai_streams_are_served_directly(chat_settings, sim):
    sse = await call(application, "POST", "/chat/stream/", CHAT, leave_after=None)
    assert sse.status == 200 and sse.complete
    assert sse.headers["content-type"] == "text/event-stream"
    assert sse.headers["x-accel-buffering"] == "no" and sse.headers["cache-control"] == "no-cache"
    assert sse.body.startswith(b": open\n") and b"event: done" in sse.body
    # No middleware ran: XFrameOptionsMiddleware would have added its header.
    assert "x-frame-options" not in sse.headers
    assert "x-frame-options" in (await call(django_path(), "POST", "/chat/stream/", CHAT, leave_after=None)).headers

    openai = await call(application, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, leave_after=None)
    assert openai.status == 200 and openai.body.rstrip().endswith(b"data: [DONE]")


async def test_refusals_have_a_content_length_and_the_endpoint_shape(chat_settings, sim):
    bad = await call(application, "POST", "/chat/stream/", b'{"messages": []}')
    assert bad.status == 400 and int(bad.headers["content-length"]) == len(bad.body)
    assert bad.json()["error"]["code"] == "bad_request"
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "tests.test_security.deny_all"}
    denied = await call(application, "POST", "/chat/stream/", CHAT)
    assert denied.status == 403 and denied.json()["error"]["code"] == "permission_denied"
    assert int(denied.headers["content-length"]) == len(denied.body)
    assert sim.stats()["total_requests"] == 0


async def test_a_departed_client_closes_the_upstream_at_once(chat_settings, isolated_sim):
    use_isolated_simulator(chat_settings, isolated_sim)
    reply = await call(application, "POST", "/chat/stream/", SLOW_CHAT, leave_after=3)
    assert reply.status == 200 and not reply.complete
    for _ in range(100):
        if isolated_sim.stats()["active_requests"] == 0:
            break
        await asyncio.sleep(0.01)
    assert isolated_sim.stats()["active_requests"] == 0


async def test_an_unexpected_error_is_one_json_500_and_a_log_line(chat_settings, sim, caplog):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "tests.test_direct.explode"}
    with caplog.at_level(logging.ERROR, logger="chatproxy.asgi"):
        reply = await call(application, "POST", "/chat/stream/", CHAT)
    assert reply.status == 500
    assert reply.json() == {"error": {"code": "internal",
                                      "message": "Something went wrong on our side. Please try again."}}
    assert b"RuntimeError" not in reply.body
    assert any("Internal Server Error: /chat/stream/" in r.getMessage() and r.exc_info for r in caplog.records)
    openai = await call(application, "POST", "/chat/v1/chat/completions", OPENAI_CHAT)
    assert openai.status == 500 and openai.json()["error"]["type"] == "api_error"


async def test_the_request_language_is_active_when_locale_middleware_is_installed(chat_settings, sim):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "PERMISSION": "tests.test_direct.record_language"}
    chat_settings.MIDDLEWARE = [*chat_settings.MIDDLEWARE, "django.middleware.locale.LocaleMiddleware"]
    seen_languages.clear()
    reply = await call(application, "POST", "/chat/stream/", CHAT, headers=[(b"accept-language", b"fr")])
    assert reply.status == 200
    assert seen_languages == ["fr"]


async def test_open_streams_hold_no_thread_each(chat_settings, isolated_sim):
    """Django runs each request's sync middleware in a thread of its own that lives as long as the
    response streams; the direct path needs none (memory per idle stream, bench/)."""
    use_isolated_simulator(chat_settings, isolated_sim)
    streams = 16
    # Shared pools may start threads (asyncio's default executor, for DNS lookups among others):
    # at most min(32, CPUs + 4) of them, whatever the number of streams.
    pool = min(32, (os.cpu_count() or 1) + 4)

    async def threads_while_streaming(app) -> int:
        before = threading.active_count()
        calls = [asyncio.ensure_future(call(app, "POST", "/chat/stream/", SLOW_CHAT, leave_after=None))
                 for _ in range(streams)]
        for _ in range(500):
            if isolated_sim.stats()["active_requests"] >= streams:
                break
            await asyncio.sleep(0.01)
        assert isolated_sim.stats()["active_requests"] == streams
        during = threading.active_count() - before
        for reply in await asyncio.gather(*calls):
            assert reply.status == 200
        return during

    assert await threads_while_streaming(application) <= pool < streams
    assert await threads_while_streaming(django_path()) >= streams
