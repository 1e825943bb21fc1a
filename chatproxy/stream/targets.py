"""Fallbacks: one answer tried on several targets in turn, with a circuit breaker in front of each.

:func:`answer` plays the targets in order on one :class:`~chatproxy.stream.attempts.AttemptRunner`,
so everything that spans the whole answer carries over from one target to the next: the stream's
deadline and keepalives, the text already sent (the next target's first attempt joins onto it as a
retry on the same target would, by its own ``ON_PARTIAL``), the attempt count. Each target's
attempts follow its own policy; the retry plan (:mod:`~chatproxy.stream.retry`) says when a target
is given up for the next one (:class:`~chatproxy.stream.retry.MoveOn`). The ``retry`` event that
announces the first attempt on the next target names it in its ``fallback`` field.

A :class:`Breaker` (optional) keeps one circuit per target (``Target.key``). Before a target's
first attempt it is asked once whether the target may be tried; after the target answered or was
given up it is told so, once. Nothing is asked per attempt or per chunk. A target whose circuit is
open is skipped, unless it is the last one left: failing without trying helps no user, and the
last target's own retries are then the only chance of an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chatproxy.codes import ErrorCode
from chatproxy.stream.attempts import AttemptRunner, Done
from chatproxy.stream.retry import GiveUp, MoveOn
from chatproxy.stream.values import StreamStats, Target

#: The final codes that say the target itself failed (they count against its circuit).
UNHEALTHY = frozenset({ErrorCode.UPSTREAM_TIMEOUT, ErrorCode.UPSTREAM_UNAVAILABLE, ErrorCode.RATE_LIMITED})


@dataclass(frozen=True, slots=True)
class Admission:
    """What a breaker said about a target when it was chosen. ``allowed``: its circuit is closed,
    or this request is the ``probe`` let through to test an open circuit after its cooldown;
    ``failures``: the failed answers in a row it had seen."""

    allowed: bool = True
    failures: int = 0
    probe: bool = False


class Breaker(Protocol):
    """Circuits per target key (``"upstream:model"``), shared by every stream that uses them."""

    async def admit(self, key: str) -> Admission:
        """Whether ``key`` may be tried now (``allowed`` False: its circuit is open). Never raises."""
        ...

    async def report(self, key: str, admission: Admission, ok: bool) -> bool:
        """The answer tried after ``admission`` succeeded (``ok``) or failed; True when this failure
        opened the circuit. Never raises."""
        ...


async def answer(
    runner: AttemptRunner,
    targets: Sequence[Target],
    stats: StreamStats,
    *,
    breaker: Breaker | None = None,
    first: Callable[[Target], Any] | None = None,
) -> Done | GiveUp:
    """Play ``targets`` in order until one answers; see the module docstring.

    ``first(target)`` is called once, before the first attempt, with the first target tried (the
    stream announces it). ``stats`` gets the answering (or last tried) target's model and key, the
    keys of the targets given up, and those of the circuits this answer opened.
    """
    moved: MoveOn | None = None
    last = len(targets) - 1
    for index, target in enumerate(targets):
        admission = Admission()
        if breaker is not None:
            admission = await breaker.admit(target.key)
            if not admission.allowed and index < last:
                continue
        stats.model, stats.target = target.request.model, target.key
        if moved is None:
            if first is not None:
                first(target)
        else:
            runner.announce(runner.last_reason, 0.0, target.policy.max_attempts, fallback=target.label)
        outcome = await runner.run(target, fallback_left=index < last)
        if isinstance(outcome, Done):
            if breaker is not None:
                await breaker.report(target.key, admission, True)
            return outcome
        # A restart that answered differently is no failure of the target (only the transport cannot show it).
        unhealthy = outcome.unhealthy if isinstance(outcome, MoveOn) else (
            outcome.code in UNHEALTHY and not runner.diverged)
        if breaker is not None and unhealthy and await breaker.report(target.key, admission, False):
            stats.circuits_opened.append(target.key)
        if isinstance(outcome, GiveUp):
            return outcome
        stats.abandoned.append(target.key)
        moved = outcome
    # Only reached if the last target was given up with MoveOn, which the plan never returns for it.
    return GiveUp(moved.code if moved is not None else ErrorCode.INTERNAL)
