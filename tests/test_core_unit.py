"""The stream core on a virtual clock against a scripted upstream: exact timings, no sockets.

Every deadline here is checked to the instant it is due (the clock only moves when nothing is
ready to run, see :mod:`tests.vclock`), so each test takes milliseconds of wall time however many
virtual seconds it spans. The real-HTTP tests against the simulator are in ``test_core.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import pytest

from chatproxy.conf import Policy
from chatproxy.core import ChatRequest, ChatStream, Event, EventsDropped
from chatproxy.errors import (
    RateLimited,
    StallTimeout,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    status_error,
)
from chatproxy.stream.joiner import overlap
from tests import streamrun
from tests.scripted import Attempt, ScriptedUpstream, refuse, say
from tests.streamrun import assert_well_formed
from tests.vclock import START, VirtualClockLoop, on_virtual_clock

P = Policy(
    connect=1.0,
    first_token=2.0,
    stall=0.5,
    deadline=20.0,
    max_attempts=3,
    backoff_initial=0.1,
    backoff_max=0.4,
    retry_after_max=3.0,
    keepalive=5.0,
    gateway=10.0,
)
REQUEST = ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "Tell me about rivers"}])


def at(seconds: float) -> object:
    """An instant on the virtual clock, in seconds since the stream started (to the last float bit, nearly)."""
    return pytest.approx(seconds, abs=1e-9)


def rng_of(*values: float) -> Callable[[], float]:
    """A jitter source returning ``values`` in turn; a test error if asked once more."""
    remaining = list(values)

    def rng() -> float:
        assert remaining, "the backoff asked for more random numbers than expected"
        return remaining.pop(0)

    return rng


class Run(streamrun.Run):
    """A :class:`tests.streamrun.Run` on the virtual clock (times since start) with its scripted upstream."""

    def __init__(self, timed: list[tuple[float, Event]], stream: ChatStream, upstream: ScriptedUpstream) -> None:
        super().__init__(timed, stream)
        self.upstream = upstream

    def opened_at(self) -> list[float]:
        return [o.at - START for o in self.upstream.opened]

    def closed_at(self) -> list[float | None]:
        return [None if o.stream is None or o.stream.closed_at is None else o.stream.closed_at - START
                for o in self.upstream.opened]


def assert_all_closed(upstream: ScriptedUpstream) -> None:
    assert upstream.unclosed() == [], "the core left an upstream stream open"


async def play(script: Iterable[Attempt], policy: Policy = P, *, rng: Callable[[], float] | None = None,
               **kwargs: object) -> Run:
    upstream = ScriptedUpstream(list(script))
    stream = ChatStream(upstream, REQUEST, policy, rng=rng or rng_of(*[0.5] * 10), **kwargs).start()  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    timed = [(loop.time() - START, event) async for event in stream]
    await stream.aclose()
    assert_well_formed([event for _, event in timed])
    assert_all_closed(upstream)
    assert stream.finished
    return Run(timed, stream, upstream)


def test_the_clock_is_virtual() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(30)
        return loop.time()

    loop = VirtualClockLoop()
    try:
        assert loop.run_until_complete(main()) == START + 30
    finally:
        loop.close()


# ---------------------------------------------------------------------------------- watchdog


@on_virtual_clock
async def test_healthy_answer() -> None:
    run = await play([say("Hello", " world", gap=0.1, usage={"total_tokens": 7})])
    assert run.names == ["start", "delta", "delta", "done"]
    assert run.last.data == {"finish_reason": "stop", "attempts": 1, "usage": {"total_tokens": 7},
                             "model": "gpt-4o-mini"}
    assert run.events[0].data == {"stream_id": run.stream.stream_id, "model": "gpt-4o-mini", "profile": "settings"}
    assert run.times("delta") == [at(0.1), at(0.2)]
    stats = run.stream.stats
    assert (stats.attempts, stats.outcome, stats.chars_sent, stats.retry_reasons) == (1, "done", 11, [])
    assert stats.time_to_first_token == at(0.1) and stats.duration == at(0.2) and stats.longest_gap == at(0.1)
    request = run.upstream.opened[0].request
    assert (request.model, request.messages, request.read_timeout) == ("gpt-4o-mini", REQUEST.messages, None)
    assert (request.connect_timeout, request.total_timeout) == (P.connect, at(P.deadline + 5.0))


@pytest.mark.parametrize("late", [say("late", first=30.0), Attempt(headers_delay=30.0)], ids=["body", "headers"])
@on_virtual_clock
async def test_first_token_deadline_fires_at_exactly_first_token(late: Attempt) -> None:
    run = await play([late, say("Hello")])
    assert run.names == ["start", "retry", "delta", "done"]
    assert run.times("retry") == [at(P.first_token)]
    assert run.named("retry")[0].data == {"attempt": 2, "max_attempts": 3, "reason": "first_token", "delay": 0.05}
    # The abandoned attempt is closed when it is given up, the next one opens after the backoff.
    if late.chunks:  # an open() still waiting for headers is cancelled instead: nothing to close
        assert run.closed_at()[0] == at(P.first_token)
    assert run.opened_at() == [at(0.0), at(P.first_token + 0.05)]
    assert run.text == "Hello"


@on_virtual_clock
async def test_stall_fires_at_exactly_stall_after_the_last_chunk() -> None:
    run = await play([say("a", "b", "c", gap=0.2, hang=True), say("a", "b", "c", "d")])
    assert run.names == ["start", "delta", "delta", "delta", "retry", "delta", "done"]
    assert run.times("retry") == [at(0.6 + P.stall)]
    assert run.named("retry")[0].data["reason"] == "stall"
    assert run.stream.stats.retry_reasons == ["stall"]
    assert run.text == "abcd"


@on_virtual_clock
async def test_gaps_just_under_the_stall_are_never_retried() -> None:
    gap = P.stall - 0.001
    run = await play([say(*"abcdef", first=P.first_token - 0.001, gap=gap)])
    assert "retry" not in run.names and run.last.data["attempts"] == 1
    assert run.stream.stats.longest_gap == at(gap)


@on_virtual_clock
async def test_the_stall_watch_starts_with_the_first_chunk_not_the_request() -> None:
    # 1.9 s to the first chunk is fine (FIRST_TOKEN 2.0) though far over STALL (0.5).
    run = await play([say("a", "b", first=1.9, gap=0.4)])
    assert "retry" not in run.names


@on_virtual_clock
async def test_the_deadline_cuts_an_attempt() -> None:
    policy = P.with_options(deadline=3.0)
    run = await play([say(*["x"] * 20, gap=0.25)], policy)
    assert run.last.data == {"code": "deadline_exceeded"}
    assert run.times("error") == [at(3.0)] and run.closed_at() == [at(3.0)]
    assert "retry" not in run.names


@on_virtual_clock
async def test_a_backoff_past_the_deadline_ends_the_stream_at_once() -> None:
    policy = P.with_options(deadline=3.0, first_token=5.0)
    run = await play([refuse(UpstreamConnectError(), after=2.95), say("late")], policy, rng=rng_of(1.0))
    assert run.names == ["start", "error"] and run.last.data == {"code": "deadline_exceeded"}
    assert run.times("error") == [at(2.95)] and len(run.upstream.opened) == 1


@on_virtual_clock
async def test_later_attempts_get_the_rest_of_the_deadline() -> None:
    policy = P.with_options(deadline=10.0, connect=5.0, first_token=8.0)
    run = await play([refuse(UpstreamConnectError(), after=6.0), say("ok")], policy)
    second = run.upstream.opened[1].request
    assert second.connect_timeout == at(10.0 - 6.05)
    assert second.total_timeout == at(10.0 - 6.05 + 5.0)


# ---------------------------------------------------------------------------------- retries


@on_virtual_clock
async def test_full_jitter_backoff_uses_the_injected_rng() -> None:
    policy = P.with_options(max_attempts=4, backoff_initial=0.1, backoff_max=0.3)
    run = await play([refuse(UpstreamConnectError())] * 3 + [say("ok")], policy, rng=rng_of(0.5, 0.25, 1.0))
    # caps 0.1, 0.2, 0.3 (0.4 capped) times the random numbers
    assert [r.data["delay"] for r in run.named("retry")] == [0.05, 0.05, 0.3]
    assert run.opened_at() == [at(0.0), at(0.05), at(0.10), at(0.40)]
    assert [r.data["attempt"] for r in run.named("retry")] == [2, 3, 4]
    assert run.last.data["attempts"] == 4


@on_virtual_clock
async def test_retry_after_is_honoured_without_jitter() -> None:
    run = await play([refuse(RateLimited(retry_after=1.5)), say("ok")], rng=rng_of())
    assert run.named("retry")[0].data == {"attempt": 2, "max_attempts": 3, "reason": "rate_limited", "delay": 1.5}
    assert run.opened_at() == [at(0.0), at(1.5)]


@on_virtual_clock
async def test_retry_after_ms_on_a_server_error_is_honoured() -> None:
    run = await play([refuse(status_error(503, retry_after=0.4)), say("ok")], rng=rng_of())
    assert run.named("retry")[0].data["delay"] == 0.4 and run.opened_at()[1] == at(0.4)


@on_virtual_clock
async def test_retry_after_beyond_the_cap_fails_fast() -> None:
    run = await play([refuse(RateLimited(retry_after=P.retry_after_max + 0.5)), say("never")])
    assert run.names == ["start", "error"] and run.last.data == {"code": "rate_limited"}
    assert run.times("error") == [at(0.0)] and len(run.upstream.opened) == 1


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        (refuse(UpstreamConnectError()), "upstream_unavailable", "connect"),
        (refuse(status_error(503)), "upstream_unavailable", "upstream_error"),
        (refuse(RateLimited()), "rate_limited", "rate_limited"),
        (say("a", error=UpstreamDisconnected()), "upstream_unavailable", "disconnected"),
        (Attempt(hang=True), "upstream_timeout", "first_token"),
    ],
    ids=["connect", "503", "429", "disconnect", "first_token"],
)
@on_virtual_clock
async def test_max_attempts_then_the_final_code(failure: Attempt, code: str, reason: str) -> None:
    run = await play([failure] * 3)
    assert [r.data["attempt"] for r in run.named("retry")] == [2, 3]
    assert run.last.data == {"code": code}
    assert len(run.upstream.opened) == 3 and run.stream.stats.retry_reasons == [reason, reason]
    assert run.stream.stats.outcome == code


@pytest.mark.parametrize(("status", "code"), [(400, "bad_request"), (404, "bad_request"), (422, "bad_request"),
                                              (401, "upstream_unavailable"), (403, "upstream_unavailable")])
@on_virtual_clock
async def test_non_retryable_statuses_end_at_once(status: int, code: str) -> None:
    run = await play([refuse(status_error(status)), say("never")])
    assert run.names == ["start", "error"] and run.last.data == {"code": code}
    assert len(run.upstream.opened) == 1


@on_virtual_clock
async def test_an_unexpected_exception_ends_with_internal() -> None:
    run = await play([say("a", error=RuntimeError("bug"))])  # type: ignore[arg-type]
    assert run.names == ["start", "delta", "error"] and run.last.data == {"code": "internal"}


@on_virtual_clock
async def test_on_retry_and_on_finish_hooks() -> None:
    retries: list[tuple[str, int, float]] = []
    finished: list[ChatStream] = []
    run = await play([refuse(UpstreamConnectError()), say("ok")],
                     on_retry=lambda s, reason, attempt, delay: retries.append((reason, attempt, delay)),
                     on_finish=finished.append)
    assert retries == [("connect", 2, 0.05)]
    assert finished == [run.stream] and run.stream.stats.duration == at(0.05)


# ---------------------------------------------------------------------------------- partial output


def cut(*texts: str) -> Attempt:
    """An attempt that sends ``texts`` and is then cut off."""
    return say(*texts, gap=0.1, error=UpstreamDisconnected())


@on_virtual_clock
async def test_restart_reproducing_the_prefix_continues_seamlessly() -> None:
    run = await play([cut("Hello", " wor"), say("Hel", "lo w", "orld!", gap=0.1)])
    assert run.names == ["start", "delta", "delta", "retry", "delta", "done"]
    assert run.deltas() == ["Hello", " wor", "ld!"]
    # Held back until it went past what was sent: the first new delta is the third chunk's.
    assert run.times("delta")[-1] == at(0.2 + 0.05 + 0.3)


@on_virtual_clock
async def test_restart_that_diverges_resets() -> None:
    run = await play([cut("Hello", " wor"), say("Hello", " there", ", friend", gap=0.1)])
    assert run.names == ["start", "delta", "delta", "retry", "reset", "delta", "delta", "done"]
    assert run.named("reset")[0].data == {"reason": "diverged"}
    assert run.deltas()[2:] == ["Hello there", ", friend"]
    assert run.text == "Hello there, friend"
    assert run.stream.stats.chars_sent == len("Hello there, friend")


@on_virtual_clock
async def test_restart_that_diverges_without_reset_support_fails() -> None:
    run = await play([cut("Hello", " wor"), say("Hello", " there")], allow_reset=False)
    assert "reset" not in run.names
    assert run.last.data == {"code": "upstream_unavailable"}
    assert run.closed_at()[1] is not None


@on_virtual_clock
async def test_a_shorter_restart_is_a_divergence() -> None:
    run = await play([cut("Hello", " wor"), say("Hel", "lo")])
    assert run.names[-4:] == ["retry", "reset", "delta", "done"]
    assert run.text == "Hello"


@on_virtual_clock
async def test_a_restart_equal_to_the_prefix_ends_without_new_text() -> None:
    run = await play([cut("Hello", " wor"), say("Hello wor")])
    assert run.names == ["start", "delta", "delta", "retry", "done"]


@on_virtual_clock
async def test_continue_sends_the_partial_answer_and_removes_the_overlap() -> None:
    policy = P.with_options(on_partial="continue")
    run = await play([cut("The quick", " brown"), say(" brown fox", " jumps", "!")], policy)
    prefill = run.upstream.opened[1].request.messages
    assert list(prefill) == [*REQUEST.messages, {"role": "assistant", "content": "The quick brown", "prefix": True}]
    # Held until the overlap window (here: the prefix's length) is filled, then joined.
    assert run.deltas() == ["The quick", " brown", " fox jumps", "!"]
    assert "reset" not in run.names and run.text == "The quick brown fox jumps!"


@on_virtual_clock
async def test_a_short_continuation_is_joined_when_it_ends() -> None:
    policy = P.with_options(on_partial="continue")
    run = await play([cut("The quick", " brown"), say(" brown.")], policy)
    assert run.deltas() == ["The quick", " brown", "."]


@on_virtual_clock
async def test_continue_without_partial_output_is_a_plain_retry() -> None:
    policy = P.with_options(on_partial="continue")
    run = await play([refuse(UpstreamConnectError()), say("ok")], policy)
    assert list(run.upstream.opened[1].request.messages) == list(REQUEST.messages)


@on_virtual_clock
async def test_on_partial_fail() -> None:
    policy = P.with_options(on_partial="fail")
    run = await play([cut("Hello"), say("never")], policy)
    assert run.names == ["start", "delta", "error"] and run.last.data == {"code": "upstream_unavailable"}
    # Before any text was sent, a failure is retried as usual.
    run = await play([refuse(UpstreamConnectError()), say("ok")], policy)
    assert run.names == ["start", "retry", "delta", "done"]


# ---------------------------------------------------------------------------------- keepalive, readers


@on_virtual_clock
async def test_keepalive_after_exactly_keepalive_seconds_of_silence() -> None:
    policy = P.with_options(keepalive=1.0, first_token=5.0, stall=2.0)
    run = await play([say("a", "b", first=3.5, gap=1.6)], policy)
    assert run.names == ["start", "keepalive", "keepalive", "keepalive", "delta", "keepalive", "delta", "done"]
    assert run.times("keepalive") == [at(1.0), at(2.0), at(3.0), at(4.5)]


@on_virtual_clock
async def test_keepalive_fires_on_the_instant_it_is_due_whatever_the_float_rounding() -> None:
    # 1000.3 - 1000.0 < 0.3 in binary floating point: the keepalive due at last emit + 0.3 must still count.
    policy = P.with_options(keepalive=0.3, first_token=5.0)
    run = await play([say("a", first=1.0)], policy)
    assert run.times("keepalive") == [at(0.3), at(0.6), at(0.9)]


@on_virtual_clock
async def test_keepalives_go_on_during_a_backoff() -> None:
    policy = P.with_options(keepalive=1.0)
    run = await play([refuse(RateLimited(retry_after=2.5)), say("ok")], policy)
    assert run.names == ["start", "retry", "keepalive", "keepalive", "delta", "done"]
    assert run.times("keepalive") == [at(1.0), at(2.0)]


@on_virtual_clock
async def test_the_event_store_gets_no_keepalives() -> None:
    policy = P.with_options(keepalive=0.5)
    stream = ChatStream(ScriptedUpstream([say("a", first=1.2)]), REQUEST, policy)
    store = stream.subscribe(client=False)
    client_events = [e.name async for e in stream]
    assert client_events == ["start", "keepalive", "keepalive", "delta", "done"]
    assert [e.name for e in store.pending()] == ["start", "delta", "done"]
    assert [e.name for e in stream.events_after(1)] == ["delta", "done"] and stream.last_seq == 3
    await stream.aclose()


@on_virtual_clock
async def test_a_resumed_reader_gets_the_events_after_its_seq() -> None:
    stream = ChatStream(ScriptedUpstream([say("a", "b", "c", gap=0.1)]), REQUEST, P)
    first = [e async for e in stream]
    late = stream.subscribe(after=2)
    assert [e.seq async for e in late] == [3, 4, 5]
    assert [e.seq for e in first] == [1, 2, 3, 4, 5]
    await stream.aclose()


@on_virtual_clock
async def test_persisted_events_leave_memory_once_every_reader_has_them() -> None:
    texts = [f"t{i} " for i in range(300)]
    stream = ChatStream(ScriptedUpstream([say(*texts, gap=0.001)]), REQUEST, P, persistent=True)
    store = stream.subscribe(client=False)
    events = [e async for e in stream]
    assert len(events) == 302 and len(stream.events_after(0)) == 302  # nothing persisted yet
    assert len(store.pending()) == 302
    stream.mark_persisted(250)
    assert stream.events_after(0)[0].seq == 251
    with pytest.raises(EventsDropped) as dropped:
        stream.subscribe(after=100)
    assert dropped.value.log_base == 250
    assert [e.seq async for e in stream.subscribe(after=300)] == [301, 302]
    await stream.aclose()


@on_virtual_clock
async def test_memory_is_trimmed_to_the_slowest_reader_without_persistence() -> None:
    texts = [f"t{i} " for i in range(300)]
    stream = ChatStream(ScriptedUpstream([say(*texts, gap=0.001)]), REQUEST, P)
    slow = stream.subscribe(client=False)
    [e async for e in stream]
    assert stream.events_after(0)[0].seq == 1  # the slow reader still needs everything
    assert len(slow.pending()) == 302
    stream.mark_persisted(0)  # any trim trigger: memory now keeps nothing every reader has
    assert stream.events_after(0) == []
    await stream.aclose()


# ---------------------------------------------------------------------------------- grace, cancellation


@on_virtual_clock
async def test_the_last_client_leaving_cancels_after_the_grace_period() -> None:
    upstream = ScriptedUpstream([say(*["x"] * 100, gap=0.1)])
    stream = ChatStream(upstream, REQUEST, P, grace=2.0)
    reader = stream.subscribe()
    loop = asyncio.get_running_loop()
    async for event in reader:
        if event.name == "delta":
            break
    reader.close()  # at 0.1
    await asyncio.sleep(1.9)
    assert not stream.finished and upstream.unclosed() == [0]  # still generating for a resume
    await asyncio.sleep(0.2)
    assert stream.finished and stream.stats.outcome == "cancelled"
    assert upstream.opened[0].stream is not None and upstream.opened[0].stream.closed_at == at(START + 2.1)
    events = stream.events_after(0)
    assert_well_formed(events)
    assert events[-1].data == {"code": "cancelled"} and loop.time() == at(START + 2.2)
    await stream.aclose()


@on_virtual_clock
async def test_a_client_returning_within_the_grace_period_keeps_the_stream() -> None:
    upstream = ScriptedUpstream([say(*["x"] * 30, gap=0.1)])
    stream = ChatStream(upstream, REQUEST, P, grace=2.0)
    stream.subscribe().close()
    await asyncio.sleep(1.5)
    back = stream.subscribe(after=stream.last_seq)
    events = [e async for e in back]
    assert events[-1].name == "done" and stream.stats.outcome == "done"
    await stream.aclose()
    assert_all_closed(upstream)


@on_virtual_clock
async def test_without_grace_the_last_client_leaving_cancels_at_once() -> None:
    upstream = ScriptedUpstream([say(*["x"] * 30, gap=0.1)])
    stream = ChatStream(upstream, REQUEST, P)
    reader = stream.subscribe()
    await reader.__anext__()
    reader.close()
    await stream.aclose()
    assert stream.stats.outcome == "cancelled" and stream.stats.duration == at(0.0)
    assert_all_closed(upstream)


@on_virtual_clock
async def test_cancel_ends_with_exactly_one_cancelled_error_and_closes_upstream() -> None:
    upstream = ScriptedUpstream([say("late", first=1.0)])
    stream = ChatStream(upstream, REQUEST, P).start()
    events = [await stream.__anext__()]
    await asyncio.sleep(0.5)
    stream.cancel()
    stream.cancel()
    events += [e async for e in stream]
    assert [e.name for e in events] == ["start", "error"] and events[-1].data == {"code": "cancelled"}
    await stream.aclose()
    assert_all_closed(upstream)
    assert upstream.opened[0].stream is not None and upstream.opened[0].stream.closed_at == at(START + 0.5)


@on_virtual_clock
async def test_cancel_during_a_backoff() -> None:
    upstream = ScriptedUpstream([refuse(RateLimited(retry_after=2.0)), say("never")])
    stream = ChatStream(upstream, REQUEST, P).start()
    names = []
    async for event in stream:
        names.append(event.name)
        if event.name == "retry":
            stream.cancel()
    assert names == ["start", "retry", "error"] and len(upstream.opened) == 1
    await stream.aclose()


@on_virtual_clock
async def test_aclose_of_a_stream_never_started_is_a_no_op() -> None:
    stream = ChatStream(ScriptedUpstream([]), REQUEST, P)
    await stream.aclose()
    assert not stream.finished


@on_virtual_clock
async def test_an_abandoned_attempt_is_closed_before_the_next_opens() -> None:
    run = await play([say("a", hang=True), cut("a", "b"), say("a", "b", "c")])
    closed, opened = run.closed_at(), run.opened_at()
    assert all(c is not None and c <= o for c, o in zip(closed, opened[1:], strict=False))
    assert run.stream.stats.retry_reasons == ["stall", "disconnected"]
    assert isinstance(StallTimeout(), UpstreamError)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ("The quick brown", " brown fox", 6),
        ("The quick brown", "brown fox", 5),
        ("The quick brown", "n fox", 0),  # starts mid-word: not an overlap
        ("abc", "xyz", 0),
        ("", "xyz", 0),
    ],
)
def test_overlap(before: str, after: str, expected: int) -> None:
    assert overlap(before, after) == expected



@on_virtual_clock
async def test_a_client_leaving_before_the_pump_ran_still_ends_the_stream() -> None:
    finished: list[ChatStream] = []
    upstream = ScriptedUpstream([say("a")])
    stream = ChatStream(upstream, REQUEST, P, on_finish=finished.append)
    stream.subscribe().close()  # cancels the stream before its pump task ever ran
    await stream.aclose()
    assert finished == [stream] and stream.stats.outcome == "cancelled"
    events = stream.events_after(0)
    assert_well_formed(events)
    assert events[-1].data == {"code": "cancelled"} and upstream.opened == []
