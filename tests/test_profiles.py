"""Timeout profiles: validation, the default profile, specificity, precedence, live effect.

The last tests run Daphne in child processes: two on one SQLite database and one file cache (a
profile saved through the admin of one process applies to the next stream of the other), and one
with a per-process cache (a profile saved from ``manage.py shell`` applies within
``PROFILES.REFRESH``).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import math
import sqlite3
import time
from types import SimpleNamespace

import aiohttp
import pytest
import yarl
from asgiref.sync import sync_to_async
from django.apps import apps as django_apps
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import ProtectedError
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from chatproxy import profiles
from chatproxy.models import TimeoutProfile
from chatproxy.policy import Policy, from_profile
from chatproxy.profiles import resolve_policy
from tests.fixtures_servers import LIVE_TIMEOUTS
from tests.servers import AppServer, simulator_env
from tests.sseclient import read_sse

_unique = itertools.count()


@pytest.fixture(autouse=True)
def _fresh_profiles(fresh_profiles):
    pass


@pytest.fixture
def no_throttle(monkeypatch):
    monkeypatch.setattr(profiles, "CHECK_INTERVAL", 0.0)


class Clock:
    """``profiles``' view of ``time``: a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(profiles, "time", clock)
    return clock


def profile(**fields) -> TimeoutProfile:
    values = {"name": f"p{next(_unique)}", "model_pattern": "x*", **fields}
    return TimeoutProfile(**values)


def errors_of(obj: TimeoutProfile) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as info:
        obj.full_clean()
    return info.value.message_dict


# --------------------------------------------------------------------------- validation


@pytest.mark.django_db
def test_defaults_are_valid():
    profile().full_clean()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"connect_timeout": 0}, "connect_timeout", "positive number of seconds"),
        ({"stall_timeout": -1}, "stall_timeout", "positive number of seconds"),
        ({"first_token_timeout": math.nan}, "first_token_timeout", "positive number of seconds"),
        ({"deadline": math.inf}, "deadline", "positive number of seconds"),
        ({"backoff_initial": -0.5}, "backoff_initial", "0 or more"),
        ({"keepalive_interval": 60, "gateway_timeout": 60}, "keepalive_interval",
         "shorter than the gateway timeout (60 s)"),
        ({"keepalive_interval": 70, "gateway_timeout": 60}, "keepalive_interval", "e.g. to 15 s"),
        ({"stall_timeout": 300, "deadline": 300}, "stall_timeout", "below the deadline (300 s)"),
        ({"first_token_timeout": 90, "deadline": 60}, "first_token_timeout", "raise the deadline"),
        ({"backoff_initial": 5, "backoff_max": 4}, "backoff_initial", "Must not exceed the maximum backoff (4 s)"),
        ({"max_attempts": 0}, "max_attempts", "from 1 to 10"),
        ({"max_attempts": 11}, "max_attempts", "from 1 to 10"),
        ({"on_partial": "explode"}, "on_partial", "not a valid choice"),
        ({"model_pattern": "  "}, "model_pattern", "Enter a glob"),
    ],
)
def test_validation_says_what_to_change(fields, field, says):
    errors = errors_of(profile(**fields))
    assert any(says in message for message in errors[field]), errors


@pytest.mark.django_db
def test_zero_backoff_and_retry_after_are_allowed():
    profile(backoff_initial=0, backoff_max=0, retry_after_max=0).full_clean()


@pytest.mark.django_db
def test_saving_from_the_shell_validates():
    with pytest.raises(ValidationError) as info:
        profile(name="shell", stall_timeout=0).save()
    assert "stall_timeout" in info.value.message_dict
    assert not TimeoutProfile.objects.filter(name="shell").exists()


@pytest.mark.django_db
def test_admin_form_shows_the_messages(admin_client):
    data = {"name": "chat", "model_pattern": "gpt-*", "enabled": "on", "connect_timeout": 5,
            "first_token_timeout": 400, "stall_timeout": 10, "deadline": 300, "max_attempts": 3,
            "backoff_initial": 0.25, "backoff_max": 4, "retry_after_max": 20, "keepalive_interval": 70,
            "gateway_timeout": 60, "on_partial": "restart", "_save": "Save"}
    response = admin_client.post("/admin/chatproxy/timeoutprofile/add/", data)
    assert response.status_code == 200  # the form again, with errors
    page = response.content.decode()
    assert "Must be below the deadline (300 s)" in page
    assert "Must be shorter than the gateway timeout (60 s)" in page
    assert not TimeoutProfile.objects.filter(name="chat").exists()
    data.update(first_token_timeout=60, keepalive_interval=15)
    response = admin_client.post("/admin/chatproxy/timeoutprofile/add/", data)
    assert response.status_code == 302
    assert TimeoutProfile.objects.get(name="chat").first_token_timeout == 60


@pytest.mark.django_db
def test_admin_add_form_starts_from_the_default_profile(admin_client):
    TimeoutProfile.objects.filter(name="default").update(stall_timeout=4.5)
    page = admin_client.get("/admin/chatproxy/timeoutprofile/add/").content.decode()
    assert 'name="stall_timeout" value="4.5"' in page


# --------------------------------------------------------------------------- the default profile


@pytest.mark.django_db
def test_default_exists_after_migrate_and_matches_everything():
    default = TimeoutProfile.objects.get(name="default")
    assert default.model_pattern == "*" and default.enabled
    assert resolve_policy("any-model-at-all").profile == "default"


@pytest.mark.django_db
def test_default_cannot_be_deleted():
    default = TimeoutProfile.objects.get(name="default")
    with pytest.raises(ProtectedError):
        default.delete()
    with pytest.raises(ProtectedError), transaction.atomic():
        TimeoutProfile.objects.all().delete()  # queryset deletes skip Model.delete(): pre_delete guards
    assert TimeoutProfile.objects.filter(name="default").exists()


@pytest.mark.django_db
def test_default_cannot_be_disabled_renamed_or_narrowed():
    default = TimeoutProfile.objects.get(name="default")
    default.enabled = False
    assert "cannot be disabled" in errors_of(default)["enabled"][0]
    default.enabled, default.name = True, "fallback"
    assert "cannot be renamed" in errors_of(default)["name"][0]
    default.name, default.model_pattern = "default", "gpt-*"
    assert "set its pattern to '*'" in errors_of(default)["model_pattern"][0]


@pytest.mark.django_db
def test_admin_never_deletes_the_default(admin_client):
    default = TimeoutProfile.objects.get(name="default")
    other = TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*")
    assert admin_client.get(f"/admin/chatproxy/timeoutprofile/{default.pk}/delete/").status_code == 403
    response = admin_client.post("/admin/chatproxy/timeoutprofile/", {
        "action": "delete_selected", "_selected_action": [default.pk, other.pk], "post": "yes"}, follow=True)
    assert response.status_code == 200
    assert list(TimeoutProfile.objects.values_list("name", flat=True)) == ["default"]
    assert "cannot be deleted" in response.content.decode()
    # On its change page the name, pattern and enabled flag are read-only; timeouts are editable.
    page = admin_client.get(f"/admin/chatproxy/timeoutprofile/{default.pk}/change/").content.decode()
    assert 'name="stall_timeout"' in page and 'name="model_pattern"' not in page


@pytest.mark.django_db
def test_data_migration_seeds_default_from_settings():
    migration = importlib.import_module("chatproxy.migrations.0003_default_timeout_profile")
    editor = SimpleNamespace(connection=connection)
    TimeoutProfile.objects.filter(name="default")._raw_delete(connection.alias)
    with override_settings(CHATPROXY={"TIMEOUTS": {"STALL": 7.0, "KEEPALIVE": 5}}):
        migration.create_default(django_apps, editor)
    default = TimeoutProfile.objects.get(name="default")
    # settings -> built-in defaults
    assert (default.stall_timeout, default.keepalive_interval) == (7.0, 5.0)
    assert (default.first_token_timeout, default.deadline, default.max_attempts) == (30.0, 300.0, 3)

    TimeoutProfile.objects.filter(name="default")._raw_delete(connection.alias)
    with override_settings(CHATPROXY={"TIMEOUTS": {"KEEPALIVE": 90, "GATEWAY": 60}}):  # invalid: E001
        migration.create_default(django_apps, editor)
    assert TimeoutProfile.objects.get(name="default").keepalive_interval == 10.0


# --------------------------------------------------------------------------- which profile applies


def candidates(*pairs: tuple[str, str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=name, model_pattern=pattern) for name, pattern in pairs]


def test_most_specific_glob_wins():
    found = candidates(("default", "*"), ("anything", "*"), ("gpt", "gpt-*"), ("gpt4o", "gpt-4o*"),
                       ("exact", "gpt-4o-mini"), ("one-char", "gpt-4o-?ini"), ("o1", "o[13]*"))

    def pick(model: str) -> str:
        return profiles.most_specific(found, model).name

    assert pick("gpt-4o-mini") == "exact"  # 11 literal characters beat 10 + one wildcard
    assert pick("gpt-4o-xini") == "one-char"
    assert pick("gpt-4o") == "gpt4o"
    assert pick("gpt-3.5-turbo") == "gpt"
    assert pick("o1-preview") == "o1" and pick("o3-mini") == "o1" and pick("o2") == "anything"
    assert pick("GPT-4O-MINI") == "anything"  # case-sensitive, like model names
    assert profiles.most_specific(candidates(("default", "*")), "claude").name == "default"
    # "default" loses to any other match, even an equally broad one
    assert profiles.most_specific(candidates(("default", "*"), ("zz", "*")), "m").name == "zz"


def test_equal_specificity_is_decided_by_name():
    found = candidates(("beta", "gpt-?o"), ("alpha", "gpt-4?"))
    assert profiles.most_specific(found, "gpt-4o").name == "alpha"
    assert profiles.most_specific(list(reversed(found)), "gpt-4o").name == "alpha"


def test_specificity_counts_a_character_class_as_one_wildcard():
    assert profiles.specificity("p", "o[13]-mini") == (1, 6, -1)
    assert profiles.specificity("p", "o[1") == (1, 3, 0)  # unbalanced: literal, as fnmatch treats it
    assert profiles.specificity("default", "*") == (0, 0, -1)


@pytest.mark.django_db
def test_resolution_uses_enabled_profiles_only():
    TimeoutProfile.objects.create(name="reasoning", model_pattern="o1*", first_token_timeout=90)
    TimeoutProfile.objects.create(name="o1-mini off", model_pattern="o1-mini", enabled=False, stall_timeout=1)
    policy = resolve_policy("o1-mini")
    assert (policy.profile, policy.first_token, policy.stall) == ("reasoning", 90.0, 10.0)
    assert resolve_policy("gpt-4o").profile == "default"


# --------------------------------------------------------------------------- precedence


@pytest.mark.django_db
def test_precedence_request_option_then_profile_then_settings_then_defaults(settings, monkeypatch):
    settings.CHATPROXY = {"TIMEOUTS": {"STALL": 7.0, "FIRST_TOKEN": 20.0}}
    TimeoutProfile.objects.create(name="reasoning", model_pattern="o1*", first_token_timeout=90, stall_timeout=15)

    # 1. a per-request option beats the profile
    policy = resolve_policy("o1-mini", {"stall": 3.0})
    assert (policy.stall, policy.first_token, policy.profile) == (3.0, 90.0, "reasoning")
    # 2. the profile beats settings
    policy = resolve_policy("o1-mini")
    assert (policy.stall, policy.first_token) == (15.0, 90.0)

    # 3. no profile can be loaded (before migrate, database down): settings, then built-in defaults
    def unavailable():
        raise RuntimeError("no such table: chatproxy_timeoutprofile")

    monkeypatch.setattr(profiles, "_query", unavailable)
    profiles.forget()
    policy = resolve_policy("o1-mini")
    assert policy.profile == "settings"
    assert (policy.stall, policy.first_token) == (7.0, 20.0)  # settings
    assert (policy.deadline, policy.keepalive, policy.max_attempts) == (300.0, 10.0, 3)  # built-in defaults
    assert resolve_policy("o1-mini", {"stall": 3.0}).stall == 3.0  # options still win


@pytest.mark.django_db
def test_a_profile_saved_invalid_behind_validation_is_skipped(caplog):
    TimeoutProfile.objects.create(name="bad", model_pattern="gpt-*")
    TimeoutProfile.objects.filter(name="bad").update(stall_timeout=0)  # bypasses validation
    profiles.forget()
    assert resolve_policy("gpt-4o").profile == "default"
    assert "timeout profile 'bad' is ignored" in caplog.text


# --------------------------------------------------------------------------- live effect, one process


@pytest.mark.django_db
def test_steady_state_needs_no_database_query(no_throttle, django_assert_num_queries):
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").stall == 3.0
    with django_assert_num_queries(0):
        for _ in range(200):
            assert resolve_policy("gpt-4o").profile == "chat"


@pytest.mark.django_db
def test_save_and_delete_apply_to_the_next_request(django_capture_on_commit_callbacks):
    assert resolve_policy("gpt-4o").profile == "default"
    version = cache.get(profiles.VERSION_KEY)
    with django_capture_on_commit_callbacks(execute=True):
        chat = TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert cache.get(profiles.VERSION_KEY) != version  # published to every process
    assert resolve_policy("gpt-4o").stall == 3.0  # without waiting for CHECK_INTERVAL
    chat.stall_timeout = 4
    chat.save()
    assert resolve_policy("gpt-4o").stall == 4.0
    chat.delete()
    assert resolve_policy("gpt-4o").profile == "default"


@pytest.mark.django_db
def test_another_process_change_is_seen_through_the_version_key(no_throttle):
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").stall == 3.0
    # Another process changes the row: this one does not read the database again ...
    TimeoutProfile.objects.filter(name="chat").update(stall_timeout=6)
    assert resolve_policy("gpt-4o").stall == 3.0
    # ... until that process's commit publishes a new version.
    profiles.bump_version()
    assert resolve_policy("gpt-4o").stall == 6.0


@pytest.mark.django_db
def test_version_checks_are_throttled(monkeypatch):
    monkeypatch.setattr(profiles, "CHECK_INTERVAL", 60.0)
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").stall == 3.0
    TimeoutProfile.objects.filter(name="chat").update(stall_timeout=6)
    profiles.bump_version()
    assert resolve_policy("gpt-4o").stall == 3.0  # not checked again yet
    monkeypatch.setattr(profiles, "CHECK_INTERVAL", 0.0)
    assert resolve_policy("gpt-4o").stall == 6.0


@pytest.mark.django_db
def test_lost_version_key_is_recreated(no_throttle, django_assert_num_queries):
    resolve_policy("gpt-4o")
    cache.delete(profiles.VERSION_KEY)  # evicted
    assert resolve_policy("gpt-4o").profile == "default"
    assert cache.get(profiles.VERSION_KEY) is not None
    with django_assert_num_queries(0):
        resolve_policy("gpt-4o")


@pytest.mark.django_db
def test_without_a_working_cache_snapshots_expire(no_throttle, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").stall == 3.0
    TimeoutProfile.objects.filter(name="chat").update(stall_timeout=6)
    assert resolve_policy("gpt-4o").stall == 3.0  # trusted for PROFILES.REFRESH seconds
    settings.CHATPROXY = {"PROFILES": {"REFRESH": 1e-9}}
    assert resolve_policy("gpt-4o").stall == 6.0


@pytest.mark.django_db
def test_one_query_per_refresh_interval_never_per_request(clock, settings):
    settings.CHATPROXY = {"PROFILES": {"REFRESH": 5.0}}
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").profile == "chat"  # loaded
    loaded = profiles.snapshot()
    with CaptureQueriesContext(connection) as queries:
        for _ in range(1499):  # 14.99 s of lookups, one every 10 ms: many version checks, three intervals begun
            clock.advance(0.01)
            assert resolve_policy("gpt-4o").profile == "chat"
    assert len(queries) == 2, [q["sql"] for q in queries]  # the re-reads at 5 s and 10 s
    assert "chatproxy_timeoutprofile" in queries[0]["sql"]
    assert profiles.snapshot().entries is loaded.entries  # nothing changed: the snapshot (and its memo) is kept


@pytest.mark.django_db
def test_a_change_nobody_announced_applies_within_refresh(clock, settings):
    settings.CHATPROXY = {"PROFILES": {"REFRESH": 2.0}}
    TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*", stall_timeout=3)
    assert resolve_policy("gpt-4o").stall == 3.0
    # No signal, no new version token: what another process with its own LocMemCache, or raw SQL, looks like.
    TimeoutProfile.objects.filter(name="chat").update(stall_timeout=6)
    clock.advance(1.99)
    assert resolve_policy("gpt-4o").stall == 3.0
    clock.advance(0.01)
    assert resolve_policy("gpt-4o").stall == 6.0  # the first lookup once the snapshot is REFRESH old
    TimeoutProfile.objects.filter(name="chat")._raw_delete(connection.alias)  # a delete nobody announced
    clock.advance(2.0)
    assert resolve_policy("gpt-4o").profile == "default"


async def test_async_refresh_rereads_after_refresh(async_db, clock):
    await TimeoutProfile.objects.acreate(name="chat", model_pattern="gpt-*", stall_timeout=3)
    await profiles.arefresh()
    assert resolve_policy("gpt-4o").stall == 3.0
    await TimeoutProfile.objects.filter(name="chat").aupdate(stall_timeout=6)
    clock.advance(1.0)
    await profiles.arefresh()  # a version check (a cache read), the token is unchanged: no reload
    assert resolve_policy("gpt-4o").stall == 3.0
    clock.advance(4.0)  # the default REFRESH
    await profiles.arefresh()  # re-read through the async ORM, off the event loop
    assert resolve_policy("gpt-4o").stall == 6.0


async def test_async_refresh_and_no_database_from_the_event_loop(async_db, no_throttle):
    await TimeoutProfile.objects.acreate(name="chat", model_pattern="gpt-*", stall_timeout=3)
    await profiles.arefresh()
    assert resolve_policy("gpt-4o").stall == 3.0  # in the loop: from the snapshot
    await TimeoutProfile.objects.filter(name="chat").aupdate(stall_timeout=6)
    await sync_to_async(profiles.bump_version)()
    # In the loop policy_for never queries; it starts a background refresh for the next request.
    assert resolve_policy("gpt-4o").stall == 3.0
    for _ in range(100):
        await asyncio.sleep(0.01)
        if resolve_policy("gpt-4o").stall == 6.0:
            break
    assert resolve_policy("gpt-4o").stall == 6.0


def test_from_profile_maps_every_field():
    row = Policy().profile_values()
    row.update(name="x", stall_timeout=4.0, keepalive_interval=2.0, gateway_timeout=30.0, max_attempts=5)
    assert from_profile(row) == Policy(stall=4.0, keepalive=2.0, gateway=30.0, max_attempts=5, profile="x")


# --------------------------------------------------------------------------- live effect, two processes


PASSWORD = "profile-test-password"


@pytest.fixture(scope="module")
def two_servers(simulator, tmp_path_factory):
    """Two Daphne processes sharing one SQLite database and one file cache, and an admin user."""
    shared = tmp_path_factory.mktemp("two-servers")
    env = {
        **simulator_env(simulator.base_url, timeouts=LIVE_TIMEOUTS),
        "DJANGO_DB_PATH": str(shared / "db.sqlite3"),
        "DJANGO_CACHE_DIR": str(shared / "cache"),
    }
    first = AppServer(env).start()
    second = AppServer(env).start()
    first.manage("createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com",
                 env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD})
    yield first, second
    second.stop()
    first.stop()


async def admin_session(server: AppServer) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(server.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                    timeout=aiohttp.ClientTimeout(total=30))
    async with session.get("/admin/login/") as response:
        assert response.status == 200
    token = session.cookie_jar.filter_cookies(yarl.URL(server.url))["csrftoken"].value
    form = {"username": "admin", "password": PASSWORD, "csrfmiddlewaretoken": token, "next": "/admin/"}
    async with session.post("/admin/login/", data=form, allow_redirects=False) as response:
        assert response.status == 302, await response.text()
    return session


def csrf(session: aiohttp.ClientSession, server: AppServer) -> str:
    return session.cookie_jar.filter_cookies(yarl.URL(server.url))["csrftoken"].value


async def stream_on(server: AppServer, directive: str):
    body = {"messages": [{"role": "user", "content": f"Tell me about rivers #{next(_unique)} [[sim {directive}]]"}]}
    async with aiohttp.ClientSession(server.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get("/") as response:
            assert response.status == 200
        session.headers["X-CSRFToken"] = csrf(session, server)
        started = time.monotonic()
        async with session.post("/chat/stream/", json=body) as response:
            return await read_sse(response, started)


def profile_form(**fields) -> dict:
    values = {
        "name": "fast-stall", "model_pattern": "gpt-4o-mini", "enabled": "on",
        "connect_timeout": LIVE_TIMEOUTS["CONNECT"], "first_token_timeout": LIVE_TIMEOUTS["FIRST_TOKEN"],
        "stall_timeout": 0.15, "deadline": LIVE_TIMEOUTS["DEADLINE"], "max_attempts": 3,
        "backoff_initial": LIVE_TIMEOUTS["BACKOFF_INITIAL"], "backoff_max": LIVE_TIMEOUTS["BACKOFF_MAX"],
        "retry_after_max": 20, "keepalive_interval": LIVE_TIMEOUTS["KEEPALIVE"],
        "gateway_timeout": LIVE_TIMEOUTS["GATEWAY"], "on_partial": "restart", "_save": "Save",
    }
    values.update(fields)
    return values


async def wait_for_profile(server: AppServer, name: str, within: float) -> float:
    """Seconds until a stream on ``server`` reports profile ``name`` (polls with short streams)."""
    started = time.monotonic()
    while True:
        result = await stream_on(server, "chunks=2")
        if result.named("start")[0].data["profile"] == name:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{server.url} still uses another profile"


async def test_admin_change_reaches_the_other_process(two_servers, sim):
    editor, other = two_servers
    pause = "chunks=12 stall_after=4 stall=0.35 times=1"  # 0.35 s: under the default 0.5 s stall timeout

    before = await stream_on(other, pause)
    assert before.named("start")[0].data["profile"] == "default"
    assert not before.named("retry") and before.named("done")

    # Through the admin of the *first* process: a profile for gpt-4o-mini with a 0.15 s stall timeout.
    session = await admin_session(editor)
    async with session:
        form = {**profile_form(), "csrfmiddlewaretoken": csrf(session, editor)}
        async with session.post("/admin/chatproxy/timeoutprofile/add/", data=form, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
        saved = time.monotonic()

        # The second process picks it up for its next request (within CHECK_INTERVAL), no restart ...
        waited = await wait_for_profile(other, "fast-stall", within=profiles.CHECK_INTERVAL + 2.0)
        assert time.monotonic() - saved < profiles.CHECK_INTERVAL + 2.0, waited
        # ... and its timing follows: the same 0.35 s pause is now a stall, retried.
        after = await stream_on(other, pause)
        assert after.named("start")[0].data["profile"] == "fast-stall"
        assert [r.data["reason"] for r in after.named("retry")] == ["stall"]
        assert after.named("done")[0].data["attempts"] == 2
        # The process that saved it uses it at once.
        assert (await stream_on(editor, "chunks=2")).named("start")[0].data["profile"] == "fast-stall"

        # Deleting it through the admin reverts both processes to the default profile.
        with sqlite3.connect(editor.env["DJANGO_DB_PATH"]) as db:
            (pk,) = db.execute("SELECT id FROM chatproxy_timeoutprofile WHERE name = 'fast-stall'").fetchone()
        async with session.post(f"/admin/chatproxy/timeoutprofile/{pk}/delete/",
                                data={"post": "yes", "csrfmiddlewaretoken": csrf(session, editor)},
                                allow_redirects=False) as response:
            assert response.status == 302
        await wait_for_profile(other, "default", within=profiles.CHECK_INTERVAL + 2.0)


# --------------------------------------------------------------------------- a per-process cache

REFRESH = 1.0
SHELL_SAVE_DEFAULT = (
    "from chatproxy.models import TimeoutProfile\n"
    "default = TimeoutProfile.objects.get(name='default')\n"
    "default.stall_timeout = 0.15\n"
    "default.save()\n"
)
SHELL_UPDATE_DEFAULT = (  # no signal, no version token: only the periodic re-read can see it
    "from chatproxy.models import TimeoutProfile\n"
    "TimeoutProfile.objects.filter(name='default').update(stall_timeout=0.5)\n"
)


@pytest.fixture(scope="module")
def locmem_server(simulator):
    """One Daphne process whose ``default`` cache is its own LocMemCache, with ``PROFILES.REFRESH`` 1 s."""
    env = simulator_env(simulator.base_url, timeouts=LIVE_TIMEOUTS, profiles={"REFRESH": REFRESH})
    server = AppServer({**env, "DJANGO_CACHE_DIR": "", "REDIS_URL": ""}).start()
    yield server
    server.stop()


async def wait_for_retries(server: AppServer, retried: bool, within: float) -> float:
    """Seconds until a stream with a 0.35 s pause on ``server`` is (or is no longer) retried for a stall."""
    started = time.monotonic()
    while True:
        result = await stream_on(server, "chunks=6 stall_after=2 stall=0.35 times=1")
        assert result.named("done"), result.events
        if bool(result.named("retry")) is retried:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"{server.url} still uses the old stall timeout"


async def test_a_shell_change_reaches_a_server_with_a_per_process_cache(locmem_server, sim):
    server = locmem_server
    assert await wait_for_retries(server, retried=False, within=1.0) < 1.0  # default: 0.5 s stall timeout

    # manage.py shell is another process with another LocMemCache: its version token reaches no one.
    await asyncio.to_thread(server.manage, "shell", "-c", SHELL_SAVE_DEFAULT)
    assert await wait_for_retries(server, retried=True, within=REFRESH + 2.0) < REFRESH + 2.0

    await asyncio.to_thread(server.manage, "shell", "-c", SHELL_UPDATE_DEFAULT)
    assert await wait_for_retries(server, retried=False, within=REFRESH + 2.0) < REFRESH + 2.0
