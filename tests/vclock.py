"""A virtual clock for asyncio tests: time only moves when nothing is ready to run.

:class:`VirtualClockLoop` is a selector event loop whose ``time()`` is a counter. When the loop
would block waiting for its next timer, it jumps straight to that timer's time instead, so
``asyncio.sleep(30)`` returns at once in wall time while ``loop.time()`` says 30 s passed, and every
deadline fires exactly when it is due. Real I/O is still polled (without blocking) on every turn;
the loop only blocks for real when it has no timer at all (for example while waiting on a thread).

Tests that await work done in other threads or sockets must not use it: virtual time would run
ahead while they wait. Decorate an async test with :func:`on_virtual_clock`.
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

START = 1000.0  # far from 0, so nothing mistakes the first instant for "never"
# Loop turns at one virtual instant before the clock calls it a livelock (a timer re-arming itself
# for the instant it fires at would otherwise spin forever, as time never moves on by itself).
STUCK_TURNS = 200_000


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls real I/O without blocking; when nothing is ready, moves the loop's clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualClockLoop | None = None
        self.turns = 0  # loop turns since the clock last moved

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer at all: only real I/O (a thread, a signal) can wake the loop
            return super().select(None)
        ready = super().select(0)
        if ready or timeout <= 0:
            self.turns += 1
            if self.turns > STUCK_TURNS:
                raise RuntimeError(f"virtual time stuck: {STUCK_TURNS} loop turns without the clock moving")
            return ready
        assert self.loop is not None
        self.loop.jump(timeout)
        self.turns = 0
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time; see the module docstring."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        self._now = START
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._now

    def jump(self, timeout: float) -> None:
        """Advance to the earliest timer (exactly its time), or by ``timeout`` if that is sooner."""
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        when = scheduled[0].when() if scheduled else self._now + timeout
        self._now = when if when - self._now <= timeout else self._now + timeout


def on_virtual_clock(test: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Runs the async ``test`` to completion on a fresh :class:`VirtualClockLoop`.

    The result is a plain function, so pytest-asyncio leaves it alone whatever its mode.
    """

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
            return runner.run(test(*args, **kwargs))

    return run
