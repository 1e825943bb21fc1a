"""Admin timeout profiles as seen by the request path: which one applies, cheaply.

Which profile applies
---------------------
Among the *enabled* :class:`~chatproxy.models.TimeoutProfile` rows whose ``model_pattern`` glob
matches the model name (``fnmatch`` syntax, case-sensitive: ``*``, ``?``, ``[abc]``, ``[!abc]``),
the most specific wins. Specificity, compared in this order:

1. any profile beats ``default`` (which matches every model);
2. more literal characters beat fewer (``gpt-4o-mini`` > ``gpt-4o*`` > ``gpt-*`` > ``*``);
3. fewer wildcards beat more (``o1-mini`` > ``o1-mini*``; ``o1-?ini`` > ``o1-*ini*``);
4. a tie is broken by the profile name, alphabetically, so the choice is always the same.

A matching profile supplies every timeout; per-request options still win over it, and
``CHATPROXY["TIMEOUTS"]`` over the built-in defaults only applies when no profile can be loaded
(before ``migrate``, or while the database is unreachable). The ``default`` profile is seeded
from ``CHATPROXY["TIMEOUTS"]`` by a data migration, so after ``migrate`` timeouts are tuned in
the admin, not in settings.

How a change reaches every worker without a query per request
--------------------------------------------------------------
Each process keeps a snapshot of the enabled profiles (as ready-made :class:`~chatproxy.policy.Policy`
values, with a per-model memo) tagged with a *version*: a random token stored under
:data:`VERSION_KEY` in Django's ``default`` cache, without expiry. Saving or deleting a profile
writes a new token once the transaction commits (and forgets the local snapshot at once).

Before a stream is opened, :func:`arefresh` looks at two things, at most once every
:data:`CHECK_INTERVAL` seconds per process (one cache read):

* the cached token: when it differs from the snapshot's, the profiles are reloaded. With a cache
  shared by all workers (Redis, Memcached, the file or database cache) a saved change so applies
  to the next request in every process within ``CHECK_INTERVAL`` (at once in the process that
  saved it);
* the snapshot's age: once it is ``CHATPROXY["PROFILES"]["REFRESH"]`` seconds old (default 5), the
  profiles are read again whatever the token says, and the snapshot is rebuilt only if a row
  differs. That read is the guarantee: whatever the cache (a per-process ``LocMemCache``, a
  ``DummyCache``, an evicted token) and however the rows changed (another process, the shell,
  ``queryset.update()``, raw SQL, a delete), every worker applies the change within ``REFRESH``
  seconds. It costs one query per ``REFRESH`` seconds per process, reading the profiles table,
  which holds one row per tuned model family; a failed load is retried after the same interval.

While the database is unreachable (or SQLite is locked) a failed load keeps the profiles of the
last snapshot that loaded (logged once, and once more when a load works again), so streams keep
the timeouts they had; only a process that never loaded any uses ``CHATPROXY["TIMEOUTS"]``. And a
stream never waits long for a check: requests wait at most :data:`CHECK_PATIENCE` seconds after a
check began for its result, then use the snapshot there is (a normal check takes milliseconds).

Nothing here runs per chunk, and a request costs no query: a lookup between two checks is a dict
read. System check ``chatproxy.W003`` says when only the ``REFRESH`` read can carry changes
between workers (a per-process cache), and ``chatproxy.E012`` when ``REFRESH`` is invalid.

Sync callers (the shell, management commands, sync views) get the same check from
:func:`policy_for`; in a running event loop :func:`policy_for` never touches the database (Django
forbids it there) and uses the snapshot :func:`arefresh` prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from chatproxy.conf import profiles_refresh, settings_policy
from chatproxy.policy import PROFILE_FIELDS as TIMEOUT_FIELDS
from chatproxy.policy import Policy, by_label, from_profile

logger = logging.getLogger("chatproxy.profiles")

DEFAULT_NAME = "default"
DEFAULT_PATTERN = "*"
#: The Django cache alias holding the version token.
CACHE_ALIAS = "default"
#: Cache key of the version token.
VERSION_KEY = "chatproxy:profiles:version"
#: Seconds between two version checks in one process.
CHECK_INTERVAL = 0.5
#: Seconds after a check began that requests wait for its result before using the current snapshot.
CHECK_PATIENCE = 0.5
#: Models remembered per snapshot (the memo is dropped when it grows past this).
MEMO_SIZE = 1024

#: The columns a snapshot reads.
PROFILE_FIELDS = (*TIMEOUT_FIELDS, "name", "model_pattern", "enabled", "fallbacks")
#: The policy of a profile row; the name :mod:`chatproxy.records` uses for :func:`chatproxy.policy.from_profile`.
policy_of = from_profile


def specificity(name: str, pattern: str) -> tuple[int, int, int]:
    """Sort key of a profile: larger is more specific (see the module docstring; ties: by name)."""
    literal = wildcards = 0
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char in "*?":
            wildcards += 1
        elif char == "[" and (end := _class_end(pattern, i)) is not None:
            wildcards += 1
            i = end
        else:
            literal += 1
        i += 1
    return (0 if name == DEFAULT_NAME else 1, literal, -wildcards)


def _class_end(pattern: str, start: int) -> int | None:
    """Index of the ``]`` closing the character class opened at ``start`` (fnmatch rules), or None."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "!":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    end = pattern.find("]", i)
    return end if end >= 0 else None


def matches(name: str, pattern: str, model: str) -> bool:
    """Whether a profile applies to ``model`` (``default`` applies to every model)."""
    return name == DEFAULT_NAME or fnmatch.fnmatchcase(model, pattern)


def most_specific(candidates: Iterable[Any], model: str) -> Any | None:
    """The most specific of ``candidates`` (objects with ``name`` and ``model_pattern``) for ``model``."""
    found = ordered(c for c in candidates if matches(c.name, c.model_pattern, model))
    return found[0] if found else None


def ordered(candidates: Iterable[Any]) -> list[Any]:
    """``candidates`` most specific first (ties: by name)."""
    result = sorted(candidates, key=lambda c: c.name)
    result.sort(key=lambda c: specificity(c.name, c.model_pattern), reverse=True)
    return result


# ------------------------------------------------------------------ the per-process snapshot


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    model_pattern: str
    policy: Policy


@dataclass(slots=True)
class Snapshot:
    """The enabled, valid profiles of one version, most specific first."""

    version: str | None
    loaded_at: float  # time.monotonic()
    entries: tuple[_Entry, ...] = ()
    failed: bool = False
    rows: tuple[dict[str, Any], ...] = ()  # as read, to tell whether a periodic re-read found a change
    memo: dict[str, Policy | None] = field(default_factory=dict)

    def policy_for(self, model: str) -> Policy | None:
        try:
            return self.memo[model]
        except KeyError:
            pass
        policy = None
        for entry in self.entries:
            if matches(entry.name, entry.model_pattern, model):
                policy = entry.policy
                break
        if len(self.memo) >= MEMO_SIZE:
            self.memo.clear()
        self.memo[model] = policy
        return policy


_EMPTY = Snapshot(version=None, loaded_at=-math.inf)
_snapshot = _EMPTY
_checked_at = -math.inf


def snapshot() -> Snapshot:
    """The current snapshot (for tests and diagnostics)."""
    return _snapshot


def forget(**kwargs: Any) -> None:
    """Drop this process's snapshot: the next lookup reloads from the database."""
    global _snapshot, _checked_at
    _snapshot = _EMPTY
    _checked_at = -math.inf


def bump_version() -> None:
    """Tell every process the profiles changed (a new token in the cache)."""
    from chatproxy import cachecalls

    try:
        cachecalls.cache(CACHE_ALIAS).set(VERSION_KEY, uuid.uuid4().hex, None)
    except Exception:
        logger.warning("could not publish a timeout-profile change to the cache %r", CACHE_ALIAS, exc_info=True)


def changed() -> None:
    """A profile was saved or deleted: forget the local snapshot now, publish after commit."""
    from django.db import transaction

    forget()
    transaction.on_commit(bump_version)


def _read_version() -> str | None:
    from chatproxy import cachecalls, outage

    cache = cachecalls.cache(CACHE_ALIAS)
    try:
        outage.of_cache(CACHE_ALIAS).check()
        version = cache.get(VERSION_KEY)
        if version is None:
            cache.add(VERSION_KEY, uuid.uuid4().hex, None)
            version = cache.get(VERSION_KEY)
    except Exception as exc:  # logged once per outage; changes still arrive by the REFRESH read
        outage.of_cache(CACHE_ALIAS).failed(exc)
        return None
    outage.of_cache(CACHE_ALIAS).ok()
    return version if isinstance(version, str) else None


def _due(now: float) -> bool:
    """Whether a lookup at ``now`` should check first: every ``CHECK_INTERVAL``, and always once the
    snapshot is ``REFRESH`` seconds old (so no request is served from an older one)."""
    return now - _checked_at >= CHECK_INTERVAL or now - _snapshot.loaded_at >= profiles_refresh()


def _stale(version: str | None, now: float) -> bool:
    """Whether the profiles must be read again: the token moved, or the snapshot is ``REFRESH`` old."""
    current = _snapshot
    return (version is not None and version != current.version) or now - current.loaded_at >= profiles_refresh()


def _query() -> Any:
    from django.apps import apps
    from django.db.models import Q

    TimeoutProfile = apps.get_model("chatproxy", "TimeoutProfile")
    # ``default`` is always in force, even if someone bypassed validation to disable it.
    query = TimeoutProfile.objects.filter(Q(enabled=True) | Q(name=DEFAULT_NAME))
    return query.order_by("name").values(*PROFILE_FIELDS)


def _loaded(version: str | None, rows: Sequence[dict[str, Any]], now: float) -> Snapshot:
    """The snapshot for ``rows`` just read: the current one (memo kept) when nothing changed."""
    current = _snapshot
    rows = tuple(rows)
    if current.failed:
        logger.warning("timeout profiles loaded again from the database")
    if current is not _EMPTY and not current.failed and rows == current.rows:
        return replace(current, version=version, loaded_at=now)
    if current is not _EMPTY and version == current.version and not current.failed:
        logger.info("timeout profiles changed in the database without a new version token; reloaded")
    return _build(version, rows, now)


def _build(version: str | None, rows: tuple[dict[str, Any], ...], now: float) -> Snapshot:
    entries = []
    for row in rows:
        policy = from_profile(row)
        problems = policy.problems(by_label)
        if problems:
            # Only possible when validation was bypassed (queryset.update, raw SQL).
            logger.error("timeout profile %r is ignored: %s", row["name"], "; ".join(p.sentence() for p in problems))
            continue
        entries.append(_Entry(row["name"], row["model_pattern"], policy))
    return Snapshot(version=version, loaded_at=now, entries=tuple(ordered(entries)), rows=rows)


def _failed(version: str | None, now: float, exc: BaseException) -> Snapshot:
    """After a failed load: the profiles of the current snapshot, kept (retried after ``REFRESH``)."""
    current = _snapshot
    if not current.failed:
        kept = "keeping the profiles loaded before" if current.entries else "using CHATPROXY settings"
        logger.warning("timeout profiles could not be loaded (%s: %s); %s until the database answers",
                       type(exc).__name__, str(exc)[:200], kept)
    return Snapshot(version=version, loaded_at=now, entries=current.entries, failed=True, rows=current.rows)


def refresh() -> Snapshot:
    """Sync: re-check the version (throttled) and reload from the database if it changed.

    In a running event loop this does nothing (use :func:`arefresh` there).
    """
    global _snapshot, _checked_at
    if _in_event_loop():
        return _snapshot
    now = time.monotonic()
    if not _due(now):
        return _snapshot
    _checked_at = now
    version = _read_version()
    if _stale(version, now):
        try:
            rows = list(_query())
        except Exception as exc:
            _snapshot = _failed(version, now, exc)
        else:
            _snapshot = _loaded(version, rows, now)
    return _snapshot


_checking: asyncio.Task[Snapshot] | None = None


async def arefresh() -> Snapshot:
    """Async :func:`refresh`: the version check is a cache read, the reload goes through the async ORM.

    Requests arriving while a check is under way wait for its result rather than take the snapshot
    it is replacing (otherwise all but one of a burst of requests would miss a fresh change), for
    at most ``CHECK_PATIENCE`` seconds after it began.
    """
    global _checking, _checked_at
    checking = _checking
    if checking is not None and not checking.done() and checking.get_loop() is asyncio.get_running_loop():
        return await _patiently(checking)
    now = time.monotonic()
    if not _due(now):
        return _snapshot
    _checked_at = now  # before the task runs: _patiently measures its patience from here
    _checking = asyncio.get_running_loop().create_task(_check(now))
    return await _patiently(_checking)


async def _patiently(checking: asyncio.Task[Snapshot]) -> Snapshot:
    """The result of ``checking`` if it comes within ``CHECK_PATIENCE`` of its start, else the
    snapshot there is (a database that hangs must not hold the streams opening meanwhile)."""
    wait = _checked_at + CHECK_PATIENCE - time.monotonic()
    if wait > 0:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(checking), wait)
    return _snapshot


async def _check(now: float) -> Snapshot:
    global _snapshot, _checked_at
    _checked_at = now
    version = await _aread_version()
    if _stale(version, now):
        try:
            rows = await asyncio.get_running_loop().run_in_executor(_reader(), _read_rows)
        except Exception as exc:
            _snapshot = _failed(version, now, exc)
        else:
            _snapshot = _loaded(version, rows, now)
    return _snapshot


_reader_pool: ThreadPoolExecutor | None = None
_reader_lock = threading.Lock()


def _reader() -> ThreadPoolExecutor:
    """The thread the event loop's profile reads run in, with a database connection of its own.

    Not the async ORM's: that is asgiref's one thread-sensitive thread, which every request also
    needs (Django's ``request_started`` / ``request_finished`` receivers run there), so a read
    waiting for a locked or unreachable database would hold every stream opening meanwhile.
    """
    global _reader_pool
    with _reader_lock:
        if _reader_pool is None:
            _reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatproxy-profiles")
        return _reader_pool


def _read_rows() -> list[dict[str, Any]]:
    from django.db import connections

    query = _query()
    try:
        return list(query)
    except Exception:
        connections[query.db].close()  # a connection the database dropped is replaced next time
        raise


async def _aread_version() -> str | None:
    from chatproxy import cachecalls

    return await cachecalls.run(cachecalls.cache(CACHE_ALIAS), _read_version)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def policy_for(model: str) -> Policy | None:
    """The policy of the profile that applies to ``model``, or None (no profile could be loaded).

    Never queries the database from a running event loop: there it uses the snapshot that
    :func:`arefresh` keeps current (and, if that is due for a check, starts one in the background
    for the requests that follow).
    """
    if _in_event_loop():
        if _due(time.monotonic()):
            _refresh_soon()
        return _snapshot.policy_for(model)
    return refresh().policy_for(model)


_background: asyncio.Task[Snapshot] | None = None


def _refresh_soon() -> None:
    global _background
    loop = asyncio.get_running_loop()
    if _background is not None and not _background.done() and _background.get_loop() is loop:
        return
    _background = loop.create_task(arefresh())


def resolve_policy(model: str, options: Mapping[str, Any] | None = None) -> Policy:
    """The policy for one request to ``model``.

    Layers, strongest first: ``options`` (per-request, already validated by the caller), the
    most specific enabled admin ``TimeoutProfile`` for ``model`` (its name goes to
    ``Policy.profile``), ``CHATPROXY["TIMEOUTS"]``, built-in defaults. Settings and defaults only
    apply when no profile can be loaded: the ``default`` profile matches every model.
    """
    policy = policy_for(model) or settings_policy()
    if options:
        policy = policy.with_options(**options)
    return policy
