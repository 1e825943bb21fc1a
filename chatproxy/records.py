"""Stream records: one row per finished stream, statistics, and the timeouts they suggest.

Writing
-------
:func:`record_stream` runs in the stream's ``on_finish`` hook, once, when the stream has ended:
it copies the stream's :class:`~chatproxy.core.StreamStats` into a dict and hands the
``INSERT`` to one dedicated writer thread per process, off the event loop and off the
per-chunk path. A failed write is logged (logger ``chatproxy.records``) and dropped; it never
reaches the stream. Settings (``CHATPROXY["RECORDS"]``, optional)::

    "RECORDS": {
        "ENABLED": True,        # False: write no records
        "RETENTION_DAYS": 30,   # what `manage.py chatproxy_prune` keeps by default
    }

Statistics and suggestions
--------------------------
Per model, over a window (the last hour, day, week or month) and at most the :data:`SAMPLE_LIMIT`
most recent streams, with percentiles interpolated linearly between the closest ranks:

* **time to first token** (TTFT): p50 / p95 over the streams whose first token came from their
  first attempt (``attempts == 1``, or the first retry was a ``stall``, which only happens after a
  token). Retried starts are left out: they measure chatproxy's timeouts, not the model.
* **longest gap**: p95 of each stream's longest silence between two upstream chunks.
* **retry rate**: the share of streams that needed more than one attempt.

Suggested profile values, computed only from at least :data:`MIN_SAMPLES` streams, each rounded
up to :data:`ROUND_TO` seconds, for a profile whose current values are ``current``::

    first_token_timeout = max(FIRST_TOKEN_FLOOR, 2 x p95 TTFT)
    stall_timeout       = max(STALL_FLOOR,       3 x p95 longest gap)
    keepalive_interval  = min(current keepalive_interval, gateway_timeout / 4)
    deadline            = max(current deadline, 2 x p95 duration of completed streams,
                              first_token_timeout + 1, stall_timeout + 1)

The factors leave room above the observed tail (a healthy slow answer must not be cut); the
floors stop a fast sample from producing hair-trigger timeouts; a keepalive at a quarter of the
gateway timeout gives the gateway three chances to see traffic; the deadline only ever grows, and
stays above the other two so retries remain possible. Timeouts censor what they cut (a stream
retried for ``first_token`` never shows its real TTFT), so the share of ``first_token`` and
``stall`` retries is shown beside each suggestion: if it is high and the upstream is known to be
healthy, the current timeout is too tight whatever the percentiles say.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import InterfaceError, OperationalError, connections
from django.utils import timezone

from chatproxy.conf import Policy, get_config
from chatproxy.core import ChatStream

logger = logging.getLogger("chatproxy.records")

#: Most recent streams per model that statistics look at.
SAMPLE_LIMIT = 5000
#: Fewer streams than this give statistics but no suggestion.
MIN_SAMPLES = 20
FIRST_TOKEN_FLOOR = 2.0  # seconds
STALL_FLOOR = 2.0  # seconds
ROUND_TO = 0.5  # seconds
#: The formulas above, for display (admin statistics page, ``chatproxy_probe``).
FORMULAS = (
    ("first_token_timeout", f"max({FIRST_TOKEN_FLOOR:g} s, 2 × p95 time to first token)"),
    ("stall_timeout", f"max({STALL_FLOOR:g} s, 3 × p95 longest gap)"),
    ("keepalive_interval", "min(current, gateway_timeout / 4)"),
    ("deadline", "max(current, 2 × p95 duration, first_token_timeout + 1, stall_timeout + 1)"),
)
#: Windows offered by the admin statistics page.
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULT_WINDOW = "24h"


def records_config() -> dict[str, Any]:
    """``CHATPROXY["RECORDS"]`` over its defaults (:data:`chatproxy.conf.DEFAULTS`)."""
    return dict(get_config()["RECORDS"])


# --------------------------------------------------------------------------- writing

_writer: ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()
_pending: set[Future[None]] = set()


def _executor() -> ThreadPoolExecutor:
    global _writer
    with _writer_lock:
        if _writer is None:
            # One thread: records are written in order, over one database connection.
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatproxy-records")
        return _writer


def who(user: Any) -> tuple[Any, str]:
    """``(user_id, username)`` of a request's user; ``(None, "")`` for anonymous or none."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None, ""
    return user.pk, str(user.get_username())


def record_values(stream: ChatStream, user: Any = None) -> dict[str, Any]:
    """The :class:`~chatproxy.models.StreamRecord` fields of a finished stream."""
    stats = stream.stats
    user_id, username = who(user)
    return {
        "stream_id": stream.stream_id,
        "user_id": user_id,
        "username": username[:150],
        "model": stream.request.model[:200],
        "profile": stream.policy.profile[:100],
        "started": timezone.now() - timedelta(seconds=stats.duration),
        "time_to_first_token": stats.time_to_first_token,
        "longest_gap": stats.longest_gap,
        "attempts": stats.attempts,
        "retry_reasons": " ".join(stats.retry_reasons)[:200],
        "outcome": stats.outcome[:32],
        "duration": stats.duration,
        "chars_sent": stats.chars_sent,
        "answered_by": stats.target[:300],
        "abandoned": " ".join(stats.abandoned)[:300],
        "circuits_opened": " ".join(stats.circuits_opened)[:300],
    }


def record_stream(stream: ChatStream, user: Any = None) -> None:
    """Queue the record of a finished ``stream`` for writing. Cheap and never raises.

    Records queue up while the writer thread is busy and are saved together (one ``bulk_create``,
    one transaction): under load that is one write per batch, not one per stream.
    """
    try:
        if not records_config()["ENABLED"]:
            return
        values = record_values(stream, user)
        with _queue_lock:
            _queue.append(values)
            if len(_queue) > 1:
                return  # a batch write is already queued: it takes this record too
        future = _executor().submit(_write_queued)
    except Exception:
        logger.exception("could not queue the record of stream %s", stream.stream_id)
        with _queue_lock:
            _queue.clear()  # or no later record would start a write
        return
    _pending.add(future)
    future.add_done_callback(_pending.discard)


_queue: list[dict[str, Any]] = []
_queue_lock = threading.Lock()


def _write_queued() -> None:
    """In the writer thread: save every queued record in one ``bulk_create``.

    The thread keeps its database connection from one batch to the next (connecting, for SQLite
    with Django's per-connection setup, costs more CPU than the write); one that the database
    dropped is replaced once.
    """
    from chatproxy.models import StreamRecord

    with _queue_lock:
        batch = _queue[:]
        _queue.clear()
    if not batch:
        return
    error: Exception | None = None
    for _ in range(2):
        try:
            StreamRecord.objects.bulk_create([StreamRecord(**values) for values in batch])
            return
        except (OperationalError, InterfaceError) as exc:
            error = exc
            connections[StreamRecord.objects.db].close()
        except Exception as exc:
            error = exc
            break
    assert error is not None
    ids = ", ".join(values["stream_id"] for values in batch[:3]) + (", ..." if len(batch) > 3 else "")
    logger.warning("could not save the records of %d stream(s) (%s): %s: %s", len(batch), ids,
                   type(error).__name__, error)


async def drain() -> None:
    """Wait until every queued record is written (tests, graceful shutdown)."""
    while _pending:
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(_pending)), return_exceptions=True)


def prune(older_than: timedelta) -> int:
    """Delete records that started more than ``older_than`` ago; returns how many."""
    from chatproxy.models import StreamRecord

    deleted, _ = StreamRecord.objects.filter(started__lt=timezone.now() - older_than).delete()
    return int(deleted)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class Sample:
    """One stream, as statistics see it (a record, or one probe request)."""

    time_to_first_token: float | None
    longest_gap: float
    duration: float
    attempts: int = 1
    outcome: str = "done"
    retry_reasons: tuple[str, ...] = ()

    @property
    def first_attempt_ttft(self) -> float | None:
        """TTFT if the first token came from the first attempt, else None."""
        if self.attempts == 1 or (self.retry_reasons and self.retry_reasons[0] == "stall"):
            return self.time_to_first_token
        return None


SAMPLE_FIELDS = ("time_to_first_token", "longest_gap", "duration", "attempts", "outcome", "retry_reasons")


def sample_of(row: Sequence[Any]) -> Sample:
    """A :class:`Sample` from a ``values_list(*SAMPLE_FIELDS)`` row."""
    ttft, gap, duration, attempts, outcome, reasons = row
    return Sample(ttft, gap, duration, attempts, outcome, tuple(reasons.split()))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolating between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        return cls(len(values), percentile(values, 50), percentile(values, 95), percentile(values, 99),
                   max(values) if values else None)


def round_up(seconds: float, step: float = ROUND_TO) -> float:
    return math.ceil(seconds / step - 1e-9) * step


#: TimeoutProfile field -> Policy field, for the fields a suggestion sets.
SUGGESTED_FIELDS = {
    "first_token_timeout": "first_token",
    "stall_timeout": "stall",
    "keepalive_interval": "keepalive",
    "deadline": "deadline",
}


@dataclass(frozen=True, slots=True)
class Suggestion:
    """Suggested profile values (see the module docstring for the formulas)."""

    first_token_timeout: float
    stall_timeout: float
    keepalive_interval: float
    deadline: float
    samples: int

    def values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SUGGESTED_FIELDS}

    def changes(self, current: Policy) -> dict[str, tuple[float, float]]:
        """``{profile field: (current, suggested)}`` for the values that differ."""
        out = {}
        for name, attr in SUGGESTED_FIELDS.items():
            before, after = float(getattr(current, attr)), getattr(self, name)
            if not math.isclose(before, after):
                out[name] = (before, after)
        return out


def suggest(samples: Sequence[Sample], current: Policy, *, min_samples: int = MIN_SAMPLES) -> Suggestion | None:
    """Suggested values for a profile now at ``current``, or None with fewer than ``min_samples``."""
    if len(samples) < max(1, min_samples):
        return None
    ttfts = [s.first_attempt_ttft for s in samples if s.first_attempt_ttft is not None]
    gaps = [s.longest_gap for s in samples if s.time_to_first_token is not None]
    durations = [s.duration for s in samples if s.outcome == "done"]
    first_token = round_up(max(FIRST_TOKEN_FLOOR, 2 * (percentile(ttfts, 95) or 0.0)))
    stall = round_up(max(STALL_FLOOR, 3 * (percentile(gaps, 95) or 0.0)))
    keepalive = min(current.keepalive, round_down(current.gateway / 4))
    if keepalive <= 0:
        keepalive = current.gateway / 4
    deadline = round_up(max(current.deadline, 2 * (percentile(durations, 95) or 0.0), first_token + 1, stall + 1))
    return Suggestion(first_token, stall, keepalive, deadline, len(samples))


def round_down(seconds: float, step: float = ROUND_TO) -> float:
    return math.floor(seconds / step + 1e-9) * step


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True, slots=True)
class Marker:
    x: float
    label: str
    kind: str  # "current" | "suggested"


@dataclass(frozen=True, slots=True)
class Chart:
    """A histogram laid out for a small inline SVG (coordinates in SVG units)."""

    title: str
    width: int
    height: int
    bars: tuple[Bar, ...]
    markers: tuple[Marker, ...]
    x_max: float
    count: int


CHART_WIDTH, CHART_HEIGHT, CHART_BINS = 280, 64, 28


def histogram(title: str, values: Sequence[float], markers: Iterable[tuple[float | None, str, str]] = (),
              bins: int = CHART_BINS) -> Chart:
    """``values`` in ``bins`` equal bins from 0 to just past the largest of p99 and the markers.

    Values above the range go to the last bin; each marker is ``(seconds, label, kind)``.
    """
    marks = [(value, label, kind) for value, label, kind in markers if value is not None]
    top = max([percentile(values, 99) or 0.0, *(value for value, _, _ in marks)], default=0.0)
    x_max = max(top * 1.1, 0.1)
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int(value / x_max * bins))] += 1
    tallest = max(counts) or 1
    width = CHART_WIDTH / bins
    bars = []
    for index, count in enumerate(counts):
        if not count:
            continue
        height = max(1.0, (CHART_HEIGHT - 2) * count / tallest)
        low, high = x_max * index / bins, x_max * (index + 1) / bins
        bars.append(Bar(round(index * width, 2), round(CHART_HEIGHT - height, 2), round(width - 0.5, 2),
                        round(height, 2), f"{low:.2f}-{high:.2f} s: {count}"))
    drawn = tuple(Marker(round(min(value / x_max, 1.0) * CHART_WIDTH, 2), f"{label} {value:g} s", kind)
                  for value, label, kind in marks)
    return Chart(title, CHART_WIDTH, CHART_HEIGHT, tuple(bars), drawn, round(x_max, 3), len(values))


@dataclass(slots=True)
class ModelStats:
    """What the records of one model say, and what they suggest for its profile."""

    model: str
    count: int
    ttft: Distribution  # first attempts only: the basis of the suggestion
    ttft_seen: Distribution  # every stream that sent text, retries included: what users waited
    gap: Distribution
    duration: Distribution
    retry_rate: float
    error_rate: float
    outcomes: Counter[str]
    retry_reasons: Counter[str]
    profile: Any  # the TimeoutProfile that applies to the model now, or None
    current: Policy
    suggestion: Suggestion | None
    changes: dict[str, tuple[float, float]] = field(default_factory=dict)
    charts: tuple[Chart, ...] = ()

    @property
    def outcome_counts(self) -> list[tuple[str, int]]:
        return self.outcomes.most_common()

    @property
    def retry_reason_counts(self) -> list[tuple[str, int]]:
        return self.retry_reasons.most_common()

    @property
    def retry_percent(self) -> float:
        return 100 * self.retry_rate

    @property
    def error_percent(self) -> float:
        return 100 * self.error_rate

    @property
    def first_token_retry_rate(self) -> float:
        return self.retry_reasons["first_token"] / self.count if self.count else 0.0

    @property
    def stall_retry_rate(self) -> float:
        return self.retry_reasons["stall"] / self.count if self.count else 0.0


def summarize(model: str, samples: Sequence[Sample], profile: Any, current: Policy) -> ModelStats:
    """Statistics, suggestion and charts for ``samples`` of ``model`` under ``current``."""
    count = len(samples)
    ttfts = [s.first_attempt_ttft for s in samples if s.first_attempt_ttft is not None]
    gaps = [s.longest_gap for s in samples if s.time_to_first_token is not None]
    durations = [s.duration for s in samples if s.outcome == "done"]
    reasons: Counter[str] = Counter(r for s in samples for r in s.retry_reasons)
    suggestion = suggest(samples, current)
    stats = ModelStats(
        model=model,
        count=count,
        ttft=Distribution.of(ttfts),
        ttft_seen=Distribution.of([s.time_to_first_token for s in samples if s.time_to_first_token is not None]),
        gap=Distribution.of(gaps),
        duration=Distribution.of(durations),
        retry_rate=sum(1 for s in samples if s.attempts > 1) / count if count else 0.0,
        error_rate=sum(1 for s in samples if s.outcome != "done") / count if count else 0.0,
        outcomes=Counter(s.outcome for s in samples),
        retry_reasons=reasons,
        profile=profile,
        current=current,
        suggestion=suggestion,
        changes=suggestion.changes(current) if suggestion else {},
    )
    stats.charts = (
        histogram("time to first token", ttfts, [
            (current.first_token, "now", "current"),
            (suggestion.first_token_timeout if suggestion else None, "suggested", "suggested"),
        ]),
        histogram("longest gap", gaps, [
            (current.stall, "now", "current"),
            (suggestion.stall_timeout if suggestion else None, "suggested", "suggested"),
        ]),
    )
    return stats


def window_start(window: str) -> datetime:
    """The start of ``window`` (one of :data:`WINDOWS`; anything else means the default) from now."""
    now: datetime = timezone.now()
    return now - WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])


def samples_for(since: datetime, *, model: str | None = None, profile: str | None = None,
                limit: int = SAMPLE_LIMIT) -> list[Sample]:
    """The most recent ``limit`` records since ``since`` (of one model and/or profile) as samples."""
    from chatproxy.models import StreamRecord

    records = StreamRecord.objects.filter(started__gte=since)
    if model is not None:
        records = records.filter(model=model)
    if profile is not None:
        records = records.filter(profile=profile)
    rows = records.order_by("-started").values_list(*SAMPLE_FIELDS)[:limit]
    return [sample_of(row) for row in rows]


def current_profile(model: str, candidates: Iterable[Any] | None = None) -> tuple[Any, Policy]:
    """The enabled profile that applies to ``model`` now (read from the database) and its policy."""
    from chatproxy import profiles
    from chatproxy.conf import settings_policy
    from chatproxy.models import TimeoutProfile

    if candidates is None:
        candidates = TimeoutProfile.objects.filter(enabled=True)
    profile = profiles.most_specific(candidates, model)
    return profile, (profiles.policy_of(profile) if profile is not None else settings_policy())


def model_stats(window: str = DEFAULT_WINDOW, *, max_models: int = 50, limit: int = SAMPLE_LIMIT) -> list[ModelStats]:
    """Statistics for each model seen in ``window`` (busiest first)."""
    from django.db.models import Count

    from chatproxy.models import StreamRecord, TimeoutProfile

    since = window_start(window)
    busiest = (StreamRecord.objects.filter(started__gte=since).values("model").annotate(n=Count("id"))
               .order_by("-n", "model")[:max_models])
    candidates = list(TimeoutProfile.objects.filter(enabled=True))
    out = []
    for row in busiest:
        model = row["model"]
        profile, current = current_profile(model, candidates)
        out.append(summarize(model, samples_for(since, model=model, limit=limit), profile, current))
    return out


def apply_suggestion(profile: Any, suggestion: Suggestion) -> dict[str, tuple[float, float]]:
    """Set ``suggestion``'s values on ``profile`` and save it (validated); returns what changed.

    Raises :class:`django.core.exceptions.ValidationError` when the result would be invalid
    (for instance a keepalive that the profile's gateway timeout no longer allows).
    """
    from chatproxy import profiles

    changes = suggestion.changes(profiles.policy_of(profile))
    for name, (_, after) in changes.items():
        setattr(profile, name, after)
    if changes:
        profile.save()
    return changes


# --------------------------------------------------------------------------- fallback targets


@dataclass(frozen=True, slots=True)
class TargetStats:
    """One fallback target (``"upstream:model"``) over a window: ``answers`` it served, ``fallbacks``
    taken away from it (it was given up for the next target), ``circuit_openings`` it caused."""

    target: str
    answers: int = 0
    fallbacks: int = 0
    circuit_openings: int = 0


def target_stats(window: str = DEFAULT_WINDOW, *, limit: int = SAMPLE_LIMIT) -> list[TargetStats]:
    """Per target seen in ``window``, for the streams that used fallbacks (busiest first; empty if none did).

    Answers count every stream answered by a target that is some stream's fallback or was given up in one.
    """
    from django.db.models import Count, Q

    from chatproxy.models import StreamRecord

    recent = StreamRecord.objects.filter(started__gte=window_start(window))
    moved = recent.filter(~Q(abandoned="") | ~Q(circuits_opened=""))
    given_up: Counter[str] = Counter()
    opened: Counter[str] = Counter()
    for abandoned, circuits in moved.order_by("-started").values_list("abandoned", "circuits_opened")[:limit]:
        given_up.update(abandoned.split())
        opened.update(circuits.split())
    fallback_answers = set(moved.filter(outcome="done").values_list("answered_by", flat=True)[:limit])
    targets = set(given_up) | set(opened) | fallback_answers
    if not targets:
        return []
    served = dict(recent.filter(outcome="done", answered_by__in=targets).values_list("answered_by")
                  .annotate(n=Count("id")).values_list("answered_by", "n"))
    found = [TargetStats(t, served.get(t, 0), given_up[t], opened[t]) for t in targets]
    return sorted(found, key=lambda t: (-(t.answers + t.fallbacks), t.target))
