"""The one timer of a stream: keepalives, and the deadlines of the running attempt.

Nothing is armed per chunk. The attempt runner records ``last_chunk`` (a loop time) as chunks
arrive; the timer wakes at the earliest moment a deadline *could* have passed, re-arms itself if a
chunk came in meanwhile, and otherwise expires the attempt's ``asyncio.timeout`` (so cancellation
semantics are asyncio's own). The same wake-up emits a keepalive whenever nothing went out for
``keepalive`` seconds.

The stream's deadline and keepalive interval are fixed for the whole answer; each attempt brings
its own first-token and stall limits (its target's policy), given to :meth:`Watchdog.watch`.
"""

from __future__ import annotations

import asyncio

from chatproxy.errors import FirstTokenTimeout, StallTimeout, UpstreamTimeout
from chatproxy.stream.events import EventLog


class Watchdog:
    """Watches one stream's attempts in turn; see the module docstring.

    ``expired`` says which limit ended the last watched attempt: ``"first_token"``, ``"stall"``,
    ``"deadline"`` or None.
    """

    __slots__ = ("_first_token", "_keepalive", "_log", "_loop", "_stall", "_timeout", "_timer", "attempt_started",
                 "deadline_at", "expired", "got_chunk", "last_chunk")

    def __init__(self, loop: asyncio.AbstractEventLoop, log: EventLog, *, keepalive: float, deadline_at: float) -> None:
        self._loop = loop
        self._log = log
        self._keepalive = keepalive
        self.deadline_at = deadline_at
        self._timer: asyncio.TimerHandle | None = None
        self._timeout: asyncio.Timeout | None = None
        self._first_token = self._stall = 0.0
        self.attempt_started = self.last_chunk = 0.0
        self.got_chunk = False
        self.expired: str | None = None

    def start(self) -> None:
        """Arm the first keepalive wake-up (from the log's last emit)."""
        self._arm(self._log.last_emit + self._keepalive)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def watch(self, timeout: asyncio.Timeout, *, first_token: float, stall: float) -> None:
        """Watch a new attempt, starting now, whose body runs inside ``timeout`` (``asyncio.timeout(None)``)."""
        self.attempt_started = self.last_chunk = self._loop.time()
        self.got_chunk = False
        self.expired = None
        self._first_token = first_token
        self._stall = stall
        self._timeout = timeout
        self._check()  # arms the deadline check for this attempt

    def first_chunk(self, now: float) -> None:
        """The attempt's first chunk came at ``now``: from here on, the (usually shorter) stall limit applies."""
        self.got_chunk = True
        self.last_chunk = now
        self._check()

    def unwatch(self) -> None:
        self._timeout = None

    def failure(self) -> UpstreamTimeout | None:
        """The error that describes why the attempt's timeout expired (None if it did not)."""
        if self.expired == "stall":
            return StallTimeout(f"no chunk for {self._stall}s")
        if self.expired == "first_token":
            return FirstTokenTimeout(f"no first chunk within {self._first_token}s")
        if self.expired == "deadline":
            return UpstreamTimeout("deadline")
        return None

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        """Wake-up for keepalives and deadlines; re-arms itself for the next possible moment."""
        self._timer = None
        log = self._log
        if log.finished:
            return
        now = self._loop.time()
        # Compared as the timer was armed (last_emit + keepalive), so a wake-up at that very instant counts.
        if now >= log.last_emit + self._keepalive:
            log.keepalive()
        next_wake = log.last_emit + self._keepalive

        timeout = self._timeout
        if timeout is not None and self.expired is None:
            if self.got_chunk:
                due, reason = self.last_chunk + self._stall, "stall"
            else:
                due, reason = self.attempt_started + self._first_token, "first_token"
            if self.deadline_at <= due:
                due, reason = self.deadline_at, "deadline"
            if now >= due:
                self.expired = reason
                timeout.reschedule(now)  # expires the attempt's asyncio.timeout right away
            else:
                next_wake = min(next_wake, due)
        self._arm(next_wake)
