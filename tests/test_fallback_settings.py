"""Fallback settings: ``UPSTREAMS`` / ``FALLBACKS`` / ``CIRCUIT``, their system checks, the profile's
``fallbacks`` field, which targets a request gets, and the circuit breaker's cache bookkeeping."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from chatproxy import conf, fallbacks, records
from chatproxy.circuit import CacheBreaker, cache_key
from chatproxy.models import StreamRecord, TimeoutProfile
from chatproxy.policy import Policy, from_profile
from chatproxy.stream.targets import Admission
from tests.test_checks import UPSTREAM, found, with_upstream

BACKUP = {"BASE_URL": "http://127.0.0.1:9/v1", "API_KEY": "sk-backup"}


def test_sound_fallback_settings_pass():
    assert found(with_upstream(UPSTREAMS={"backup": BACKUP}, FALLBACKS={"gpt-4o*": ["gpt-4o-mini", "backup:x"]},
                               CIRCUIT={"FAILURES": 5, "COOLDOWN": 60})) == {}


@pytest.mark.parametrize("upstreams, says", [
    ({"default": BACKUP}, "cannot name an upstream"),
    ({"backup": "http://x"}, "not a dict"),
    ({"backup": {"API_KEY": "k"}}, "has no BASE_URL"),
    ({"backup": {**BACKUP, "SDK": "nope"}}, "SDK='nope'"),
    ({"backup": {**BACKUP, "EXTRA_BODY": []}}, "EXTRA_BODY"),
    ({"backup": {**BACKUP, "BASEURL": "x"}}, "unknown keys 'BASEURL'"),
])
def test_e013_upstreams(upstreams, says):
    errors = found(with_upstream(UPSTREAMS=upstreams))["chatproxy.E013"]
    assert any(says in e.msg for e in errors), [e.msg for e in errors]
    assert all("sk-backup" not in e.msg + e.hint for e in errors)


@pytest.mark.parametrize("table", [{"gpt-4o": "gpt-4o-mini"}, {"gpt-4o": ["a b"]}, {"gpt-4o": [""]},
                                   {"": ["x"]}, {"gpt-4o": ["m"] * 11}])
def test_e014_fallbacks(table):
    assert "chatproxy.E014" in found(with_upstream(FALLBACKS=table))


def test_w006_a_prefix_naming_no_upstream():
    result = found(with_upstream(FALLBACKS={"gpt-4o": ["bakup:gpt-4o-mini", "llama3:8b"]},
                                 UPSTREAMS={"backup": BACKUP}))
    assert len(result["chatproxy.W006"]) == 2 and "'bakup'" in result["chatproxy.W006"][0].msg


@pytest.mark.parametrize("circuit", [{"FAILURES": 0}, {"FAILURES": 1.5}, {"COOLDOWN": 0}, {"COOLDOWN": "30"}])
def test_e015_circuit(circuit):
    assert "chatproxy.E015" in found(with_upstream(CIRCUIT=circuit))


def test_named_upstreams_are_not_unknown_keys():
    assert "chatproxy.W002" not in found(with_upstream(UPSTREAMS={"backup": BACKUP}, FALLBACKS={"x": ["y"]}))
    assert "chatproxy.W002" in found(with_upstream(CIRCUIT={"FAILURE": 3}))


def test_a_named_upstream_never_gets_the_openai_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    own = {"own": {"BASE_URL": "http://h/v1"}}
    with override_settings(CHATPROXY={"UPSTREAM": {"BASE_URL": None}, "UPSTREAMS": own}):
        assert conf.upstream_settings("default")["API_KEY"] == "sk-openai-secret"
        assert conf.upstream_settings("own")["API_KEY"] is None
        from chatproxy.upstream import PLACEHOLDER_API_KEY, build_named_upstream

        upstream = build_named_upstream("own", {**conf.upstream_settings("own"), "SDK": "none"})
        assert upstream._headers["Authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"  # type: ignore[attr-defined]


@override_settings(CHATPROXY={"UPSTREAM": UPSTREAM, "UPSTREAMS": {"backup": BACKUP},
                              "FALLBACKS": {"gpt-4o*": ["gpt-4o-mini", "backup:gpt-4.1"], "gpt-4o-mini": ["x"],
                                            "*": ["catch-all"]}})
def test_the_chain_of_a_model():
    names = [t.label for t in fallbacks.chain("gpt-4o", Policy())]
    assert names == ["gpt-4o-mini", "backup:gpt-4.1"]
    assert [t.label for t in fallbacks.chain("gpt-4o-mini", Policy())] == ["x"]  # the most specific glob
    assert [t.label for t in fallbacks.chain("other", Policy())] == ["catch-all"]
    # A profile's list wins; the request's own model and repeats are left out; unknown prefixes are model names.
    policy = Policy(fallbacks=("gpt-4o", "default:gpt-4o-mini", "gpt-4o-mini", "llama3:8b"))
    assert [(t.upstream, t.model) for t in fallbacks.chain("gpt-4o", policy)] == [
        ("default", "gpt-4o-mini"), ("default", "llama3:8b")]
    assert fallbacks.model_of("backup:gpt-4.1") == "gpt-4.1" and fallbacks.model_of("llama3:8b") == "llama3:8b"


@pytest.mark.django_db
def test_the_profile_fallbacks_field(fresh_profiles):
    profile = TimeoutProfile(name="big", model_pattern="gpt-4o*", fallbacks="gpt-4o-mini\n\n  backup:x  # cheaper\n")
    profile.save()
    assert from_profile(profile).fallbacks == ("gpt-4o-mini", "backup:x")
    from chatproxy import profiles

    assert profiles.policy_for("gpt-4o").fallbacks == ("gpt-4o-mini", "backup:x")  # type: ignore[union-attr]
    profile.fallbacks = "gpt 4o"
    with pytest.raises(ValidationError) as raised:
        profile.full_clean()
    assert "one model name (or upstream:model) per line" in str(raised.value)
    profile.fallbacks = "\n".join(f"m{i}" for i in range(11))
    with pytest.raises(ValidationError, match="at most 10"):
        profile.full_clean()


# ------------------------------------------------------------------------------ the breaker's bookkeeping


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_breaker_writes_only_what_changes():
    cache, clock = LocMemCache("breaker-writes", {}), Clock()
    breaker = CacheBreaker(cache, failures=2, cooldown=30.0, probe_lease=60.0, clock=clock)
    key = "backup:gpt-4.1"
    healthy = await breaker.admit(key)
    assert healthy == Admission() and not await breaker.report(key, healthy, True)
    assert cache.get(cache_key(key)) is None  # a healthy target costs no write
    assert not await breaker.report(key, await breaker.admit(key), False)
    assert cache.get(cache_key(key)) == (1, 0.0)
    assert await breaker.report(key, await breaker.admit(key), False)  # the second failure opens it
    assert (await breaker.admit(key)).allowed is False
    clock.now += 30.0
    probe = await breaker.admit(key)
    assert probe.probe and probe.allowed
    assert (await breaker.admit(key)).allowed is False  # only one probe at a time
    assert await breaker.report(key, probe, False)  # a failed probe opens it again
    assert (await breaker.admit(key)).allowed is False
    clock.now += 30.0
    probe = await breaker.admit(key)
    assert not await breaker.report(key, probe, True)
    assert cache.get(cache_key(key)) is None and await breaker.admit(key) == Admission()


async def test_a_broken_cache_lets_the_target_be_tried():
    class Broken(LocMemCache):
        def get(self, *args, **kwargs):
            raise ConnectionError("cache down")

    breaker = CacheBreaker(Broken("broken", {}), failures=1, cooldown=1.0, probe_lease=1.0)
    assert await breaker.admit("default:m") == Admission()


def test_cache_keys_are_safe_for_every_backend():
    assert cache_key("backup:gpt-4.1-mini") == "chatproxy:circuit:backup:gpt-4.1-mini"
    odd = cache_key("default:my model\n" + "x" * 300)
    assert odd.startswith("chatproxy:circuit:") and len(odd) < 60 and " " not in odd


# ------------------------------------------------------------------------------ records and admin statistics


def record(answered_by: str, *, abandoned: str = "", circuits: str = "", outcome: str = "done") -> StreamRecord:
    return StreamRecord(stream_id=f"f{answered_by}{abandoned}{circuits}{outcome}", model="gpt-4o-mini",
                        profile="default", started=timezone.now() - timedelta(minutes=1), attempts=1,
                        outcome=outcome, duration=1.0, answered_by=answered_by, abandoned=abandoned,
                        circuits_opened=circuits)


@pytest.mark.django_db
def test_admin_statistics_per_target(admin_client):
    primary, same, backup = "default:gpt-4o-mini", "default:gpt-4o", "backup:gpt-4.1-mini"
    rows = [record(primary), record(primary), record(same, abandoned=primary),
            record(backup, abandoned=f"{primary} {same}", circuits=primary),
            record(same, abandoned=primary, circuits=same, outcome="upstream_unavailable")]
    for i, row in enumerate(rows):
        row.stream_id += str(i)
    StreamRecord.objects.bulk_create(rows)
    found = {t.target: (t.answers, t.fallbacks, t.circuit_openings) for t in records.target_stats("24h")}
    assert found == {primary: (2, 3, 1), same: (1, 1, 1), backup: (1, 0, 0)}
    page = admin_client.get("/admin/chatproxy/streamrecord/stats/").content.decode()
    assert "Fallback targets" in page and f"<td><code>{backup}</code></td><td>1</td><td>0</td><td>0</td>" in page
    profile_form = admin_client.get("/admin/chatproxy/timeoutprofile/add/").content.decode()
    assert 'name="fallbacks"' in profile_form


@pytest.mark.django_db
def test_no_fallback_no_table(admin_client):
    StreamRecord.objects.bulk_create([record("default:gpt-4o-mini")])
    assert records.target_stats("24h") == []
    assert "Fallback targets" not in admin_client.get("/admin/chatproxy/streamrecord/stats/").content.decode()


async def test_a_fallback_whose_upstream_cannot_be_built_is_left_out(caplog):
    from chatproxy import service
    from chatproxy.core import ChatRequest

    settings = {"UPSTREAM": UPSTREAM, "UPSTREAMS": {"nourl": {"API_KEY": "sk-nourl-secret"}, "odd": "x"},
                "FALLBACKS": {"m": ["nourl:a", "odd:b", "c"]}}
    with override_settings(CHATPROXY=settings):
        request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
        for _ in range(2):
            targets = service.fallback_targets(request, Policy(), None)
            assert [(t.upstream_name, t.label) for t in targets] == [("default", "c")]
    errors = [r.getMessage() for r in caplog.records if r.name == "chatproxy.service"]
    assert len(errors) == 2 and "nourl:a" in errors[0] and "odd:b" in errors[1]  # once each
    assert not any("sk-nourl-secret" in e for e in errors)


async def test_a_probe_that_never_reports_lapses():
    clock = Clock()
    breaker = CacheBreaker(LocMemCache("breaker-lost-probe", {}), failures=1, cooldown=30.0, probe_lease=0.05,
                           clock=clock)
    key = "default:m"
    assert await breaker.report(key, await breaker.admit(key), False)
    clock.now += 30.0
    assert (await breaker.admit(key)).probe  # its client leaves: it never reports
    assert not (await breaker.admit(key)).allowed
    await asyncio.sleep(0.1)  # the lease (LocMemCache's own expiry, in real time) has lapsed
    assert (await breaker.admit(key)).probe
