"""Per-user limits, enforced across workers through the Django cache (SPEC 5 ``LIMITS``, 10).

Two limits apply when a stream starts (every way in: SSE, OpenAI-compatible, WebSocket ``chat``);
resuming a stream starts nothing and is not limited:

* ``LIMITS["MAX_STREAMS_PER_USER"]``: streams running at once. A user holds one *slot* per
  running stream. Slot ``i`` of user ``W`` is the cache key ``chatproxy:slot:W:i``
  (``0 <= i < MAX``), taken with an atomic ``cache.add`` and deleted when the stream ends (its
  ``on_finish``). Each slot expires on its own after the stream's ``DEADLINE`` plus
  ``RESUME.GRACE`` plus :data:`SLOT_MARGIN`, so a worker that crashed mid-stream does not hold
  slots for ever. No slot free: 429 with ``Retry-After: BUSY_RETRY_AFTER``.
* ``LIMITS["REQUESTS_PER_MINUTE"]`` (``None``: off): streams started per calendar minute, a
  fixed-window counter ``chatproxy:rpm:W:<minute>`` (``cache.add`` then ``cache.incr``). Over
  it: 429 with ``Retry-After`` = the seconds left in the minute.

The cache is ``RESUME.CACHE`` (``"default"`` by default): the one chatproxy already requires to
be shared by every worker (Redis in production). A per-process cache (``LocMemCache``) enforces
the limits per process only; ``DummyCache`` does not enforce them.

Who ``W`` is (:func:`identity`): a signed-in user (session or API key) is ``u:<pk>``, so a user's
keys and browser sessions share one budget. An anonymous visitor (only possible with a
``PERMISSION`` such as ``allow_any``) is ``ip:<client address>``: the session key is not used
because a client chooses its own cookie and could mint a fresh budget per request. Behind a
reverse proxy the client address is the proxy's unless the ASGI server is told to trust it
(``daphne --proxy-headers``, ``uvicorn --proxy-headers --forwarded-allow-ips``); otherwise every
anonymous visitor shares one budget.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.core.cache import caches

from chatproxy import cachecalls
from chatproxy.conf import get_config

#: Seconds a slot outlives its stream's deadline (and grace) before it lapses on its own.
SLOT_MARGIN = 30.0
#: ``Retry-After`` (seconds) when every slot is taken: streams usually end within seconds.
BUSY_RETRY_AFTER = 5


class LimitExceeded(Exception):
    """A limit refused a new stream: answer 429 with ``Retry-After: retry_after`` (whole seconds)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


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
    return caches[get_config()["RESUME"]["CACHE"]]


def slot_key(who: str, index: int) -> str:
    return f"chatproxy:slot:{who}:{index}"


@dataclass(eq=False)
class Slot:
    """One running stream's claim on ``MAX_STREAMS_PER_USER``; :meth:`release` when it ends."""

    key: str | None  # None: no concurrency limit was taken
    token: str = ""

    def release_now(self) -> None:
        """Free the slot (blocking cache calls): only if it is still ours, not a successor's."""
        if self.key is None:
            return
        cache = _cache()
        if cache.get(self.key) == self.token:
            cache.delete(self.key)
        self.key = None

    def release(self) -> None:
        """Free the slot off the event loop (from a stream's ``on_finish``). Never raises."""
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


def _take_slot(who: str, max_streams: int, ttl: float) -> Slot:
    cache = _cache()
    keys = [slot_key(who, index) for index in range(max_streams)]
    taken = cache.get_many(keys)
    token = uuid.uuid4().hex
    timeout = max(1, math.ceil(ttl))
    for key in keys:
        if key not in taken and cache.add(key, token, timeout):
            return Slot(key, token)
    raise LimitExceeded(
        f"Too many answers at once: at most {max_streams} may run at the same time. "
        "Wait for one to finish, or stop one.",
        BUSY_RETRY_AFTER,
    )


def admit_now(who: str, ttl: float) -> Slot:
    """Apply both limits for a new stream of ``who`` (blocking cache calls); raises LimitExceeded.

    ``ttl``: seconds after which the slot lapses if it was never released (the stream's longest
    possible life plus a margin).
    """
    limits = get_config()["LIMITS"]
    per_minute = limits.get("REQUESTS_PER_MINUTE")
    if per_minute is not None:
        _count_request(who, int(per_minute))
    max_streams = limits.get("MAX_STREAMS_PER_USER")
    if max_streams is None:
        return Slot(None)
    return _take_slot(who, int(max_streams), ttl)


async def admit(who: str, ttl: float) -> Slot:
    """:func:`admit_now` from the event loop: no cache call when no limit is set, else all of them
    in one thread hop (none for an in-process cache)."""
    limits = get_config()["LIMITS"]
    if limits.get("REQUESTS_PER_MINUTE") is None and limits.get("MAX_STREAMS_PER_USER") is None:
        return Slot(None)
    return await cachecalls.run(_cache(), admit_now, who, ttl)
