"""Per-user limits, enforced across workers through the Django cache (``LIMITS``).

Two limits apply when a stream starts (every way in: SSE, OpenAI-compatible, WebSocket ``chat``);
resuming a stream starts nothing and is not limited:

* ``LIMITS["MAX_STREAMS_PER_USER"]``: streams running at once, counted in a few time-window
  counters (below) at a constant number of cache operations per stream, whatever the limit. Over
  it: 429 with ``Retry-After: BUSY_RETRY_AFTER``.
* ``LIMITS["REQUESTS_PER_MINUTE"]`` (``None``: off): streams started per calendar minute, a
  fixed-window counter ``chatproxy:rpm:<who>:<minute>`` (``cache.add`` then ``cache.incr``). Over
  it: 429 with ``Retry-After`` = the seconds left in the minute.

Counting running streams
------------------------
A stream holds a *lease*: a count of one in a window counter, taken when it starts and given back
(``cache.decr``) when it ends. A worker that crashed never gives it back, so a lease must lapse on
its own once the stream cannot be running any more: ``ttl`` seconds after it started (its
``DEADLINE`` plus ``RESUME.GRACE`` plus :data:`SLOT_MARGIN`). Leases of different lengths are
sorted into *classes*: a lease of ``ttl`` seconds belongs to the class of length ``L``, the
smallest power of two at least ``ttl`` (from ``2**MIN_CLASS`` to ``2**MAX_CLASS`` seconds; a
longer ``ttl`` is counted in the largest class, so it lapses after ``2**MAX_CLASS`` seconds at the
latest). Time is cut into windows of ``L`` seconds, numbered ``floor(now / L)``; the counter
``chatproxy:run:<who>:<log2 L>:<window>`` holds the leases of that class taken in that window.

Admission of a stream of ``who`` (:func:`admit`), at time ``now`` in window ``c`` of its class:

1. ``cache.add(key, 0)`` then ``cache.incr(key)`` on its class's window ``c`` (atomic on every
   Django backend that shares data between processes: Redis ``INCRBY``, Memcached ``incr``; and
   under LocMemCache's lock);
2. one ``cache.get_many`` of the *live* windows: ``c - 1`` and ``c`` of every class;
3. if their sum exceeds the limit, ``cache.decr`` its own window again and refuse.

Why windows ``c - 1`` and ``c``: a lease of class ``L`` taken at ``t`` in window ``j`` ends before
``t + L < (j + 2) * L``, so at ``now >= c * L`` it can still run only if ``j >= c - 1``; an older
window is never read again, which is how a crashed worker's leases lapse (after ``L`` to ``2 * L``
seconds, i.e. within ``4 * ttl``; each counter also expires from the cache then, so it is only
garbage collection). Why the limit holds across workers: if more than ``MAX`` leases were held at
once, take the one whose ``incr`` came last; every other one was counted before it read the
windows, and none had been given back (all are held), so it read more than ``MAX`` and refused
itself. Two admissions racing for the last lease may both refuse: a spurious 429 the client
retries after ``Retry-After``, never one lease too many. Admission costs three cache calls
(``add``, ``incr``, ``get_many`` of ``2 * (MAX_CLASS - MIN_CLASS + 1)`` keys) in one thread hop,
and ending one ``decr``, whatever ``MAX_STREAMS_PER_USER`` is.

While the cache is unreachable (Redis down) nothing can be counted. ``LIMITS["WHEN_CACHE_DOWN"]``
says what a new stream gets then: ``"allow"`` (the default) starts it without a lease, so the
limits are off for the outage's length (one warning per outage, :mod:`chatproxy.outage`), and
``"refuse"`` answers 503 (:class:`LimitsUnavailable`). The default keeps the chat available: the
limits are a fairness guard, the upstream enforces its own rate limits, and an outage is short.
A lease whose release fails (the outage began while its stream ran) lapses on its own, as a
crashed worker's does.

A counter the cache evicted (a cache too small for its load) loses its leases: that user may run
more streams until the window is no longer read. ``DummyCache`` stores nothing, so it enforces
nothing.

The cache is ``RESUME.CACHE`` (``"default"`` by default): the one chatproxy already requires to
be shared by every worker (Redis in production). A per-process cache (``LocMemCache``) enforces
the limits per process only.

Who ``who`` is (:func:`identity`): always the identity string a limit counts against. A
signed-in user (session or API key) is ``u:<pk>``, so a user's keys and browser sessions share
one budget. An anonymous visitor (only possible with a ``PERMISSION`` such as ``allow_any``) is
``ip:<client address>``: the session key is not used because a client chooses its own cookie and
could mint a fresh budget per request. Behind a reverse proxy the client address is the proxy's
unless the ASGI server is told to trust it (``daphne --proxy-headers``, ``uvicorn
--proxy-headers --forwarded-allow-ips``); otherwise every anonymous visitor shares one budget.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from chatproxy import cachecalls, outage
from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config

#: Seconds a lease outlives its stream's deadline (and grace) before it may lapse on its own.
SLOT_MARGIN = 30.0
#: ``Retry-After`` (seconds) when the concurrency limit is reached: streams usually end within seconds.
BUSY_RETRY_AFTER = 5
#: ``Retry-After`` (seconds) of the 503 answered while the cache is down and ``WHEN_CACHE_DOWN`` is "refuse".
CACHE_DOWN_RETRY_AFTER = 5
#: The choices of ``LIMITS["WHEN_CACHE_DOWN"]``.
WHEN_CACHE_DOWN_CHOICES = ("allow", "refuse")
#: Lease classes are ``2**MIN_CLASS`` .. ``2**MAX_CLASS`` seconds long (32 s .. about 24 days).
MIN_CLASS = 5
MAX_CLASS = 21


class LimitExceeded(Exception):
    """A limit refused a new stream: answer 429 with ``Retry-After: retry_after`` (whole seconds)."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class LimitsUnavailable(LimitExceeded):
    """The limits could not be checked (the cache is unreachable) and ``WHEN_CACHE_DOWN`` is "refuse": 503."""

    code = ErrorCode.UNAVAILABLE


def ws_frames_per_second() -> int | None:
    """``LIMITS["WS_FRAMES_PER_SECOND"]``: frames one WebSocket may send per second (None: no cap)."""
    value = get_config()["LIMITS"].get("WS_FRAMES_PER_SECOND")
    return None if value is None else int(value)


def identity(user: Any, client_address: str | None) -> str:
    """Who a limit counts against: ``u:<pk>`` for a signed-in user, else ``ip:<address>``."""
    if user is not None and getattr(user, "is_authenticated", False):
        return f"u:{user.pk}"
    return f"ip:{client_address or 'unknown'}"


def identity_of(request_or_scope: Any) -> str:
    """:func:`identity` for a Django ``HttpRequest`` or a Channels ``scope`` (user already loaded)."""
    if isinstance(request_or_scope, dict):
        client = request_or_scope.get("client") or (None,)
        return identity(request_or_scope.get("user"), client[0])
    return identity(getattr(request_or_scope, "user", None), request_or_scope.META.get("REMOTE_ADDR"))


def _cache() -> Any:
    return cachecalls.cache(get_config()["RESUME"]["CACHE"])


def _outage() -> outage.Outage:
    return outage.of_cache(get_config()["RESUME"]["CACHE"])


def lease_class(ttl: float) -> int:
    """``log2`` of the length of the class a lease of ``ttl`` seconds is counted in."""
    wanted = max(1, math.ceil(ttl))
    return min(MAX_CLASS, max(MIN_CLASS, (wanted - 1).bit_length()))


def _window_key(who: str, klass: int, window: int) -> str:
    return f"chatproxy:run:{who}:{klass}:{window}"


def _live_keys(who: str, now: float) -> list[str]:
    """The counters that may hold a lease still running at ``now``: two windows per class."""
    keys: list[str] = []
    for klass in range(MIN_CLASS, MAX_CLASS + 1):
        window = int(now // (1 << klass))
        keys += (_window_key(who, klass, window - 1), _window_key(who, klass, window))
    return keys


def running(who: str) -> int:
    """How many leases ``who`` holds now, as an admission would count them (blocking cache call)."""
    counts = _cache().get_many(_live_keys(who, time.time()))
    return sum(max(0, value) for value in counts.values() if isinstance(value, int))


@dataclass(eq=False)
class Slot:
    """One running stream's lease on ``MAX_STREAMS_PER_USER``; :meth:`release` when it ends."""

    key: str | None  # the window counter holding the lease; None: no lease is held

    def release_now(self) -> None:
        """Give the lease back (a blocking cache call); a second call does nothing."""
        key, self.key = self.key, None
        if key is not None:
            try:
                _cache().decr(key)
            except ValueError:  # the counter lapsed or was evicted: nothing left to give back
                pass
            except Exception as exc:  # the cache is unreachable: the lease lapses on its own
                _outage().failed(exc)

    def release(self) -> None:
        """:meth:`release_now` off the event loop (from a stream's ``on_finish``). Never raises."""
        if self.key is None:
            return
        if cachecalls.in_process(_cache()):
            self.release_now()
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, self.release_now)
        except RuntimeError:  # no running loop: just do it
            self.release_now()


def _count_request(who: str, per_minute: int) -> None:
    cache = _cache()
    now = time.time()
    key = f"chatproxy:rpm:{who}:{int(now // 60)}"
    cache.add(key, 0, 120)
    try:
        count = cache.incr(key)
    except ValueError:  # evicted between add and incr (or DummyCache): start again
        cache.set(key, 1, 120)
        count = 1
    if count > per_minute:
        retry_after = max(1, math.ceil(60 - now % 60))
        raise LimitExceeded(
            f"Too many requests: at most {per_minute} per minute. Try again in {retry_after} s.", retry_after
        )


def _take_lease(who: str, max_streams: int, ttl: float) -> Slot:
    cache = _cache()
    now = time.time()
    klass = lease_class(ttl)
    length = 1 << klass
    window = int(now // length)
    key = _window_key(who, klass, window)
    cache.add(key, 0, math.ceil((window + 2) * length - now) + 1)  # kept while it is read (see above)
    try:
        cache.incr(key)
    except ValueError:  # DummyCache (or evicted at once): nothing can be counted
        return Slot(None)
    lease = Slot(key)
    counts = cache.get_many(_live_keys(who, now))
    if sum(max(0, value) for value in counts.values() if isinstance(value, int)) > max_streams:
        lease.release_now()
        raise LimitExceeded(
            f"Too many answers at once: at most {max_streams} may run at the same time. "
            "Wait for one to finish, or stop one.",
            BUSY_RETRY_AFTER,
        )
    return lease


def admit(who: str, ttl: float) -> Slot:
    """Apply both limits to a new stream of ``who`` (blocking cache calls); raises LimitExceeded.

    ``ttl``: seconds after which the lease may lapse if it was never released (the stream's
    longest possible life plus a margin).
    """
    limits = get_config()["LIMITS"]
    try:
        _outage().check()  # while the cache is down: no call that may hang for its socket timeout
        per_minute = limits.get("REQUESTS_PER_MINUTE")
        if per_minute is not None:
            _count_request(who, int(per_minute))
        max_streams = limits.get("MAX_STREAMS_PER_USER")
        slot = Slot(None) if max_streams is None else _take_lease(who, int(max_streams), ttl)
    except LimitExceeded:
        _outage().ok()
        raise
    except Exception as exc:  # the cache is unreachable (a LimitExceeded is not caught here)
        _outage().failed(exc)
        if limits.get("WHEN_CACHE_DOWN") == "refuse":
            raise LimitsUnavailable(
                "Usage limits cannot be checked right now, so no new answer can start. "
                f"Try again in {CACHE_DOWN_RETRY_AFTER} s.", CACHE_DOWN_RETRY_AFTER,
            ) from exc
        return Slot(None)  # "allow": served without a lease (see the module docstring)
    _outage().ok()
    return slot


async def aadmit(who: str, ttl: float) -> Slot:
    """:func:`admit` from the event loop: no cache call when no limit is set, else all of them in
    one thread hop (none for an in-process cache)."""
    limits = get_config()["LIMITS"]
    if limits.get("REQUESTS_PER_MINUTE") is None and limits.get("MAX_STREAMS_PER_USER") is None:
        return Slot(None)
    return await cachecalls.run(_cache(), admit, who, ttl)
