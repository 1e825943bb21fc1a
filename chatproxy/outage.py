"""What chatproxy logs while a shared dependency (the cache, the database) is unreachable.

A worker calls the cache many times a second (limit admissions, the resume journal, profile
version checks). Logging each failed call would bury everything else during an outage, so each
dependency has one :class:`Outage`: its first failure logs one warning (what is unreachable, why,
and what chatproxy does meanwhile), later failures are only counted, and the first success after
them logs one line saying how long it lasted and how many calls failed. Nothing here runs per
chunk; :meth:`Outage.ok` on the success path is one attribute read.

A dependency that hangs rather than refuses costs each call its socket timeout. So while one is
down, callers on a request's path ask :meth:`Outage.check` first: within :data:`SKIP_FOR` seconds
of the last real failure it raises :class:`StillDown` at once instead of letting them wait; one
call per interval (or the resume journal's retries) still tries, and finds out when it is back.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("chatproxy.outage")

#: Seconds after a dependency's last real failure during which :meth:`Outage.check` skips calls.
SKIP_FOR = 1.0


class StillDown(Exception):
    """Raised by :meth:`Outage.check` instead of a call that would most likely fail (or hang)."""

#: What chatproxy does while ``RESUME.CACHE`` is unreachable (part of the outage's warning).
CACHE_CONSEQUENCES = (
    "new streams are still served (LIMITS.WHEN_CACHE_DOWN says whether without the per-user limits), "
    "resuming answers 503, and stream events are kept in memory and written once it is back"
)


class Outage:
    """The health of one dependency as the log tells it: one line when it fails, one when it is back.

    Thread-safe: cache calls fail in worker threads as well as on the event loop.
    """

    def __init__(self, what: str, consequences: str, counted: str = "failed calls") -> None:
        self.what = what
        self.consequences = consequences
        self.counted = counted  # what ``failures`` counts, for the recovery line
        self.since: float | None = None  # time.monotonic() of the first failure, while failing
        self.last_failure = 0.0  # time.monotonic() of the last real (not skipped) failure
        self.failures = 0  # failed calls in the current (or last) outage
        self.outages = 0  # outages seen by this process
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, count: int = 1) -> None:
        """A call failed with ``exc`` (``count``: what it cost, in the unit ``counted`` names): the first
        failure of an outage logs a warning, the rest only count."""
        with self._lock:
            if not isinstance(exc, StillDown):
                self.last_failure = time.monotonic()
            self.failures = self.failures + count if self.since is not None else count
            if self.since is not None:
                return
            self.since = time.monotonic()
            self.outages += 1
        logger.warning("%s is unreachable (%s: %s): %s until it is back", self.what, type(exc).__name__,
                       str(exc)[:200], self.consequences)

    def check(self) -> None:
        """Raise :class:`StillDown` if the dependency failed less than :data:`SKIP_FOR` seconds ago."""
        if self.since is not None and time.monotonic() - self.last_failure < SKIP_FOR:
            raise StillDown(f"{self.what} failed less than {SKIP_FOR:g} s ago")

    def ok(self) -> None:
        """A call succeeded: ends the outage, if there was one, with one log line."""
        if self.since is None:
            return
        with self._lock:
            since, self.since = self.since, None
            failures = self.failures
        if since is not None:
            logger.warning("%s is reachable again after %.1f s (%d %s meanwhile)", self.what,
                           time.monotonic() - since, failures, self.counted)


_outages: dict[str, Outage] = {}
_outages_lock = threading.Lock()


def of_cache(alias: str) -> Outage:
    """The one :class:`Outage` of Django cache ``alias`` in this process."""
    found = _outages.get(alias)
    if found is None:
        with _outages_lock:
            found = _outages.setdefault(alias, Outage(f"chatproxy's cache {alias!r}", CACHE_CONSEQUENCES))
    return found
