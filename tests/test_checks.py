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
    assert error.msg.startswith("CHATPROXY['TIMEOUTS']['KEEPALIVE'] is 60.0: it must be shorter than GATEWAY (60 s)")
    assert error.hint.startswith("Lower KEEPALIVE (e.g. to 15 s) or raise GATEWAY")


def test_e001_stall_and_first_token_not_below_deadline():
    result = found(with_upstream(TIMEOUTS={"STALL": 300, "FIRST_TOKEN": 400, "DEADLINE": 300}))
    assert sorted(e.msg.split("]")[1] for e in result["chatproxy.E001"]) == ["['FIRST_TOKEN'", "['STALL'"]
    assert all("must be below DEADLINE (300 s), or no retry can ever happen" in e.msg
               for e in result["chatproxy.E001"])
    assert {e.hint for e in result["chatproxy.E001"]} == {"Lower STALL or raise DEADLINE.",
                                                          "Lower FIRST_TOKEN or raise DEADLINE."}


@pytest.mark.parametrize(
    ("timeouts", "says"),
    [
        ({"STALL": "ten"}, "['STALL'] is 'ten': it must be a positive number of seconds"),
        ({"CONNECT": 0}, "['CONNECT'] is 0.0: it must be a positive number of seconds"),
        ({"BACKOFF_MAX": -1}, "['BACKOFF_MAX'] is -1.0: it must be a number of seconds, 0 or more"),
        ({"MAX_ATTEMPTS": 11}, "['MAX_ATTEMPTS'] is 11: it must be a whole number from 1 to 10"),
        ({"ON_PARTIAL": "retry"}, "['ON_PARTIAL'] is 'retry': it must be one of restart, continue, fail"),
        ({"BACKOFF_INITIAL": 5}, "['BACKOFF_INITIAL'] is 5.0: it must not exceed BACKOFF_MAX (4 s)"),
    ],
)
def test_e001_each_value(timeouts, says):
    (error,) = found(with_upstream(TIMEOUTS=timeouts))["chatproxy.E001"]
    assert says in error.msg


def test_e001_relations_skip_values_already_wrong():
    # GATEWAY is wrong on its own: no second error comparing KEEPALIVE with it.
    (error,) = found(with_upstream(TIMEOUTS={"KEEPALIVE": 90, "GATEWAY": "sixty"}))["chatproxy.E001"]
    assert "['GATEWAY']" in error.msg and error.hint == "Enter e.g. 60, the default."


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


@pytest.mark.parametrize("limits", [{"MAX_MESSAGES": 0}, {"MAX_INPUT_CHARS": "200000"}, {"MAX_MESSAGES": 1.5},
                                    {"WHEN_CACHE_DOWN": "deny"}, {"WS_FRAMES_PER_SECOND": 0}])
def test_e006_limits(limits):
    assert "chatproxy.E006" in found(with_upstream(LIMITS=limits))


@pytest.mark.parametrize("resume", [{"CACHE": "nope"}, {"TTL": 0}, {"GRACE": -1}, {"GRACE": "soon"}, {"DRAIN": -1}])
def test_e007_resume(resume):
    assert "chatproxy.E007" in found(with_upstream(RESUME=resume))


@pytest.mark.parametrize("limits", [{"WHEN_CACHE_DOWN": "refuse"}, {"WS_FRAMES_PER_SECOND": None}])
def test_operations_settings_accepted(limits):
    assert "chatproxy.E006" not in found(with_upstream(LIMITS=limits, RESUME={"DRAIN": 0}))


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


@pytest.mark.parametrize("refresh", [0, -1, "5", None, True, float("inf")])
def test_e012_profiles_refresh(refresh):
    (error,) = found(with_upstream(PROFILES={"REFRESH": refresh}))["chatproxy.E012"]
    assert f"CHATPROXY['PROFILES']['REFRESH'] is {refresh!r}" in error.msg and "positive number" in error.hint


def test_sections_may_be_none():
    # None for a section means its defaults, for the checks and for the code that reads it.
    assert found(with_upstream(RECORDS=None, PROFILES=None, TIMEOUTS=None)) == {}


def test_w001_no_api_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "chatproxy.W001" in found({"UPSTREAM": {"API_KEY": None}})


def test_w003_per_process_cache_in_production():
    locmem = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    dummy = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    shared = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": "/tmp/chatproxy-test-checks-cache"}}
    (warning,) = found(with_upstream(), DEBUG=False, CACHES=locmem)["chatproxy.W003"]
    assert "is LocMemCache" in warning.msg
    assert "reaches the other workers only by their periodic re-read, up to 5 s later" in warning.msg
    (warning,) = found(with_upstream(PROFILES={"REFRESH": 2}), DEBUG=False, CACHES=dummy)["chatproxy.W003"]
    assert "is DummyCache" in warning.msg and "up to 2 s later" in warning.msg
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


# ----------------------------------------------------------------- "auto" without any openai package

# Installed as sitecustomize in a child process: openai neither imports nor has package metadata,
# as after a plain `pip install chatproxy`.
NO_OPENAI = '''
import importlib.abc, importlib.metadata, sys

class _NoOpenAI(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openai" or name.startswith("openai."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOpenAI())
_from_name = importlib.metadata.Distribution.from_name.__func__

def _from_name_without_openai(cls, name):
    if name.lower().replace("_", "-") == "openai":
        raise importlib.metadata.PackageNotFoundError(name)
    return _from_name(cls, name)

importlib.metadata.Distribution.from_name = classmethod(_from_name_without_openai)
'''


def test_auto_without_openai_uses_the_sdk_less_adapter(monkeypatch):
    monkeypatch.setattr(checks, "detect_sdk", lambda: None)
    monkeypatch.setattr("chatproxy.upstream.detect_sdk", lambda: None)
    assert "chatproxy.E003" not in found({"UPSTREAM": {**UPSTREAM, "SDK": "auto"}})
    assert "chatproxy.E003" in found({"UPSTREAM": {**UPSTREAM, "SDK": "current"}})


PROBE = """
import importlib.metadata, chatproxy.upstream
try:
    import openai
except ImportError:
    print("no openai")
try:
    importlib.metadata.version("openai")
except importlib.metadata.PackageNotFoundError:
    print("no metadata")
built = chatproxy.upstream.build_upstream(base_url="http://127.0.0.1:9/v1", api_key="k")
print(chatproxy.upstream.detect_sdk(), built.name)
"""


def _probe(env: dict[str, str]) -> list[str]:
    """What a child process with ``env`` finds of openai, and the adapter "auto" builds there."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                          timeout=30)
    return done.stdout.splitlines()


async def test_a_project_without_openai_checks_and_streams(simulator, tmp_path):
    """`pip install chatproxy` alone: `manage.py check` passes and a stream is answered (SDK "auto")."""
    import aiohttp

    from tests.servers import AppServer, simulator_env

    (tmp_path / "sitecustomize.py").write_text(NO_OPENAI)
    env = {**simulator_env(simulator.base_url, log_level="ERROR"), "CHATPROXY_SDK": "auto",
           "PYTHONPATH": str(tmp_path)}
    server = AppServer(env)
    assert _probe(server.env) == ["no openai", "no metadata", "None raw/aiohttp"]
    checked = server.manage("check")
    assert "no issues" in checked
    server.start()
    try:
        body = {"messages": [{"role": "user", "content": "Rivers? [[sim chunks=3]]"}]}
        async with aiohttp.ClientSession(server.url) as session, session.post("/chat/stream/", json=body) as reply:
            assert reply.status == 200
            text = (await reply.read()).decode()
        assert "event: delta" in text and "event: done" in text
    finally:
        server.stop()
