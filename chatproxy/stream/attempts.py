"""The attempt runner: plays a target's attempts until one answers or the retry plan gives up.

One attempt opens the upstream, reads it and hands each chunk to the answer (or, after partial
output, to a :class:`~chatproxy.stream.joiner.Joiner`), inside an ``asyncio.timeout`` that the
watchdog expires. Per chunk: one timestamp, the gap bookkeeping, one type test, and the answer's
append and wake-up; no Task, no ``wait_for``, no log line.

Every item an adapter yields is progress for the first-token and stall deadlines, a text or not:
a model streaming a tool call's arguments, its reasoning or a refusal is as alive as one
streaming text. Chunks that carry nothing (the role chunk, the usage chunk after the finish) never
reach the loop, so they neither count as a first token nor end anything early: the attempt ends
when the body does, with the usage read. If the body stalls after its finish chunk (the usage
chunk or ``[DONE]`` never comes), the answer is complete all the same and ends as ``done``.
After partial output that is more than text, ``ON_PARTIAL = "continue"`` falls back to a restart
(a half-sent tool call cannot be continued, only made again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from chatproxy.codes import ErrorCode
from chatproxy.errors import StallTimeout, UpstreamError, UpstreamStatusError
from chatproxy.stream.answer import Answer
from chatproxy.stream.events import EventLog
from chatproxy.stream.joiner import Diverged, Joiner
from chatproxy.stream.retry import GiveUp, MoveOn, Retry, plan_retry
from chatproxy.stream.values import StreamStats, Target
from chatproxy.stream.watchdog import Watchdog
from chatproxy.upstream.base import UpstreamRequest

# How far past the stream's deadline an SDK's total timeout sits: the watchdog ends the attempt first.
TOTAL_TIMEOUT_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class Done:
    """An attempt answered to the end."""

    finish_reason: str | None
    usage: dict[str, Any] | None
    attempts: int


def refuses_prefill(exc: UpstreamError) -> bool:
    """Whether ``exc``, answering a continuation request, says the upstream does not take a prefill:
    a request error (not the credentials, not a rate limit) about a request that was fine without it."""
    return isinstance(exc, UpstreamStatusError) and not exc.retryable and exc.status not in (401, 403)


class AttemptRunner:
    """Runs attempts for one stream; shared by every target the stream tries.

    ``attempts`` counts across targets (``StreamStats.attempts``, the ``retry`` and ``done`` events);
    ``max_attempts`` and the rest of the retry plan come from each target's policy.
    ``on_retry(reason, attempt, delay)`` is called as each ``retry`` event is emitted.
    """

    __slots__ = ("_allow_reset", "_answer", "_log", "_loop", "_on_retry", "_rng", "_stats", "_watchdog", "attempts",
                 "diverged", "last_reason")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        log: EventLog,
        answer: Answer,
        watchdog: Watchdog,
        stats: StreamStats,
        *,
        rng: Callable[[], float],
        allow_reset: bool,
        on_retry: Callable[[str, int, float], Any] | None,
    ) -> None:
        self._loop = loop
        self._log = log
        self._answer = answer
        self._watchdog = watchdog
        self._stats = stats
        self._rng = rng
        self._allow_reset = allow_reset
        self._on_retry = on_retry
        self.attempts = 0
        self.last_reason = ""
        self.diverged = False  # the last run ended because a restart diverged where no reset can be sent

    async def run(self, target: Target, *, fallback_left: bool = False) -> Done | MoveOn | GiveUp:
        """Attempt ``target`` until it answers (:class:`Done`), or the plan says :class:`MoveOn`
        (only while ``fallback_left``: another target may be tried) or :class:`GiveUp`.

        ``last_reason`` is then the reason of the failure that ended the target; ``diverged`` says
        whether it was a restart that diverged from the text sent (on a transport without ``reset``).

        A ``continue`` target that refuses the prefilled request (a request error answering a
        continuation) is restarted instead, at once, without using up one of its attempts; the
        refusal is not the stream's error, so it never hides the failure that led to it.
        """
        policy = target.policy
        tries = stalls = 0
        while True:
            tries += 1
            self.attempts += 1
            self._stats.attempts = self.attempts
            continuing = self._answer.length > 0 and policy.on_partial == "continue" and not self._answer.structured
            try:
                finish_reason, usage = await self._attempt(target)
            except Diverged:
                self.diverged = True
                return GiveUp(ErrorCode.UPSTREAM_UNAVAILABLE)
            except UpstreamError as exc:
                self.last_reason = exc.reason
                decision: Retry | MoveOn | GiveUp
                if continuing and refuses_prefill(exc):
                    policy = policy.with_options(on_partial="restart")
                    target = replace(target, policy=policy)
                    tries -= 1
                    decision = Retry(0.0)
                else:
                    stalls += isinstance(exc, StallTimeout)
                    decision = plan_retry(
                        exc, tries, policy,
                        partial=self._answer.length > 0,
                        deadline_expired=self._watchdog.expired == "deadline",
                        now=self._loop.time(),
                        deadline_at=self._watchdog.deadline_at,
                        rng=self._rng,
                        fallback_left=fallback_left,
                        stalls=stalls,
                    )
                if not isinstance(decision, Retry):
                    return decision
                self.announce(exc.reason, decision.delay, policy.max_attempts)
                if decision.delay > 0:
                    await asyncio.sleep(decision.delay)
                continue
            return Done(finish_reason, usage, self.attempts)

    def announce(self, reason: str, delay: float, max_attempts: int, fallback: str | None = None) -> None:
        """Emit the ``retry`` event for the next attempt (``fallback``: it goes to that target)."""
        self._stats.retry_reasons.append(reason)
        data: dict[str, Any] = {"attempt": self.attempts + 1, "max_attempts": max_attempts, "reason": reason,
                                "delay": round(delay, 3)}
        if fallback is not None:
            data["fallback"] = fallback
        self._log.emit("retry", data)
        if self._on_retry is not None:
            self._on_retry(reason, self.attempts + 1, delay)

    def _request(self, target: Target) -> UpstreamRequest:
        policy = target.policy
        request = target.request
        messages = request.messages
        if self._answer.length and policy.on_partial == "continue" and not self._answer.structured:
            messages = [*messages, {"role": "assistant", "content": self._answer.text(), "prefix": True}]
        remaining = max(0.001, self._watchdog.deadline_at - self._loop.time())
        return UpstreamRequest(
            model=request.model,
            messages=messages,
            params=request.params,
            extra_body=request.extra_body,
            connect_timeout=min(policy.connect, remaining),
            # No socket-read timeout: the watchdog timer is the read deadline (first token, stall).
            # One would cost a timer armed and cancelled on every socket read (aiohttp's sock_read,
            # httpcore's per-read deadline); bench/ has the numbers.
            read_timeout=None,
            total_timeout=remaining + TOTAL_TIMEOUT_MARGIN,
        )

    async def _attempt(self, target: Target) -> tuple[str | None, dict[str, Any] | None]:
        """Run one attempt to its end; sends its text on. Raises UpstreamError on failure."""
        loop = self._loop
        watchdog = self._watchdog
        stats = self._stats
        request = self._request(target)
        answer = self._answer
        answer.finish_reasons.clear()  # the answering attempt's count, not an abandoned one's
        joiner = None
        if answer.length:
            mode = "continue" if target.policy.on_partial == "continue" and not answer.structured else "restart"
            joiner = Joiner(answer, mode, allow_reset=self._allow_reset)
        deliver = answer.add if joiner is None else joiner.feed
        deliver_choices = answer.add_choices if joiner is None else joiner.feed_choices

        stream = None
        try:
            async with asyncio.timeout(None) as timeout:
                watchdog.watch(timeout, first_token=target.policy.first_token, stall=target.policy.stall)
                stream = await target.upstream.open(request)
                self._log.mark_answered()
                async for item in stream:
                    now = loop.time()
                    if watchdog.got_chunk:
                        if now - watchdog.last_chunk > stats.longest_gap:
                            stats.longest_gap = now - watchdog.last_chunk
                        watchdog.last_chunk = now
                    else:
                        watchdog.first_chunk(now)
                    if type(item) is str:
                        deliver(item)
                    else:
                        deliver_choices(item)  # type: ignore[arg-type]
                if joiner is not None:
                    joiner.end()
                return stream.finish_reason, stream.usage
        except TimeoutError:
            failure = watchdog.failure()
            if failure is None:
                raise
            if isinstance(failure, StallTimeout) and stream is not None and stream.finish_reason is not None:
                # The answer had ended (its finish chunk came); only the usage chunk or the end of
                # the body is late. The answer is complete: it is not failed, nor made again.
                if joiner is not None:
                    joiner.end()
                return stream.finish_reason, stream.usage
            raise failure from None
        finally:
            watchdog.unwatch()
            if stream is not None:
                await stream.aclose()
