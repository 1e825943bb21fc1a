"""Stream records, statistics and suggestions, signals, and the admin pages showing them."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
import yarl
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.dispatch import receiver
from django.test import Client
from django.utils import timezone

from chatproxy import profiles, records, signals
from chatproxy.conf import Policy
from chatproxy.models import StreamRecord, TimeoutProfile
from chatproxy.records import Sample
from chatproxy.validation import parse_native_request
from tests.fixtures_servers import LIVE_TIMEOUTS
from tests.servers import AppServer, simulator_env
from tests.sseclient import read_sse

_unique = itertools.count()


@pytest.fixture(autouse=True)
def _fresh_profiles(fresh_profiles):
    pass


# --------------------------------------------------------------------------- statistics


def test_percentile_interpolates_between_ranks():
    assert records.percentile([], 50) is None
    assert records.percentile([3.0], 95) == 3.0
    assert records.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert records.percentile(list(range(101)), 95) == 95
    assert records.percentile([10.0, 0.0], 100) == 10.0


def samples(n: int, ttft: float, gap: float, duration: float, **kwargs) -> list[Sample]:
    return [Sample(ttft, gap, duration, **kwargs) for _ in range(n)]


def test_suggestion_formulas():
    current = Policy()  # first_token 30, stall 10, keepalive 10, gateway 60, deadline 300
    data = samples(90, 1.0, 0.4, 20.0) + samples(10, 4.0, 1.1, 150.0)
    suggestion = records.suggest(data, current)
    assert suggestion.first_token_timeout == 2 * 4.0  # 2 x p95 TTFT (p95 lands in the slow 10 %)
    assert suggestion.stall_timeout == 3.5  # 3 x 1.1 s p95 gap, rounded up to 0.5 s
    assert suggestion.keepalive_interval == 10.0  # already below gateway / 4 = 15
    assert suggestion.deadline == 300.0  # never lowered
    assert suggestion.changes(current) == {"first_token_timeout": (30.0, 8.0), "stall_timeout": (10.0, 3.5)}
    assert records.suggest(data + samples(10, 1.0, 0.4, 150.0), current).deadline == 300.0


def test_suggestion_floors_keepalive_and_deadline():
    current = Policy(keepalive=50.0, gateway=100.0, deadline=60.0, first_token=5.0)
    suggestion = records.suggest(samples(30, 0.05, 0.01, 70.0), current)
    assert (suggestion.first_token_timeout, suggestion.stall_timeout) == (records.FIRST_TOKEN_FLOOR,
                                                                           records.STALL_FLOOR)
    assert suggestion.keepalive_interval == 25.0  # gateway / 4
    assert suggestion.deadline == 140.0  # 2 x p95 duration of completed streams
    assert records.suggest(samples(records.MIN_SAMPLES - 1, 1, 1, 1), current) is None


def test_retried_starts_do_not_count_as_time_to_first_token():
    data = (samples(20, 0.5, 0.1, 2.0)
            + samples(10, 6.0, 0.1, 8.0, attempts=2, retry_reasons=("first_token",))  # censored, left out
            + samples(2, 0.7, 0.1, 3.0, attempts=2, retry_reasons=("stall",)))  # token came from attempt 1
    stats = records.summarize("m", data, None, Policy())
    assert stats.ttft.count == 22 and stats.ttft.max == 0.7
    assert stats.retry_rate == 12 / 32
    assert stats.retry_reasons == {"first_token": 10, "stall": 2}
    assert stats.first_token_retry_rate == 10 / 32


def test_histogram_is_laid_out_for_svg():
    chart = records.histogram("ttft", [0.1, 0.1, 0.2, 5.0], [(1.0, "now", "current"), (None, "x", "suggested")])
    assert chart.count == 4 and chart.width == records.CHART_WIDTH
    assert sum(int(bar.title.rsplit(": ", 1)[1]) for bar in chart.bars) == 4
    assert max(bar.height for bar in chart.bars) == pytest.approx(records.CHART_HEIGHT - 2)
    assert [m.kind for m in chart.markers] == ["current"]  # a missing value draws no marker
    assert 0 < chart.markers[0].x <= chart.width
    assert records.histogram("empty", []).bars == ()


# --------------------------------------------------------------------------- writing, in process


@pytest.fixture
def chat_settings(sim, settings):
    settings.CHATPROXY = {
        "UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-records"},
        "PERMISSION": "chatproxy.permissions.allow_any",
        "LIMITS": {"MAX_STREAMS_PER_USER": None},
    }
    return settings


def tiny_default_profile() -> None:
    # update_or_create: a transactional test before this one may have flushed the migrated row.
    TimeoutProfile.objects.update_or_create(name="default", defaults={
        "first_token_timeout": 1.0, "stall_timeout": 0.3, "deadline": 20.0, "backoff_initial": 0.02,
        "backoff_max": 0.05, "keepalive_interval": 0.3, "gateway_timeout": 2.0})
    profiles.forget()


async def run_stream(directive: str, user=None, model: str | None = None):
    from chatproxy.service import open_stream

    body = {"messages": [{"role": "user", "content": f"Tell me about records #{next(_unique)} [[sim {directive}]]"}]}
    if model:
        body["model"] = model
    reader = await open_stream(parse_native_request(body), user=user)
    stream = getattr(reader, "stream", reader)
    try:
        events = [event async for event in reader if event.name != "keepalive"]
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
    await records.drain()
    return stream, events


async def test_one_record_per_stream_and_the_signals(async_db, chat_settings, sim):
    await sync_to_async(tiny_default_profile)()
    user = await User.objects.acreate(username="rita")
    seen: list[tuple[str, dict]] = []

    @receiver(signals.stream_started)
    def started(sender, stream, user, **kwargs):
        seen.append(("started", {"stream_id": stream.stream_id, "user": user.username}))

    @receiver(signals.stream_retry)
    async def retried(sender, stream, attempt, reason, delay, **kwargs):
        seen.append(("retry", {"attempt": attempt, "reason": reason}))

    @receiver(signals.stream_finished)
    def finished(sender, stream, user, stats, **kwargs):
        seen.append(("finished", {"outcome": stats.outcome, "attempts": stats.attempts}))

    try:
        stream, events = await run_stream("chunks=10 stall_after=3 stall=5 times=1", user=user)
        for _ in range(100):  # the signals are dispatched in tasks of their own
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        for signal, handler in ((signals.stream_started, started), (signals.stream_retry, retried),
                                (signals.stream_finished, finished)):
            signal.disconnect(handler)

    assert events[-1].name == "done"
    assert seen == [("started", {"stream_id": stream.stream_id, "user": "rita"}),
                    ("retry", {"attempt": 2, "reason": "stall"}),
                    ("finished", {"outcome": "done", "attempts": 2})]
    record = await StreamRecord.objects.aget(stream_id=stream.stream_id)
    assert (record.user_id, record.username, record.model, record.profile) == (user.pk, "rita", "gpt-4o-mini",
                                                                                "default")
    assert (record.attempts, record.retry_reasons, record.outcome) == (2, "stall", "done")
    assert record.chars_sent == len("".join(e.data["text"] for e in events if e.name == "delta"))
    assert 0 < record.time_to_first_token < record.duration
    assert 0 <= record.longest_gap < 0.3
    assert abs((timezone.now() - record.started).total_seconds() - record.duration) < 2


async def test_a_failed_write_never_breaks_the_stream(async_db, chat_settings, sim, monkeypatch, caplog):
    await sync_to_async(tiny_default_profile)()

    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(StreamRecord.objects, "bulk_create", broken)
    stream, events = await run_stream("chunks=5")
    assert events[-1].name == "done"
    assert f"could not save the records of 1 stream(s) ({stream.stream_id})" in caplog.text
    assert not await StreamRecord.objects.aexists()


async def test_records_queued_while_the_writer_is_busy_are_saved_in_one_batch(async_db, chat_settings, sim,
                                                                               monkeypatch):
    from chatproxy import records

    await sync_to_async(tiny_default_profile)()
    batches: list[int] = []
    bulk_create = StreamRecord.objects.bulk_create

    def counting(objs, *args, **kwargs):
        batches.append(len(objs))
        return bulk_create(objs, *args, **kwargs)

    monkeypatch.setattr(StreamRecord.objects, "bulk_create", counting)
    busy = threading.Event()
    records._executor().submit(busy.wait, 10)  # the writer thread is busy
    streams = await asyncio.gather(*(run_stream("chunks=2") for _ in range(3)))
    busy.set()
    await records.drain()
    assert batches == [3]
    saved = {r.stream_id async for r in StreamRecord.objects.all()}
    assert saved == {stream.stream_id for stream, _ in streams}


async def test_records_can_be_switched_off(async_db, chat_settings, sim):
    chat_settings.CHATPROXY = {**chat_settings.CHATPROXY, "RECORDS": {"ENABLED": False}}
    await run_stream("chunks=3")
    assert not await StreamRecord.objects.aexists()


async def test_a_failed_stream_is_recorded_with_its_error_code(async_db, chat_settings, sim):
    await sync_to_async(tiny_default_profile)()
    stream, _ = await run_stream("status=400", model="gpt-4o")
    record = await StreamRecord.objects.aget(stream_id=stream.stream_id)
    assert (record.outcome, record.attempts, record.time_to_first_token, record.username) == ("bad_request", 1,
                                                                                              None, "")


# --------------------------------------------------------------------------- live: records under Daphne


def live_records(server: AppServer, stream_ids: list[str], timeout: float = 5.0) -> dict[str, dict]:
    """The records of ``stream_ids`` in the live server's database, waiting for them to be written."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(server.env["DJANGO_DB_PATH"]) as db:
            db.row_factory = sqlite3.Row
            marks = ",".join("?" * len(stream_ids))
            rows = db.execute(f"SELECT * FROM chatproxy_streamrecord WHERE stream_id IN ({marks})",
                              stream_ids).fetchall()
        if len(rows) == len(stream_ids) or time.monotonic() > deadline:
            return {row["stream_id"]: dict(row) for row in rows}
        time.sleep(0.05)


async def sse(client: aiohttp.ClientSession, directive: str, model: str | None = None):
    body = {"messages": [{"role": "user", "content": f"Tell me about tides #{next(_unique)} [[sim {directive}]]"}]}
    if model:
        body["model"] = model
    async with client.post("/chat/stream/", json=body) as response:
        return await read_sse(response, time.monotonic())


async def test_live_streams_are_recorded(daphne, client, sim):
    results = await asyncio.gather(
        sse(client, "chunks=6"),
        sse(client, "chunks=8 stall_after=3 stall=5 times=1"),
        sse(client, "chunks=4 first_delay=3 times=1"),
        sse(client, "status=503"),
    )
    ids = [r.named("start")[0].data["stream_id"] for r in results]
    rows = live_records(daphne, ids)
    assert [(rows[i]["outcome"], rows[i]["attempts"], rows[i]["retry_reasons"]) for i in ids] == [
        ("done", 1, ""),
        ("done", 2, "stall"),
        ("done", 2, "first_token"),
        ("upstream_unavailable", 3, "upstream_error upstream_error"),
    ]
    assert all(rows[i]["profile"] == "default" and rows[i]["model"] == "gpt-4o-mini" for i in ids)
    clean = rows[ids[0]]
    assert clean["chars_sent"] == len(results[0].text) and clean["time_to_first_token"] < LIVE_TIMEOUTS["FIRST_TOKEN"]
    assert rows[ids[2]]["time_to_first_token"] > LIVE_TIMEOUTS["FIRST_TOKEN"]  # what the user waited
    assert rows[ids[3]]["time_to_first_token"] is None and rows[ids[3]]["chars_sent"] == 0


# --------------------------------------------------------------------------- admin


def make_records(model: str, n: int, *, ttft: float = 0.5, gap: float = 0.2, profile: str = "default",
                 reasons: str = "", outcome: str = "done", age: timedelta = timedelta(minutes=5)) -> None:
    now = timezone.now()
    StreamRecord.objects.bulk_create(
        StreamRecord(stream_id=f"s{next(_unique)}", model=model, profile=profile, started=now - age,
                     time_to_first_token=ttft, longest_gap=gap, attempts=1 + len(reasons.split()),
                     retry_reasons=reasons, outcome=outcome, duration=2.0, chars_sent=100)
        for _ in range(n)
    )


STATS_URL = "/admin/chatproxy/streamrecord/stats/"


@pytest.mark.django_db
def test_stats_page_shows_percentiles_suggestions_and_charts(admin_client):
    make_records("o1-mini", 38, ttft=20.0, gap=1.0)
    make_records("o1-mini", 2, ttft=40.0, gap=3.0, reasons="stall")
    make_records("gpt-4o", 5)
    make_records("old-model", 50, age=timedelta(days=3))  # outside the 24 h window
    page = admin_client.get(STATS_URL).content.decode()
    assert "o1-mini — 40 streams" in page and "gpt-4o — 5 streams" in page and "old-model" not in page
    # o1-mini: p95 TTFT over 40 streams; suggestions 2 x p95 TTFT and 3 x p95 gap
    o1 = next(s for s in records.model_stats("24h") if s.model == "o1-mini")
    assert o1.ttft.p50 == 20.0 and o1.ttft.p95 == pytest.approx(21.0)
    assert o1.suggestion.first_token_timeout == 42.0 and o1.suggestion.stall_timeout == 3.5
    assert o1.retry_rate == 0.05
    assert "<th>first_token_timeout</th><td>30</td><td>42</td>" in page
    assert '<td class="cp-retry-rate">5.0 %</td>' in page
    assert page.count("<figure class=\"cp-chart\">") == 4 and 'class="suggested"' in page
    assert "Not enough streams for a suggestion (5 of 20)" in page  # gpt-4o
    assert "Apply to profile “default”" in page and "Create a profile for o1-mini only" in page
    assert "old-model" in admin_client.get(STATS_URL + "?window=7d").content.decode()


@pytest.mark.django_db
def test_stats_page_applies_a_suggestion_or_creates_a_profile(admin_client):
    make_records("o1-mini", 40, ttft=20.0, gap=1.0)
    response = admin_client.post(STATS_URL, {"model": "o1-mini", "action": "create", "window": "24h"}, follow=True)
    created = TimeoutProfile.objects.get(model_pattern="o1-mini")
    assert (created.name, created.first_token_timeout, created.stall_timeout) == ("o1-mini", 40.0, 3.0)
    assert "Created the profile" in response.content.decode()
    assert profiles.policy_for("o1-mini").profile == "o1-mini"

    TimeoutProfile.objects.filter(pk=created.pk).update(first_token_timeout=5.0)
    response = admin_client.post(STATS_URL, {"model": "o1-mini", "action": "apply", "window": "24h"}, follow=True)
    created.refresh_from_db()
    assert created.first_token_timeout == 40.0
    assert "first_token_timeout 5 → 40 s" in response.content.decode()
    assert TimeoutProfile.objects.get(name="default").first_token_timeout == 30.0  # untouched


@pytest.mark.django_db
def test_stats_page_permissions():
    client = Client()  # (the "client" fixture is the live server's)
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    client.force_login(viewer)
    assert client.get(STATS_URL).status_code == 403
    viewer.user_permissions.add(Permission.objects.get(codename="view_streamrecord"))
    make_records("o1-mini", 40, ttft=20.0)
    page = client.get(STATS_URL).content.decode()
    assert "o1-mini — 40 streams" in page and "Apply to profile" not in page
    assert client.post(STATS_URL, {"model": "o1-mini", "action": "apply"}).status_code == 403


@pytest.mark.django_db
def test_profile_action_applies_suggestions_from_its_own_streams(admin_client):
    chat = TimeoutProfile.objects.create(name="chat", model_pattern="gpt-*")
    make_records("gpt-4o", 30, ttft=0.9, gap=0.5, profile="chat")
    make_records("o1-mini", 30, ttft=50.0, gap=9.0, profile="default")
    response = admin_client.post("/admin/chatproxy/timeoutprofile/", {
        "action": "apply_suggestions", "_selected_action": [chat.pk, TimeoutProfile.objects.get(name="default").pk],
    }, follow=True)
    page = response.content.decode()
    chat.refresh_from_db()
    assert (chat.first_token_timeout, chat.stall_timeout) == (2.0, 2.0)  # floors: 2 x 0.9 and 3 x 0.5 are below
    default = TimeoutProfile.objects.get(name="default")
    assert (default.first_token_timeout, default.stall_timeout) == (100.0, 27.0)
    assert "Chat: first_token_timeout 30 → 2 s, stall_timeout 10 → 2 s (from 30 streams)." in page


@pytest.mark.django_db
def test_profile_action_reports_an_invalid_result(admin_client):
    slow = TimeoutProfile.objects.create(name="slow", model_pattern="o1*", deadline=60, first_token_timeout=30)
    make_records("o1", 30, ttft=40.0, profile="slow")  # suggests 80 s: the deadline grows with it
    admin_client.post("/admin/chatproxy/timeoutprofile/", {"action": "apply_suggestions",
                                                           "_selected_action": [slow.pk]})
    slow.refresh_from_db()
    assert (slow.first_token_timeout, slow.deadline) == (80.0, 81.0)


@pytest.mark.django_db
def test_record_list_filters_search_and_read_only_detail(admin_client):
    make_records("gpt-4o", 2, reasons="disconnected")
    make_records("gpt-4o", 3, reasons="connect stall")
    make_records("o1", 1, outcome="upstream_timeout")
    url = "/admin/chatproxy/streamrecord/"
    assert "6 stream records" in admin_client.get(url).content.decode()
    assert "3 stream records" in admin_client.get(url + "?retry_reason=connect").content.decode()
    assert "2 stream records" in admin_client.get(url + "?retry_reason=disconnected").content.decode()
    assert "1 stream record" in admin_client.get(url + "?retry_reason=none").content.decode()
    assert "1 stream record" in admin_client.get(url + "?outcome=upstream_timeout").content.decode()
    assert "1 stream record" in admin_client.get(url + "?q=o1").content.decode()
    assert "Statistics and suggested timeouts" in admin_client.get(url).content.decode()
    record = StreamRecord.objects.first()
    detail = admin_client.get(f"{url}{record.pk}/change/")
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    assert admin_client.get(f"{url}add/").status_code == 403


# --------------------------------------------------------------------------- retention


@pytest.mark.django_db
def test_prune_command(settings, capsys):
    make_records("m", 3, age=timedelta(days=40))
    make_records("m", 2, age=timedelta(days=10))
    make_records("m", 1)
    call_command("chatproxy_prune", "--dry-run")
    assert "3 stream record(s) older than 30 days would be deleted" in capsys.readouterr().out
    call_command("chatproxy_prune")  # RETENTION_DAYS, default 30
    assert StreamRecord.objects.count() == 3
    settings.CHATPROXY = {"RECORDS": {"RETENTION_DAYS": 7}}
    call_command("chatproxy_prune")
    assert "Deleted 2 stream record(s) older than 7 days." in capsys.readouterr().out
    call_command("chatproxy_prune", "--days", "0.0001")
    assert StreamRecord.objects.count() == 0


# --------------------------------------------------------------------------- many streams, mixed faults

#: Streams of the mixed-fault run; CHATPROXY_STATS_STREAMS=200 for the full run.
STATS_STREAMS = int(os.environ.get("CHATPROXY_STATS_STREAMS", "40"))
STATS_PASSWORD = "stats-test-password"

# Per 20 streams: (count, model, directive); {d} is a per-stream first-token delay.
MIX = [
    (6, "gpt-4o-mini", "chunks=12 gap=0.01 first_delay={d}"),
    (4, "o1-sim", "chunks=12 gap=0.03 first_delay={d}"),  # under the "reasoning" profile (3 s first token)
    (3, "gpt-4o-mini", "chunks=12 gap=0.01 stall_after=4 stall=5 times=1"),
    (2, "gpt-4o-mini", "chunks=8 first_delay=3 times=1"),
    (2, "gpt-4o-mini", "chunks=8 status=503 times=1"),
    (2, "gpt-4o-mini", "chunks=12 gap=0.01 reset_after=5 times=1"),
    (1, "gpt-4o-mini", "status=503"),
]


@pytest.fixture(scope="module")
def stats_server(simulator):
    server = AppServer(simulator_env(simulator.base_url, timeouts=LIVE_TIMEOUTS)).start()
    server.manage("createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.com",
                  env={"DJANGO_SUPERUSER_PASSWORD": STATS_PASSWORD})
    # A reasoning model waits longer for its first token: a profile of its own (before the server's first request).
    server.manage("shell", "-v", "0", "-c", REASONING_PROFILE)
    yield server
    server.stop()


REASONING_PROFILE = """
from chatproxy.models import TimeoutProfile
default = TimeoutProfile.objects.get(name="default")
default.pk, default.name, default.model_pattern, default.first_token_timeout = None, "reasoning", "o1*", 3.0
default.save()
"""


def mixed_run(n: int) -> list[tuple[str, str]]:
    rng = random.Random(5)
    plan = []
    for _ in range((n + 19) // 20):
        for count, model, directive in MIX:
            for _ in range(count):
                delay = rng.uniform(0.02, 0.2) if model == "gpt-4o-mini" else rng.uniform(0.8, 1.6)
                plan.append((model, directive.format(d=f"{delay:.3f}")))
    rng.shuffle(plan)
    return plan[:n]


async def test_stats_after_many_streams_with_mixed_faults(stats_server, sim):
    plan = mixed_run(STATS_STREAMS)
    gate = asyncio.Semaphore(3)  # anonymous streams share one MAX_STREAMS_PER_USER budget (4)
    async with aiohttp.ClientSession(stats_server.url, cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async with client.get("/") as response:
            assert response.status == 200
        client.headers["X-CSRFToken"] = client.cookie_jar.filter_cookies(yarl.URL(stats_server.url))["csrftoken"].value

        async def one(model: str, directive: str):
            async with gate:
                return await sse(client, directive, model)

        results = await asyncio.gather(*(one(model, directive) for model, directive in plan))
    ids = [r.named("start")[0].data["stream_id"] for r in results]
    rows = live_records(stats_server, ids, timeout=10)
    assert len(rows) == len(plan)

    report = json.loads(stats_server.manage("shell", "-v", "0", "-c", STATS_SCRIPT))
    by_model = {m["model"]: m for m in report}
    expected_gpt = sum(1 for model, _ in plan if model == "gpt-4o-mini")
    assert by_model["gpt-4o-mini"]["count"] == expected_gpt
    assert by_model["o1-sim"]["count"] == len(plan) - expected_gpt
    retried = sum(1 for _, d in plan if "times=1" in d or d == "status=503")
    assert by_model["gpt-4o-mini"]["retry_rate"] == pytest.approx(retried / expected_gpt)
    assert by_model["o1-sim"]["retry_rate"] == 0  # 0.8-1.6 s first tokens: fine under its 3 s profile
    assert by_model["o1-sim"]["profile"] == "reasoning" and by_model["gpt-4o-mini"]["profile"] == "default"
    assert {r["profile"] for r in rows.values()} == {"default", "reasoning"}
    reasoning = by_model["o1-sim"]
    if reasoning["count"] >= records.MIN_SAMPLES:
        assert reasoning["suggestion"]["first_token_timeout"] == records.round_up(2 * reasoning["ttft_p95"])
    assert by_model["gpt-4o-mini"]["suggestion"]["first_token_timeout"] == records.FIRST_TOKEN_FLOOR

    # The page itself, as an admin sees it.
    async with aiohttp.ClientSession(stats_server.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as admin:
        async with admin.get("/admin/login/") as response:
            assert response.status == 200
        token = admin.cookie_jar.filter_cookies(yarl.URL(stats_server.url))["csrftoken"].value
        form = {"username": "admin", "password": STATS_PASSWORD, "csrfmiddlewaretoken": token, "next": "/admin/"}
        async with admin.post("/admin/login/", data=form, allow_redirects=False) as response:
            assert response.status == 302
        async with admin.get(STATS_URL) as response:
            assert response.status == 200
            page = await response.text()
    assert f"gpt-4o-mini — {expected_gpt} streams" in page and page.count("<figure class=\"cp-chart\">") == 4
    save_report(page, report)


def save_report(page: str, report: list) -> None:
    """With CHATPROXY_STATS_OUT=/path/name: keep the page and the numbers behind it (name.html, name.json)."""
    out = os.environ.get("CHATPROXY_STATS_OUT")
    if out:
        Path(out + ".html").write_text(page)
        Path(out + ".json").write_text(json.dumps(report, indent=2))


STATS_SCRIPT = """
import json
from chatproxy import records
out = []
for s in records.model_stats("24h"):
    out.append({
        "model": s.model, "count": s.count, "profile": s.profile.name if s.profile else None,
        "ttft_p50": s.ttft.p50, "ttft_p95": s.ttft.p95, "ttft_n": s.ttft.count,
        "ttft_seen_p50": s.ttft_seen.p50, "ttft_seen_p95": s.ttft_seen.p95, "ttft_seen_n": s.ttft_seen.count,
        "gap_p50": s.gap.p50, "gap_p95": s.gap.p95, "duration_p95": s.duration.p95,
        "retry_rate": s.retry_rate, "error_rate": s.error_rate,
        "outcomes": dict(s.outcomes), "retry_reasons": dict(s.retry_reasons),
        "current": {"first_token": s.current.first_token, "stall": s.current.stall,
                    "keepalive": s.current.keepalive, "deadline": s.current.deadline},
        "suggestion": s.suggestion.values() if s.suggestion else None,
    })
print(json.dumps(out))
"""
