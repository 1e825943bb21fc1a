"""``chatproxy.asgi.DirectStreams``: the stream-opening endpoints served by ``DirectHandler`` (Django's
ASGI handler with Django's own middleware hooks on the event loop, no thread per request) versus
the same requests through Django's ``ASGIHandler``.

The rest of the suite already drives both paths: the live servers and ``tests/asgi_calls.py`` use
``project.asgi.application`` (DirectStreams), Django's test clients use Django's handler. Here:
that the direct path answers as Django does (the project's middleware, host validation, exception
handling, signals, URLconfs), and what it saves (no thread per open stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading

import pytest
from asgiref.sync import sync_to_async
from django.conf.urls.i18n import i18n_patterns
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.core import signals
from django.core.exceptions import PermissionDenied, SuspiciousOperation
from django.core.handlers.asgi import ASGIHandler
from django.http import JsonResponse
from django.test import Client
from django.urls import include, path
from django.utils import translation
from django.utils.decorators import async_only_middleware

from chatproxy.asgi import DirectStreams, RequestSizeGuard
from chatproxy.validation import max_body_bytes
from project.asgi import application
from tests.asgi_calls import call
from tests.test_security import chat_settings as security_settings  # noqa: F401 (a fixture)

CHAT = json.dumps({"messages": [{"role": "user", "content": "Tell me about tides [[sim chunks=3]]"}]}).encode()
SLOW_CHAT = json.dumps({"messages": [{"role": "user", "content": "Slowly [[sim chunks=4 gap=0.5]]"}]}).encode()
OPENAI_CHAT = json.dumps({"model": "gpt-4o-mini", "stream": True,
                          "messages": [{"role": "user", "content": "Tides? [[sim chunks=3]]"}]}).encode()
ENDPOINTS = [("/chat/stream/", CHAT), ("/chat/v1/chat/completions", OPENAI_CHAT)]

seen_languages: list[str] = []


def record_language(request) -> bool:  # PERMISSION callables: they run inside the view
    seen_languages.append(translation.get_language())
    return True


def explode(request) -> bool:
    raise RuntimeError("a bug in a permission callable")


def deny(request) -> bool:
    raise PermissionDenied("not this one")


def suspicious(request) -> bool:
    raise SuspiciousOperation("a forged something")


async def touch_session(request) -> bool:
    await request.session.aset("chatproxy_seen", "yes")
    return True


async def alternate_view(request):
    return JsonResponse({"served_by": "alternate"})


class AlternateURLs:
    """A per-request URLconf (``request.urlconf``) that maps ``/chat/stream/`` elsewhere."""

    urlpatterns = [path("chat/stream/", alternate_view)]


class I18nURLs:
    """A root URLconf with chatproxy under ``i18n_patterns``."""

    urlpatterns = i18n_patterns(path("chat/", include("chatproxy.urls")))


@async_only_middleware
def alternate_urlconf(get_response):
    async def middleware(request):
        request.urlconf = AlternateURLs
        return await get_response(request)

    return middleware


@pytest.fixture
def chat_settings(security_settings):  # noqa: F811 (pytest passes the imported fixture)
    """test_security's settings (simulator, allow_any, no grace, no records), without the per-user
    stream limit: every call here comes from one address."""
    limits = {**security_settings.CHATPROXY["LIMITS"], "MAX_STREAMS_PER_USER": None}
    security_settings.CHATPROXY = {**security_settings.CHATPROXY, "LIMITS": limits}
    return security_settings


def permission(settings, name: str) -> None:
    settings.CHATPROXY = {**settings.CHATPROXY, "PERMISSION": f"tests.test_direct.{name}"}


def use_isolated_simulator(settings, isolated_sim) -> None:
    upstream = {**settings.CHATPROXY["UPSTREAM"], "BASE_URL": isolated_sim.base_url}
    settings.CHATPROXY = {**settings.CHATPROXY, "UPSTREAM": upstream}


def direct_path() -> DirectStreams:
    """The sample project's ``http`` app, built now (middleware read from the current settings)."""
    return DirectStreams(ASGIHandler())


def django_path() -> RequestSizeGuard:
    """The same, with every request through Django's handler and middleware."""
    return RequestSizeGuard(ASGIHandler())


@pytest.fixture(params=[direct_path, django_path], ids=["direct", "django"])
def make_app(request):
    """Both paths: what the direct one answers must be what Django answers."""
    return request.param


def test_the_sample_project_serves_its_streams_directly():
    http = application.application_mapping["http"]
    assert isinstance(http, DirectStreams) and isinstance(http.app, ASGIHandler)


async def test_streams_get_the_projects_middleware(chat_settings, sim, make_app):
    app = make_app()
    sse = await call(app, "POST", "/chat/stream/", CHAT, leave_after=None)
    assert sse.status == 200 and sse.complete
    assert sse.headers["content-type"] == "text/event-stream"
    assert sse.headers["x-accel-buffering"] == "no" and sse.headers["cache-control"] == "no-cache"
    assert sse.body.startswith(b": open\n") and b"event: done" in sse.body
    openai = await call(app, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, leave_after=None)
    assert openai.status == 200 and openai.body.rstrip().endswith(b"data: [DONE]")
    for reply in (sse, openai):  # SecurityMiddleware, XFrameOptionsMiddleware
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["referrer-policy"] == "same-origin"
        assert reply.headers["cross-origin-opener-policy"] == "same-origin"


@pytest.mark.parametrize(("url", "body"), ENDPOINTS)
async def test_a_host_not_in_allowed_hosts_is_refused_before_anything_streams(chat_settings, sim, caplog, make_app,
                                                                           url, body):
    with caplog.at_level(logging.ERROR, logger="django.security"):
        reply = await call(make_app(), "POST", url, body, host=b"evil.example", leave_after=None)
    assert reply.status == 400 and reply.complete
    assert b"data:" not in reply.body and b"event:" not in reply.body
    assert sim.stats()["total_requests"] == 0
    assert any(r.name == "django.security.DisallowedHost" and "evil.example" in r.getMessage()
               for r in caplog.records)


async def test_hsts_and_the_ssl_redirect(chat_settings, sim, make_app):
    chat_settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    chat_settings.SECURE_HSTS_SECONDS = 3600
    chat_settings.SECURE_SSL_REDIRECT = True
    app = make_app()
    https = [(b"x-forwarded-proto", b"https"), (b"origin", b"https://localhost")]  # CSRF checks the origin
    secure = await call(app, "POST", "/chat/stream/", CHAT, headers=https, leave_after=None)
    assert secure.status == 200 and secure.headers["strict-transport-security"] == "max-age=3600"
    plain = await call(app, "POST", "/chat/v1/chat/completions", OPENAI_CHAT, leave_after=None)
    assert plain.status == 301 and plain.headers["location"] == "https://localhost/chat/v1/chat/completions"
    assert sim.stats()["total_requests"] == 1  # the secure one only


def _user_session() -> tuple[bytes, str]:
    client = Client()
    client.force_login(User.objects.create_user("reader", password="pw-123456"))
    key = client.cookies["sessionid"].value
    return f"sessionid={key}; csrftoken=".encode(), key


@pytest.mark.usefixtures("async_db")
async def test_a_session_user_gets_vary_cookie_and_a_modified_session_is_saved(chat_settings, sim, make_app):
    from tests.asgi_calls import CSRF_TOKEN

    app = make_app()
    cookie, key = await sync_to_async(_user_session)()
    headers = [(b"cookie", cookie + CSRF_TOKEN.encode()), (b"x-csrftoken", CSRF_TOKEN.encode())]
    read = await call(app, "POST", "/chat/stream/", CHAT, session=False, headers=headers, leave_after=None)
    assert read.status == 200 and "Cookie" in read.headers["vary"]
    assert "sessionid=" not in read.headers.get("set-cookie", "")  # not modified: not saved

    permission(chat_settings, "touch_session")
    changed = await call(app, "POST", "/chat/stream/", CHAT, session=False, headers=headers, leave_after=None)
    assert changed.status == 200 and "Cookie" in changed.headers["vary"]
    assert f"sessionid={key}" in changed.headers["set-cookie"]  # saved, and the cookie refreshed
    assert await SessionStore(key).aget("chatproxy_seen") == "yes"


@pytest.mark.parametrize(("url", "body"), ENDPOINTS)
async def test_permission_denied_in_a_permission_callable_is_403(chat_settings, sim, make_app, url, body):
    permission(chat_settings, "deny")
    reply = await call(make_app(), "POST", url, body)
    assert reply.status == 403 and b"403 Forbidden" in reply.body  # Django's handler403
    assert sim.stats()["total_requests"] == 0


async def test_a_suspicious_operation_is_400_and_logged_for_security(chat_settings, sim, caplog, make_app):
    permission(chat_settings, "suspicious")
    with caplog.at_level(logging.ERROR, logger="django.security"):
        reply = await call(make_app(), "POST", "/chat/stream/", CHAT)
    assert reply.status == 400
    assert any(r.name == "django.security.SuspiciousOperation" and "a forged something" in r.getMessage()
               for r in caplog.records)


async def test_an_unexpected_error_is_djangos_500_and_reaches_error_reporters(chat_settings, sim, caplog, make_app):
    """Django's handler500 answers (HTML unless the project's URLconf sets its own), as for any
    view of the project; got_request_exception reaches error reporters (Sentry and the like)."""
    permission(chat_settings, "explode")
    reported = []

    def reporter(sender, request, **kwargs):
        reported.append(request.path)

    signals.got_request_exception.connect(reporter)
    try:
        with caplog.at_level(logging.ERROR, logger="django.request"):
            sse = await call(make_app(), "POST", "/chat/stream/", CHAT)
            openai = await call(make_app(), "POST", "/chat/v1/chat/completions", OPENAI_CHAT)
    finally:
        signals.got_request_exception.disconnect(reporter)
    assert sse.status == 500 and openai.status == 500
    assert b"Server Error (500)" in sse.body and b"RuntimeError" not in sse.body
    assert reported == ["/chat/stream/", "/chat/v1/chat/completions"]
    assert any("Internal Server Error: /chat/stream/" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_per_request_urlconf_is_honoured(chat_settings, sim, make_app):
    chat_settings.MIDDLEWARE = ["tests.test_direct.alternate_urlconf", *chat_settings.MIDDLEWARE]
    reply = await call(make_app(), "POST", "/chat/stream/", CHAT)
    assert reply.status == 200 and reply.json() == {"served_by": "alternate"}
    assert sim.stats()["total_requests"] == 0


async def test_i18n_patterns_find_the_streams_in_every_language(chat_settings, sim):
    chat_settings.ROOT_URLCONF = I18nURLs
    chat_settings.MIDDLEWARE = [*chat_settings.MIDDLEWARE, "django.middleware.locale.LocaleMiddleware"]
    permission(chat_settings, "record_language")
    app = direct_path()
    seen_languages.clear()
    reply = await call(app, "POST", "/fr/chat/stream/", CHAT)
    assert reply.status == 200 and reply.headers["content-language"] == "fr"
    assert seen_languages == ["fr"]
    # The size guard knows the URL in French too: it refuses before reading a byte.
    too_big = await call(app, "POST", "/fr/chat/stream/", b"x" * (max_body_bytes() + 1))
    assert too_big.status == 413 and too_big.receive_calls == 0


async def test_the_request_language_is_active_when_locale_middleware_is_installed(chat_settings, sim):
    permission(chat_settings, "record_language")
    chat_settings.MIDDLEWARE = [*chat_settings.MIDDLEWARE, "django.middleware.locale.LocaleMiddleware"]
    seen_languages.clear()
    reply = await call(direct_path(), "POST", "/chat/stream/", CHAT, headers=[(b"accept-language", b"fr")])
    assert reply.status == 200 and reply.headers["content-language"] == "fr"
    assert seen_languages == ["fr"]


async def test_request_signals_are_sent_once_and_their_receivers_run_off_the_loop(chat_settings, isolated_sim,
                                                                                make_app):
    """request_started before the view, request_finished when the response is closed (after the
    stream, or after the client left): their synchronous receivers run in a thread, as Django
    runs them, never on the event loop."""
    use_isolated_simulator(chat_settings, isolated_sim)
    app = make_app()
    loop_thread = threading.current_thread()
    events: list[tuple[str, bool]] = []

    def started(sender, **kwargs):
        events.append(("started", threading.current_thread() is loop_thread))

    def finished(sender, **kwargs):
        events.append(("finished", threading.current_thread() is loop_thread))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        whole = await call(app, "POST", "/chat/stream/", CHAT, leave_after=None)
        assert whole.complete and events == [("started", False), ("finished", False)]
        events.clear()
        left = await call(app, "POST", "/chat/stream/", SLOW_CHAT, leave_after=2)
        assert not left.complete and events == [("started", False), ("finished", False)]
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)


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
