"""Fallback targets and circuits in the stream core, on the virtual clock against scripted upstreams.

Each target has its own :class:`~tests.scripted.ScriptedUpstream`, so a test says exactly what each
provider does and checks when (to the instant) the core gave up on it and what it asked the next one.
The same behaviour over real HTTP, on every way in, is in ``test_fallback.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import pytest
from django.core.cache.backends.locmem import LocMemCache

from chatproxy import records
from chatproxy.circuit import CacheBreaker
from chatproxy.conf import Policy
from chatproxy.core import ChatStream, Target
from chatproxy.errors import FirstTokenTimeout, RateLimited, UpstreamDisconnected, status_error
from chatproxy.stream.retry import GiveUp, MoveOn, Retry, plan_retry
from chatproxy.stream.targets import Breaker
from tests.scripted import Attempt, ScriptedUpstream, refuse, say
from tests.streamrun import assert_well_formed
from tests.test_core_unit import REQUEST, P, Run, at, rng_of
from tests.vclock import START, on_virtual_clock

WORDS = ("The", " tide", " turns", " twice", " a", " day")
FALLBACK = "gpt-4o"


def unavailable() -> Attempt:
    return refuse(status_error(503))


def hangs() -> Attempt:
    return Attempt(headers_delay=3600.0)


class Played(Run):
    """A run with one scripted upstream per target (``upstreams[0]``: the request's own)."""

    def __init__(self, run: Run, upstreams: Sequence[ScriptedUpstream]) -> None:
        super().__init__(run.timed, run.stream, upstreams[0])
        self.upstreams = upstreams

    def opened(self, target: int) -> list[float]:
        return [o.at - START for o in self.upstreams[target].opened]


async def play(*scripts: Iterable[Attempt], policy: Policy = P, policies: Sequence[Policy] = (),
               names: Sequence[str] = (), breaker: Breaker | None = None,
               rng: Callable[[], float] | None = None, allow_reset: bool = True) -> Played:
    """One stream whose request goes to ``scripts[0]``, with a fallback target per further script."""
    upstreams = [ScriptedUpstream(list(script)) for script in scripts]
    fallbacks = [
        Target(upstream, replace(REQUEST, model=name.rpartition(":")[2]), pol,
               name.rpartition(":")[0] or "default", name)
        for upstream, name, pol in zip(upstreams[1:], names or [FALLBACK, "backup:gpt-4.1"],
                                       policies or [policy] * (len(scripts) - 1), strict=False)
    ]
    stream = ChatStream(upstreams[0], REQUEST, policy, rng=rng or rng_of(*[0.5] * 20), fallbacks=fallbacks,
                        breaker=breaker, allow_reset=allow_reset).start()
    loop = asyncio.get_running_loop()
    timed = [(loop.time() - START, event) async for event in stream]
    await stream.aclose()
    assert_well_formed([event for _, event in timed])
    for upstream in upstreams:
        assert upstream.unclosed() == [], "the core left an upstream stream open"
    return Played(Run(timed, stream, upstreams[0]), upstreams)


# ------------------------------------------------------------------------------ the retry plan


def decide(exc: Exception, attempt: int = 1, *, fallback_left: bool = True, stalls: int = 0,
           partial: bool = False, now: float = 0.0) -> object:
    assert isinstance(exc, Exception)
    return plan_retry(exc, attempt, P, partial=partial, deadline_expired=False, now=now, deadline_at=P.deadline,  # type: ignore[arg-type]
                      rng=lambda: 0.5, fallback_left=fallback_left, stalls=stalls)


def test_plan_moves_on_only_while_a_fallback_is_left() -> None:
    from chatproxy.codes import ErrorCode
    from chatproxy.errors import StallTimeout

    assert decide(status_error(503), 3) == MoveOn(ErrorCode.UPSTREAM_UNAVAILABLE)
    assert decide(status_error(503), 3, fallback_left=False) == GiveUp(ErrorCode.UPSTREAM_UNAVAILABLE)
    assert decide(status_error(503), 1) == Retry(0.05)
    assert decide(FirstTokenTimeout()) == MoveOn(ErrorCode.UPSTREAM_TIMEOUT)
    assert decide(FirstTokenTimeout(), fallback_left=False) == Retry(0.05)
    assert decide(StallTimeout(), stalls=1, partial=True) == Retry(0.05)
    assert decide(StallTimeout(), stalls=2, partial=True) == MoveOn(ErrorCode.UPSTREAM_TIMEOUT)
    assert decide(StallTimeout(), 2, stalls=2, partial=True, fallback_left=False) == Retry(0.1)
    assert decide(RateLimited(retry_after=60)) == MoveOn(ErrorCode.RATE_LIMITED)
    assert decide(RateLimited(retry_after=60), fallback_left=False) == GiveUp(ErrorCode.RATE_LIMITED)
    # A backoff that would end past the deadline: straight to the fallback instead.
    assert decide(status_error(503), now=P.deadline - 0.01) == MoveOn(ErrorCode.UPSTREAM_UNAVAILABLE)
    assert decide(status_error(400)) == GiveUp(ErrorCode.BAD_REQUEST)
    too_long = status_error(400, code="context_length_exceeded")
    assert decide(too_long) == MoveOn(ErrorCode.CONTEXT_LENGTH_EXCEEDED, unhealthy=False)
    assert decide(too_long, fallback_left=False) == GiveUp(ErrorCode.CONTEXT_LENGTH_EXCEEDED)


# ------------------------------------------------------------------------------ moving on


@on_virtual_clock
async def test_primary_down_the_fallback_model_answers() -> None:
    run = await play([unavailable()] * 3, [say(*WORDS, usage={"total_tokens": 9})])
    assert run.names == ["start", "retry", "retry", "retry", *["delta"] * len(WORDS), "done"]
    retries = [e.data for e in run.named("retry")]
    assert [r["reason"] for r in retries] == ["upstream_error"] * 3  # type: ignore[index]
    assert [r.get("fallback") for r in retries] == [None, None, FALLBACK]  # type: ignore[union-attr]
    assert retries[2] == {"attempt": 4, "max_attempts": 3, "reason": "upstream_error", "delay": 0.0,
                          "fallback": FALLBACK}
    assert run.last.data == {"finish_reason": "stop", "attempts": 4, "usage": {"total_tokens": 9}, "model": FALLBACK}
    assert run.upstreams[1].opened[0].request.model == FALLBACK
    assert run.opened(1) == [at(run.opened(0)[-1])]  # moved on at once, no backoff
    stats = run.stream.stats
    assert (stats.model, stats.target, stats.abandoned) == (FALLBACK, f"default:{FALLBACK}", ["default:gpt-4o-mini"])
    assert run.events[0].data["model"] == "gpt-4o-mini"  # type: ignore[index]


@on_virtual_clock
async def test_both_down_the_second_provider_answers() -> None:
    run = await play([unavailable()] * 3, [unavailable()] * 3, [say(*WORDS)])
    assert [e.data.get("fallback") for e in run.named("retry")] == [  # type: ignore[union-attr]
        None, None, FALLBACK, None, None, "backup:gpt-4.1"]
    assert run.text == "".join(WORDS) and run.last.data["model"] == "gpt-4.1"  # type: ignore[index]
    assert run.stream.stats.attempts == 7
    values = records.record_values(run.stream)
    assert (values["model"], values["answered_by"]) == ("gpt-4o-mini", "backup:gpt-4.1")
    assert values["abandoned"] == "default:gpt-4o-mini default:gpt-4o" and values["circuits_opened"] == ""


@on_virtual_clock
async def test_a_request_error_never_falls_back() -> None:
    run = await play([refuse(status_error(400))], [])
    assert run.names == ["start", "error"] and run.last.data == {"code": "bad_request"}
    assert run.upstreams[1].opened == []


@on_virtual_clock
async def test_a_context_length_error_moves_on() -> None:
    run = await play([refuse(status_error(400, code="context_length_exceeded"))], [say(*WORDS)])
    assert run.names[:2] == ["start", "retry"] and run.named("retry")[0].data["fallback"] == FALLBACK  # type: ignore[index]
    assert run.last.name == "done" and run.text == "".join(WORDS)


@on_virtual_clock
async def test_a_long_retry_after_moves_on_at_once() -> None:
    run = await play([refuse(RateLimited(retry_after=60))], [say(*WORDS)])
    assert run.named("retry")[0].data["reason"] == "rate_limited"  # type: ignore[index]
    assert run.opened(1) == [at(0.0)] and run.last.name == "done"


@on_virtual_clock
async def test_a_hang_moves_on_at_the_first_token_deadline() -> None:
    run = await play([hangs()], [say(*WORDS, gap=0.1)])
    assert run.times("retry") == [at(P.first_token)]
    assert run.named("retry")[0].data == {"attempt": 2, "max_attempts": 3, "reason": "first_token", "delay": 0.0,
                                          "fallback": FALLBACK}
    assert run.opened(0) == [at(0.0)] and run.opened(1) == [at(P.first_token)]
    assert run.times("done") == [at(P.first_token + 0.6)]


@on_virtual_clock
async def test_without_a_fallback_left_hangs_are_retried_as_before() -> None:
    # The fallback hangs too: as the last target it gets all its attempts, with backoff.
    run = await play([hangs()], [hangs(), hangs(), say("ok")])
    assert run.opened(0) == [at(0.0)]
    assert run.opened(1) == [at(2.0), at(4.05), at(6.15)]
    assert run.text == "ok"


@on_virtual_clock
async def test_every_attempt_stalls_the_deadline_covers_every_target() -> None:
    run = await play([hangs()], [hangs()] * 3, [hangs()] * 3, policy=P.with_options(deadline=7.0))
    assert run.last.data == {"code": "deadline_exceeded"}
    assert run.times("error") == [at(7.0)]
    assert run.opened(0) == [at(0.0)] and run.opened(1) == [at(2.0)] and run.opened(2) == [at(4.0), at(6.05)]


@on_virtual_clock
async def test_a_stall_mid_answer_gets_one_more_try_then_completes_on_the_fallback_seamlessly() -> None:
    first, rest = WORDS[:3], WORDS[3:]
    run = await play([say(*first, hang=True), say(*first, hang=True)], [say(*WORDS)])
    assert [e.data["reason"] for e in run.named("retry")] == ["stall", "stall"]  # type: ignore[index]
    assert [e.data.get("fallback") for e in run.named("retry")] == [None, FALLBACK]  # type: ignore[union-attr]
    assert "reset" not in run.names
    assert run.deltas() == [*first, *rest]  # the fallback's repeat of the start was held back
    assert run.last.data["model"] == FALLBACK  # type: ignore[index]


@on_virtual_clock
async def test_a_cut_answer_diverging_on_the_fallback_resets_or_fails() -> None:
    cut = [say(*WORDS[:3], error=UpstreamDisconnected())] * 3
    run = await play(cut, [say("Another", " answer")])
    assert run.names.count("reset") == 1 and run.text == "Another answer" and run.last.name == "done"
    run = await play(cut, [say("Another", " answer")], allow_reset=False)
    assert run.last.data == {"code": "upstream_unavailable"} and "reset" not in run.names


@on_virtual_clock
async def test_continue_prefills_the_fallback() -> None:
    cont = P.with_options(on_partial="continue")
    run = await play([say(*WORDS[:3], error=UpstreamDisconnected())] * 3, [say(" turns", *WORDS[3:])],
                     policy=cont)
    request = run.upstreams[1].opened[0].request
    assert request.messages[-1] == {"role": "assistant", "content": "".join(WORDS[:3]), "prefix": True}
    assert run.text == "".join(WORDS) and "reset" not in run.names


@on_virtual_clock
async def test_a_fallback_refusing_the_prefill_is_restarted_and_never_masks_the_error() -> None:
    cont = P.with_options(on_partial="continue")
    cut = [say(*WORDS[:3], error=UpstreamDisconnected())] * 3
    run = await play(cut, [refuse(status_error(400)), say(*WORDS)], policy=cont)
    second = run.upstreams[1].opened[1].request
    assert second.messages == REQUEST.messages  # restarted: no prefill
    assert run.text == "".join(WORDS) and run.last.name == "done"
    # The restart fails too: the stream ends with that failure, not with the refusal's bad_request.
    run = await play(cut, [refuse(status_error(400))] + [unavailable()] * 3, policy=cont)
    assert run.last.data == {"code": "upstream_unavailable"}
    assert len(run.upstreams[1].opened) == 4  # the refusal used none of its three attempts


@on_virtual_clock
async def test_each_target_follows_its_own_profile() -> None:
    patient = P.with_options(first_token=5.0, max_attempts=1, profile="slow")
    run = await play([hangs()], [hangs()], policies=[patient], policy=P.with_options(deadline=30.0))
    assert run.opened(1) == [at(2.0)] and run.times("error") == [at(7.0)]
    assert run.last.data == {"code": "upstream_timeout"}


# ------------------------------------------------------------------------------ circuits


def breaker(failures: int = 2, cooldown: float = 10.0) -> CacheBreaker:
    loop = asyncio.get_running_loop()
    return CacheBreaker(LocMemCache(f"circuit-{id(loop)}", {}), failures=failures, cooldown=cooldown,
                        probe_lease=P.deadline, clock=loop.time)


@on_virtual_clock
async def test_the_circuit_opens_after_failures_and_later_requests_skip_the_target() -> None:
    circuits = breaker(failures=2)
    first = await play([unavailable()] * 3, [say("ok")], breaker=circuits)
    assert first.stream.stats.circuits_opened == []
    second = await play([unavailable()] * 3, [say("ok")], breaker=circuits)
    assert second.stream.stats.circuits_opened == ["default:gpt-4o-mini"]
    third = await play([], [say("ok")], breaker=circuits)  # the primary is not even asked
    assert third.names == ["start", "delta", "done"]
    assert third.events[0].data["model"] == FALLBACK and third.last.data["model"] == FALLBACK  # type: ignore[index]


@on_virtual_clock
async def test_after_the_cooldown_one_probe_closes_the_circuit() -> None:
    circuits = breaker(failures=1, cooldown=10.0)
    await play([unavailable()] * 3, [say("ok")], breaker=circuits)
    await play([], [say("ok")], breaker=circuits)
    await asyncio.sleep(10.0)
    probe = await play([say("back")], [], breaker=circuits)
    assert probe.text == "back" and probe.last.data["model"] == "gpt-4o-mini"  # type: ignore[index]
    after = await play([say("again")], [], breaker=circuits)
    assert after.text == "again"


@on_virtual_clock
async def test_a_failed_probe_opens_the_circuit_again_and_only_one_request_probes() -> None:
    circuits = breaker(failures=1, cooldown=10.0)
    await play([unavailable()] * 3, [say("ok")], breaker=circuits)
    await asyncio.sleep(10.0)
    probing = asyncio.ensure_future(play([say("slow", first=1.0, error=UpstreamDisconnected())] * 3, [say("ok")],
                                         breaker=circuits))
    await asyncio.sleep(0.1)
    meanwhile = await play([], [say("ok")], breaker=circuits)  # the probe is under way: skipped
    assert meanwhile.last.data["model"] == FALLBACK  # type: ignore[index]
    failed = await probing
    assert failed.stream.stats.circuits_opened == ["default:gpt-4o-mini"]
    assert (await play([], [say("ok")], breaker=circuits)).last.name == "done"


@on_virtual_clock
async def test_the_last_target_is_tried_even_with_its_circuit_open() -> None:
    circuits = breaker(failures=1)
    await play([unavailable()] * 3, [unavailable()] * 3, breaker=circuits)
    # Both circuits are open now: the primary is skipped, the last target still gets its attempts.
    run = await play([], [unavailable(), say("ok")], breaker=circuits)
    assert run.text == "ok" and run.opened(0) == []


@on_virtual_clock
async def test_a_request_error_and_a_cancel_do_not_count_against_the_circuit() -> None:
    circuits = breaker(failures=1)
    await play([refuse(status_error(400, code="context_length_exceeded"))], [say("ok")], breaker=circuits)
    await play([refuse(status_error(400))], [], breaker=circuits)
    run = await play([say("fine")], [], breaker=circuits)
    assert run.text == "fine"


@pytest.mark.parametrize("failures", [1, 3])
@on_virtual_clock
async def test_a_success_resets_the_count(failures: int) -> None:
    circuits = breaker(failures=failures + 1)
    for _ in range(failures):
        await play([unavailable()] * 3, [say("ok")], breaker=circuits)
    await play([say("fine")], [], breaker=circuits)
    for _ in range(failures):
        run = await play([unavailable()] * 3, [say("ok")], breaker=circuits)
        assert run.stream.stats.circuits_opened == []


@on_virtual_clock
async def test_a_diverging_fallback_on_a_transport_without_reset_is_no_failure_of_the_fallback() -> None:
    circuits = breaker(failures=1)
    cut = [say(*WORDS[:3], error=UpstreamDisconnected())] * 3
    run = await play(cut, [say("Another", " answer")], breaker=circuits, allow_reset=False)
    assert run.last.data == {"code": "upstream_unavailable"}
    assert run.stream.stats.circuits_opened == ["default:gpt-4o-mini"]  # the primary's only
