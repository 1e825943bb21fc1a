"""``manage.py chatproxy_probe``: measures the configured upstream (the simulator) and suggests timeouts."""

from __future__ import annotations

import re

import pytest
from django.core.management import CommandError, call_command

from chatproxy import profiles
from chatproxy.models import TimeoutProfile

pytestmark = [pytest.mark.upstream, pytest.mark.django_db]


@pytest.fixture(autouse=True)
def upstream_is_the_simulator(sim, settings):
    profiles.forget()
    settings.CHATPROXY = {"UPSTREAM": {"BASE_URL": sim.base_url, "API_KEY": "sk-test-probe"}}
    yield
    profiles.forget()


def probe(capsys, *args: str) -> str:
    call_command("chatproxy_probe", *args)
    return capsys.readouterr().out


def row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_prints_distributions_and_suggestions(capsys, sim):
    out = probe(capsys, "-n", "6", "--concurrency", "3", "--prompt", "Hi [[sim chunks=5 gap=0.03 first_delay=0.25]]")
    assert f"Probed gpt-4o-mini at {sim.base_url}: 6 request(s), concurrency 3." in out
    assert "6 completed, 0 failed." in out
    p50, p95, top, n = (float(v.rstrip("s")) for v in row(out, "time to first token"))
    assert 0.25 <= p50 <= p95 <= top < 1.0 and n == 6
    gap_p50 = float(row(out, "longest gap")[0].rstrip("s"))
    assert 0.02 < gap_p50 < 0.3
    # The suggestion table: now (the default profile: built-in defaults here), suggested, formula.
    assert "Suggested profile values (profile 'default' applies to gpt-4o-mini now):" in out
    assert row(out, "first_token_timeout")[:3] == ["30", "2", "*"]  # floor: 2 x ~0.3 s is below 2 s
    assert row(out, "stall_timeout")[:3] == ["10", "2", "*"]
    assert row(out, "keepalive_interval")[:2] == ["10", "10"]
    assert "Only 6 sample(s): treat this as a rough guide" in out
    assert len(sim.requests()) == 6


def test_the_current_column_is_the_profile_that_applies(capsys):
    TimeoutProfile.objects.create(name="mini", model_pattern="gpt-4o-mini", first_token_timeout=7.5)
    out = probe(capsys, "-n", "2", "--model", "gpt-4o-mini", "--prompt", "Hi [[sim chunks=3]]")
    assert "(profile 'mini' applies to gpt-4o-mini now)" in out
    assert row(out, "first_token_timeout")[0] == "7.5"
    out = probe(capsys, "-n", "1", "--model", "o1-sim", "--prompt", "Hi [[sim chunks=3]]")
    assert "Probed o1-sim" in out and "(profile 'default' applies to o1-sim now)" in out


def test_failures_are_counted_apart(capsys, sim):
    out = probe(capsys, "-n", "5", "--prompt", "Hi [[sim chunks=3 status=503 times=2]]")
    assert "3 completed, 2 failed (HTTP 503)." in out
    assert row(out, "time to first token")[-1] == "3"


def test_slow_requests_time_out_on_the_probe_limit(capsys):
    out = probe(capsys, "-n", "3", "--timeout", "0.3", "--concurrency", "3",
                "--prompt", "Hi [[sim chunks=3 first_delay=5 times=1]]")
    assert re.search(r"\d completed, [12] failed \(timeout\)\.", out)


def test_nothing_completed_is_an_error(capsys):
    with pytest.raises(CommandError, match="No request completed"):
        probe(capsys, "-n", "2", "--prompt", "Hi [[sim status=400]]")
    assert "0 completed, 2 failed (HTTP 400)." in capsys.readouterr().out


def test_bad_arguments(capsys):
    with pytest.raises(CommandError, match="at least 1"):
        probe(capsys, "-n", "0")
