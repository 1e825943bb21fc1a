"""System checks: each id with ``override_settings`` + ``run_checks()``, and a hint for each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.middleware.csrf import CsrfViewMiddleware
from django.test import modify_settings, override_settings
from django.utils.deprecation import MiddlewareMixin

from chatproxy import checks

UPSTREAM = {"BASE_URL": "http://127.0.0.1:9/v1", "API_KEY": "sk-test-checks"}


def found(chatproxy=None, **settings) -> dict[str, list]:
    """chatproxy's check messages by id, under ``CHATPROXY=chatproxy`` and other ``settings``."""
    if chatproxy is not None:
        settings["CHATPROXY"] = chatproxy
    settings.setdefault("DEBUG", True)  # the test runner turns it off; W003 and W004 depend on it
    with override_settings(**settings):
        messages = [m for m in run_checks(tags=["chatproxy"]) if m.id.startswith("chatproxy.")]
    by_id: dict[str, list] = {}
    for message in messages:
        assert message.hint, f"{message.id} has no hint"
        by_id.setdefault(message.id, []).append(message)
    return by_id


def with_upstream(**sections):
    return {"UPSTREAM": UPSTREAM, **sections}


def test_sound_settings_pass():
    assert found(with_upstream()) == {}


def test_e001_keepalive_not_below_gateway():
    result = found(with_upstream(TIMEOUTS={"KEEPALIVE": 60, "GATEWAY": 60}))
    (error,) = result["chatproxy.E001"]
    assert "keepalive must be shorter than the gateway timeout" in error.msg
    assert "e.g. 15 s" in error.hint


def test_e001_stall_and_first_token_not_below_deadline():
    result = found(with_upstream(TIMEOUTS={"STALL": 300, "FIRST_TOKEN": 400, "DEADLINE": 300}))
    messages = " ".join(e.msg for e in result["chatproxy.E001"])
    assert "stall must be shorter than the deadline" in messages
    assert "first_token must be shorter than the deadline" in messages
    assert all("DEADLINE (now 300 s)" in e.hint for e in result["chatproxy.E001"])


def test_e001_wrong_type():
    (error,) = found(with_upstream(TIMEOUTS={"STALL": "ten"}))["chatproxy.E001"]
    assert "wrong type" in error.msg


def test_e002_unknown_sdk_choice():
    assert "chatproxy.E002" in found({"UPSTREAM": {**UPSTREAM, "SDK": "magic"}})


def test_e003_missing_sdk(monkeypatch):
    monkeypatch.setattr(checks, "detect_sdk", lambda: None)
    (error,) = found({"UPSTREAM": {**UPSTREAM, "SDK": "current"}})["chatproxy.E003"]
    assert "no usable openai package is installed" in error.msg and "pip install" in error.hint
    (error,) = found({"UPSTREAM": {**UPSTREAM, "SDK": "legacy"}})["chatproxy.E003"]
    assert "chatproxy[legacy]" in error.hint


def test_e004_permission_not_importable():
    assert "chatproxy.E004" in found(with_upstream(PERMISSION="chatproxy.permissions.nobody"))


@pytest.mark.parametrize("value", [["UPSTREAM"], "settings", {"TIMEOUTS": 5}, {"LIMITS": ["MAX_MESSAGES"]}])
def test_e005_not_a_dict(value):
    result = found(value)
    assert list(result) == ["chatproxy.E005"]  # nothing else is read


def test_w002_unknown_keys():
    result = found(with_upstream(TIMEOUT={"STALL": 1}, TIMEOUTS={"STAL": 1}))
    messages = sorted(w.msg for w in result["chatproxy.W002"])
    assert messages == ["Unknown key CHATPROXY['TIMEOUT'] is ignored.",
                        "Unknown key CHATPROXY['TIMEOUTS']['STAL'] is ignored."]


@pytest.mark.parametrize("limits", [{"MAX_MESSAGES": 0}, {"MAX_INPUT_CHARS": "200000"}, {"MAX_MESSAGES": 1.5}])
def test_e006_limits(limits):
    assert "chatproxy.E006" in found(with_upstream(LIMITS=limits))


@pytest.mark.parametrize("resume", [{"CACHE": "nope"}, {"TTL": 0}, {"GRACE": -1}, {"GRACE": "soon"}])
def test_e007_resume(resume):
    assert "chatproxy.E007" in found(with_upstream(RESUME=resume))


@pytest.mark.parametrize(
    "upstream",
    [{"MODEL": ""}, {"MODELS": "gpt-4o"}, {"MODELS": ["gpt-4o"], "MODEL": "gpt-4o-mini"}, {"EXTRA_BODY": []}],
)
def test_e008_models(upstream):
    assert "chatproxy.E008" in found({"UPSTREAM": {**UPSTREAM, **upstream}})


def test_e009_no_asgi_application():
    (error,) = found(with_upstream(), ASGI_APPLICATION=None)["chatproxy.E009"]
    assert "ASGI" in error.msg and "buffered" in error.hint


def test_e010_consumer_routed_without_channels():
    assert checks._consumer_routed()  # the sample project routes ChatConsumer
    (error,) = found(with_upstream(), CHANNEL_LAYERS={})["chatproxy.E010"]
    assert "ChatConsumer" in error.msg and "CHANNEL_LAYERS" in error.hint
    with modify_settings(INSTALLED_APPS={"remove": ["channels"]}):
        assert "chatproxy.E010" in found(with_upstream())


@pytest.mark.parametrize("records", [{"ENABLED": "yes"}, {"RETENTION_DAYS": 0}, {"RETENTION_DAYS": None}])
def test_e011_records(records):
    assert "chatproxy.E011" in found(with_upstream(RECORDS=records))


def test_w001_no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "chatproxy.W001" in found({"UPSTREAM": {"API_KEY": None}})


def test_w003_per_process_cache_in_production():
    locmem = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    dummy = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    shared = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": "/tmp/chatproxy-test-checks-cache"}}
    (warning,) = found(with_upstream(), DEBUG=False, CACHES=locmem)["chatproxy.W003"]
    assert "never reaches other worker processes" in warning.msg
    (warning,) = found(with_upstream(), DEBUG=False, CACHES=dummy)["chatproxy.W003"]
    assert "only after up to 5 s" in warning.msg
    assert "chatproxy.W003" not in found(with_upstream(), DEBUG=False, CACHES=shared)
    assert "chatproxy.W003" not in found(with_upstream(), DEBUG=True, CACHES=locmem)


def test_w004_runserver_without_daphne():
    with modify_settings(INSTALLED_APPS={"remove": ["daphne"]}):
        assert "chatproxy.W004" in found(with_upstream(), DEBUG=True)
        assert "chatproxy.W004" not in found(with_upstream(), DEBUG=False)


class LoggingMiddleware(MiddlewareMixin):  # a project's own MiddlewareMixin: its hooks hop to a thread
    def process_request(self, request):
        return None

    def process_response(self, request, response):
        return response


class StrictCsrf(CsrfViewMiddleware):  # a subclass of a known one may change any hook
    pass


def sync_only(get_response):
    return get_response


def test_w005_middleware_that_runs_in_a_thread_under_direct_streams():
    assert checks._in_asgi_application(checks._is_direct_streams)  # the sample project uses DirectStreams
    assert "chatproxy.W005" not in found(with_upstream())  # Django's own middleware: all on the loop
    ours = "tests.test_checks.LoggingMiddleware"
    (warning,) = found(with_upstream(), MIDDLEWARE=[*settings.MIDDLEWARE, ours])["chatproxy.W005"]
    assert ours in warning.msg and "process_request, process_response" in warning.msg
    assert "async" in warning.hint
    (warning,) = found(with_upstream(), MIDDLEWARE=[*settings.MIDDLEWARE, "tests.test_checks.sync_only"])[
        "chatproxy.W005"]
    assert "synchronous only" in warning.msg
    (warning,) = found(with_upstream(), CSRF_USE_SESSIONS=True)["chatproxy.W005"]  # the secret is in the session
    assert "CsrfViewMiddleware" in warning.msg and "process_view" in warning.msg
    strict = [m if not m.endswith(".CsrfViewMiddleware") else "tests.test_checks.StrictCsrf"
              for m in settings.MIDDLEWARE]
    assert "StrictCsrf" in found(with_upstream(), MIDDLEWARE=strict)["chatproxy.W005"][0].msg
    # Async middleware runs on the loop; without DirectStreams nothing is said.
    assert "chatproxy.W005" not in found(with_upstream(), MIDDLEWARE=[*settings.MIDDLEWARE,
                                                                      "tests.test_direct.alternate_urlconf"])
    assert "chatproxy.W005" not in found(with_upstream(), MIDDLEWARE=[*settings.MIDDLEWARE, ours],
                                         ASGI_APPLICATION="chatproxy.asgi.RequestSizeGuard")


def test_ids_are_documented():
    documented = checks.__doc__
    source = Path(checks.__file__).read_text()
    for code in set(re.findall(r'id="(chatproxy\.[EW]\d{3})"', source)):
        assert f"``{code}``" in documented
