"""Circuit breakers per target (``"upstream:model"``), shared by every worker through Django's cache.

Settings (``CHATPROXY["CIRCUIT"]``)::

    "CIRCUIT": {"FAILURES": 3, "COOLDOWN": 30.0}

After ``FAILURES`` failed answers in a row from one target (its attempts used up, a Retry-After too
long, a stall or a hang it was given up for), its circuit *opens*: for ``COOLDOWN`` seconds streams
skip it and go straight to their next target. Then one request is let through as a *probe*: if it is
answered the circuit closes, if it fails the circuit opens for another ``COOLDOWN``. Any answer from
the target closes the circuit and resets the count. Only models with fallbacks use circuits: with
nowhere else to go, a stream always tries its target.

State. One cache entry per target, ``(failures, open_until)`` (``open_until`` a wall-clock time,
comparable across workers), in the ``RESUME.CACHE`` cache (the one chatproxy already requires to be
shared: Redis in production); and, while a probe runs, a second entry taken with ``cache.add`` so
that only one worker probes. That entry lapses after ``probe_lease`` seconds (``COOLDOWN``) even
if the probe never reports (its client left, its worker died): then the next request probes, so
a lost probe keeps a target skipped for one more cooldown at most. An entry no failure touched
for :data:`FORGET_AFTER` seconds lapses: old failures are not "in a row" any more.

Cost. Choosing a target reads its entry (one cache call; a second, the ``add``, only when a cooldown
has just ended); the end of its answer writes it only when there is something to change: a failure,
or the first success after failures. A healthy target costs one read per stream and no write;
nothing happens per attempt or per chunk. With a per-process cache (``LocMemCache``) each worker
keeps its own circuits. Concurrent failures reported by several workers at the same instant may be
counted once (read, then write): the circuit then opens a failure or two later, never wrongly.
A cache error is logged and lets the target be tried (a breaker must never be the outage).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from functools import cache
from typing import Any

from chatproxy import cachecalls
from chatproxy.stream.targets import Admission

logger = logging.getLogger("chatproxy.circuit")

PREFIX = "chatproxy:circuit:"
#: Seconds (at least twice ``COOLDOWN``) after which a target's failure count lapses.
FORGET_AFTER = 3600.0
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:/@+-]{1,150}")


def cache_key(key: str) -> str:
    """The cache key of a target's circuit; hashed when the name is not safe in every backend's keys."""
    if _PLAIN_KEY.fullmatch(key):
        return PREFIX + key
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


class CacheBreaker:
    """The :class:`~chatproxy.stream.targets.Breaker` kept in a Django cache; see the module docstring.

    ``clock`` gives wall-clock seconds (``time.time``: every worker agrees on it).
    """

    def __init__(self, cache: Any, *, failures: int, cooldown: float, probe_lease: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.failures = failures
        self.cooldown = cooldown
        self.probe_lease = probe_lease
        self.clock = clock
        self._ttl = max(FORGET_AFTER, 2 * cooldown + probe_lease)

    async def admit(self, key: str) -> Admission:
        try:
            return await cachecalls.run(self.cache, self._admit, cache_key(key))
        except Exception:
            logger.warning("could not read the circuit of %s; trying it", key, exc_info=True)
            return Admission()

    async def report(self, key: str, admission: Admission, ok: bool) -> bool:
        if ok and not admission.failures and not admission.probe:
            return False  # healthy and known to be: nothing to write
        try:
            return await cachecalls.run(self.cache, self._report, key, cache_key(key), admission, ok)
        except Exception:
            logger.warning("could not update the circuit of %s", key, exc_info=True)
            return False

    def _admit(self, entry: str) -> Admission:
        state = self.cache.get(entry)
        if not (isinstance(state, tuple) and len(state) == 2):
            return Admission()
        failures, open_until = int(state[0]), float(state[1])
        if failures < self.failures:
            return Admission(failures=failures)
        if self.clock() < open_until:
            return Admission(allowed=False, failures=failures)
        if self.cache.add(entry + ":probe", 1, self.probe_lease):
            return Admission(failures=failures, probe=True)
        return Admission(allowed=False, failures=failures)  # another request is probing it

    def _report(self, key: str, entry: str, admission: Admission, ok: bool) -> bool:
        if ok:
            self.cache.delete_many([entry, entry + ":probe"])
            if admission.failures >= self.failures:
                logger.info("circuit of %s closed: it answered", key)
            return False
        failures = admission.failures + 1
        if admission.probe or failures == self.failures:
            self.cache.set(entry, (failures, self.clock() + self.cooldown), self._ttl)
            if admission.probe:
                self.cache.delete(entry + ":probe")
            logger.warning("circuit of %s opened after %d failed answers in a row: skipped for %g s",
                           key, failures, self.cooldown)
            return True
        if failures < self.failures:
            self.cache.set(entry, (failures, 0.0), self._ttl)
        return False  # past the threshold (tried as the last target left): it stays open as it was


@cache
def get_breaker() -> CacheBreaker:
    """The breaker ``CHATPROXY["CIRCUIT"]`` configures, on the ``RESUME.CACHE`` cache (cached per process)."""
    from chatproxy import cachecalls
    from chatproxy.conf import circuit_settings, get_config

    failures, cooldown = circuit_settings()
    return CacheBreaker(cachecalls.cache(get_config()["RESUME"]["CACHE"]), failures=failures, cooldown=cooldown,
                        probe_lease=cooldown)


def forget(**kwargs: Any) -> None:
    """Drop the cached breaker (``setting_changed`` receiver)."""
    if kwargs.get("setting") in (None, "CHATPROXY", "CACHES"):
        get_breaker.cache_clear()
