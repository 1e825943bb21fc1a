"""The resilient stream: one answer, many attempts, events out.

Plain asyncio: no Django, no SDK, no HTTP here. Give :class:`ChatStream` an
:class:`~chatproxy.upstream.base.Upstream`, a :class:`ChatRequest` and a
:class:`~chatproxy.conf.Policy`; iterate it to get :class:`Event` values in order:

    start -> (delta | retry | reset | keepalive)* -> done | error

Exactly one ``done`` or ``error`` ends every stream; every event but ``keepalive`` carries a
``seq`` that starts at 1 and grows by one.

How it works. ``start()`` launches one *pump* task per stream. The pump runs the attempts: it
reads the upstream directly and appends events to a buffer that the consumer drains, so a slow or
departed consumer never stalls the upstream read, and the upstream read never waits on the
consumer. Per chunk the pump does a timestamp, a list append and a future wake-up: no Task, no
``wait_for``, no log line.

Deadlines are watched by one lazy timer per stream rather than per chunk: the pump only records
``loop.time()`` when a chunk arrives; the timer wakes at the earliest moment a deadline *could*
have passed, re-arms itself if a chunk came in meanwhile, and otherwise expires the attempt's
``asyncio.timeout`` (so cancellation semantics are asyncio's own). The same timer emits a
``keepalive`` event whenever nothing was emitted for ``policy.keepalive`` seconds.

Partial output (``policy.on_partial``) when an attempt fails after deltas were emitted:

* ``restart``: a new attempt from scratch. Its text is held back while it equals what was already
  emitted; once it goes past that, streaming just continues (no ``reset``). If it diverges, a
  ``reset`` is emitted followed by the new text so far (or, with ``allow_reset=False``, the stream
  ends with an error since the transport cannot express a reset).
* ``continue``: the partial text is sent back as a trailing assistant message (``"prefix": True``)
  so the upstream continues it; an overlap at the join is removed.
* ``fail``: end with an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatproxy.conf import Policy
from chatproxy.errors import (
    FirstTokenTimeout,
    RateLimited,
    StallTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from chatproxy.upstream.base import Upstream, UpstreamRequest

logger = logging.getLogger("chatproxy.core")

# Memory holds at most about this many events beyond what every reader and the store have.
_TRIM_AT = 256
_NO_PERSISTENCE = 1 << 62  # "everything is persisted": readers alone decide what memory keeps

# How far past the stream's deadline an SDK's total timeout sits: the watchdog ends the attempt first.
TOTAL_TIMEOUT_MARGIN = 5.0


class Event:
    """One stream event. ``data`` is the JSON-ready payload (None for keepalive)."""

    __slots__ = ("data", "name", "seq")

    def __init__(self, seq: int, name: str, data: dict[str, Any] | None) -> None:
        self.seq = seq
        self.name = name
        self.data = data

    def __repr__(self) -> str:
        return f"Event({self.seq}, {self.name!r}, {self.data!r})"


#: Sent when nothing else was for ``policy.keepalive`` seconds. It has no sequence number.
KEEPALIVE = Event(0, "keepalive", None)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the user asked for, validated."""

    model: str
    messages: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any] = field(default_factory=dict)
    extra_body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class StreamStats:
    """What happened, for records and signals. Times are seconds."""

    attempts: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    time_to_first_token: float | None = None
    longest_gap: float = 0.0
    chars_sent: int = 0
    outcome: str = "running"  # "done" or an error code
    duration: float = 0.0


class ChatStream:
    """One resilient streamed answer. See the module docstring.

    ``allow_reset=False`` is for transports that cannot express ``reset`` (OpenAI-compatible):
    a diverging restart then ends the stream with an error instead.
    ``on_finish`` is called once with the stream when it ends (records, signals); exceptions
    from it are logged and never break the stream. ``on_retry(stream, reason, attempt, delay)`` is
    called as each ``retry`` event is emitted (signals); it must not raise.

    Readers: iterating the stream itself reads through one default subscription; more readers
    (a resumed client, an event store) call :meth:`subscribe`. When the last *client*
    subscription closes before the end, generation goes on for ``grace`` seconds waiting for a
    new client, then the stream is cancelled (``grace=0``: at once). ``persistent=True`` keeps
    every event in memory until :meth:`mark_persisted` says an event store has it.
    """

    def __init__(
        self,
        upstream: Upstream,
        request: ChatRequest,
        policy: Policy,
        *,
        stream_id: str | None = None,
        allow_reset: bool = True,
        on_finish: Callable[[ChatStream], Any] | None = None,
        on_retry: Callable[[ChatStream, str, int, float], Any] | None = None,
        grace: float = 0.0,
        persistent: bool = False,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.policy = policy
        self.stream_id = stream_id or uuid.uuid4().hex
        self.allow_reset = allow_reset
        self.stats = StreamStats()
        self._on_finish = on_finish
        self._on_retry = on_retry
        self._rng = rng

        # The event log: events with seq > _log_base, in order (keepalives are not logged).
        self._log: list[Event] = []
        self._log_base = 0
        # Events up to this seq are safe elsewhere (an event store) and may be dropped from memory.
        self._persisted_seq = 0 if persistent else _NO_PERSISTENCE
        self._subscriptions: set[Subscription] = set()
        self._clients = 0  # subscriptions that are clients (not the event store)
        self._grace = grace
        self._grace_timer: asyncio.TimerHandle | None = None
        self._default: Subscription | None = None
        self._seq = 0
        self._finished = False  # the terminal event was emitted
        self._pump: asyncio.Task[None] | None = None
        self._cancel_requested = False

        # Text the consumer has been given in this answer (since the last reset).
        self._sent: list[str] = []
        self._sent_len = 0

        # Watchdog state, read by the timer callback.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._deadline_at = 0.0
        self._last_emit = 0.0
        self._attempt_started = 0.0
        self._last_chunk = 0.0
        self._got_chunk = False
        self._attempt_timeout: asyncio.Timeout | None = None
        self._expired: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ consumer side

    def start(self) -> ChatStream:
        """Launch the pump (idempotent). Must be called inside the running loop."""
        if self._pump is None:
            self._loop = asyncio.get_running_loop()
            self._pump = self._loop.create_task(self._run(), name=f"chatproxy-stream-{self.stream_id}")
        return self

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._default is None:
            self._default = self.subscribe()
        return await self._default.__anext__()

    def subscribe(self, after: int = 0, *, client: bool = True) -> Subscription:
        """A reader of the events with ``seq > after``, then live ones (and keepalives, for clients).

        Raises :class:`EventsDropped` if some of those events are no longer in memory (they were
        persisted: read them from the store first, then subscribe after the last one read).
        """
        if self._pump is None:
            self.start()
        if after < self._log_base:
            raise EventsDropped(self._log_base)
        subscription = Subscription(self, after, client)
        self._subscriptions.add(subscription)
        if client:
            self._clients += 1
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
        return subscription

    def _detach(self, subscription: Subscription) -> None:
        if subscription not in self._subscriptions:
            return
        self._subscriptions.discard(subscription)
        if not subscription.client:
            return
        self._clients -= 1
        if self._clients or self._finished:
            return
        if self._grace > 0:
            assert self._loop is not None
            self._grace_timer = self._loop.call_later(self._grace, self._grace_expired)
        else:
            self.cancel()

    def _grace_expired(self) -> None:
        self._grace_timer = None
        if not self._clients:
            self.cancel()

    @property
    def last_seq(self) -> int:
        return self._seq

    def events_after(self, after: int) -> list[Event]:
        """The logged events with ``seq > after`` still in memory."""
        return self._log[max(0, after - self._log_base) :]

    def mark_persisted(self, seq: int) -> None:
        """Events up to ``seq`` are in the store; memory may drop them once every reader has them."""
        self._persisted_seq = max(self._persisted_seq, seq)
        self._trim()

    def _trim(self) -> None:
        if not self._subscriptions:
            return  # nobody has read anything yet
        keep_from = self._persisted_seq
        for subscription in self._subscriptions:
            keep_from = min(keep_from, subscription.next_seq - 1)
        drop = keep_from - self._log_base
        if drop > 0:
            del self._log[:drop]
            self._log_base += drop

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Stop generating: the stream ends with ``error`` code ``cancelled``."""
        if self._pump is not None and not self._pump.done():
            self._cancel_requested = True
            self._pump.cancel()

    async def aclose(self) -> None:
        """Stop (if running) and wait until the upstream connection is closed."""
        if self._pump is None:
            return
        self.cancel()
        try:
            await asyncio.shield(self._pump)
        except asyncio.CancelledError:
            # Our caller is being cancelled too; the pump still finishes closing on its own.
            raise
        except Exception:  # pragma: no cover - _run never raises
            logger.exception("chatproxy stream %s failed while closing", self.stream_id)

    # ------------------------------------------------------------------ emitting

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self._push(Event(self._seq, name, data))

    def _push(self, event: Event) -> None:
        assert self._loop is not None
        self._last_emit = self._loop.time()
        if event is KEEPALIVE:
            for subscription in self._subscriptions:
                if subscription.client:
                    subscription.keepalive = True
                    subscription.wake()
            return
        log = self._log
        log.append(event)
        for subscription in self._subscriptions:
            subscription.wake()
        if len(log) > _TRIM_AT:
            self._trim()

    def _emit_text(self, text: str) -> None:
        self._sent.append(text)
        self._sent_len += len(text)
        if self.stats.time_to_first_token is None:
            assert self._loop is not None
            self.stats.time_to_first_token = self._loop.time() - self._started_at
        self._emit("delta", {"text": text})

    def _finish(self, name: str, data: dict[str, Any]) -> None:
        if self._finished:
            return
        self._finished = True
        self.stats.outcome = "done" if name == "done" else data["code"]
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self._emit(name, data)

    # ------------------------------------------------------------------ the timer

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """Wake-up for keepalives and deadlines; re-arms itself for the next possible moment."""
        assert self._loop is not None
        self._timer = None
        if self._finished:
            return
        now = self._loop.time()
        policy = self.policy
        if now - self._last_emit >= policy.keepalive:
            self._push(KEEPALIVE)
        next_wake = self._last_emit + policy.keepalive

        timeout = self._attempt_timeout
        if timeout is not None and self._expired is None:
            if self._got_chunk:
                due, reason = self._last_chunk + policy.stall, "stall"
            else:
                due, reason = self._attempt_started + policy.first_token, "first_token"
            if self._deadline_at <= due:
                due, reason = self._deadline_at, "deadline"
            if now >= due:
                self._expired = reason
                timeout.reschedule(now)  # expires the attempt's asyncio.timeout right away
            else:
                next_wake = min(next_wake, due)
        self._arm(next_wake)

    # ------------------------------------------------------------------ the pump

    async def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        self._started_at = self._last_emit = loop.time()
        self._deadline_at = self._started_at + self.policy.deadline
        self._emit(
            "start",
            {"stream_id": self.stream_id, "model": self.request.model, "profile": self.policy.profile},
        )
        self._arm(self._last_emit + self.policy.keepalive)
        try:
            await self._attempts()
        except asyncio.CancelledError:
            self._finish("error", {"code": "cancelled"})
            if not self._cancel_requested:
                raise
        except Exception:
            logger.exception("chatproxy stream %s failed unexpectedly", self.stream_id)
            self._finish("error", {"code": "internal"})
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.stats.duration = loop.time() - self._started_at
            self.stats.chars_sent = self._sent_len
            if self._on_finish is not None:
                try:
                    self._on_finish(self)
                except Exception:
                    logger.exception("chatproxy on_finish hook failed for stream %s", self.stream_id)

    async def _attempts(self) -> None:
        assert self._loop is not None
        policy = self.policy
        attempt = 0
        while True:
            attempt += 1
            self.stats.attempts = attempt
            try:
                finish_reason, usage = await self._attempt(attempt)
            except _Diverged:
                self._finish("error", {"code": "upstream_unavailable"})
                return
            except UpstreamError as exc:
                delay_or_code = self._plan_retry(exc, attempt)
                if isinstance(delay_or_code, str):
                    self._finish("error", {"code": delay_or_code})
                    return
                self.stats.retry_reasons.append(exc.reason)
                self._emit(
                    "retry",
                    {
                        "attempt": attempt + 1,
                        "max_attempts": policy.max_attempts,
                        "reason": exc.reason,
                        "delay": round(delay_or_code, 3),
                    },
                )
                if self._on_retry is not None:
                    self._on_retry(self, exc.reason, attempt + 1, delay_or_code)
                if delay_or_code > 0:
                    await asyncio.sleep(delay_or_code)
                continue
            self._finish("done", {"finish_reason": finish_reason, "attempts": attempt, "usage": usage})
            return

    def _plan_retry(self, exc: UpstreamError, attempt: int) -> float | str:
        """The delay before the next attempt, or the error code that ends the stream."""
        assert self._loop is not None
        policy = self.policy
        if self._expired == "deadline":
            return "deadline_exceeded"
        if not exc.retryable:
            return _final_code(exc)
        if self._sent_len and policy.on_partial == "fail":
            return _final_code(exc)
        if attempt >= policy.max_attempts:
            return _final_code(exc)
        if exc.retry_after is not None:
            if exc.retry_after > policy.retry_after_max:
                return _final_code(exc)
            delay = exc.retry_after
        else:
            cap = min(policy.backoff_max, policy.backoff_initial * (2 ** (attempt - 1)))
            delay = cap * self._rng()  # full jitter
        if self._loop.time() + delay >= self._deadline_at:
            return "deadline_exceeded"
        return delay

    def _upstream_request(self) -> UpstreamRequest:
        assert self._loop is not None
        policy = self.policy
        request = self.request
        messages = request.messages
        if self._sent_len and policy.on_partial == "continue":
            partial = "".join(self._sent)
            messages = [*messages, {"role": "assistant", "content": partial, "prefix": True}]
        remaining = max(0.001, self._deadline_at - self._loop.time())
        return UpstreamRequest(
            model=request.model,
            messages=messages,
            params=request.params,
            extra_body=request.extra_body,
            connect_timeout=min(policy.connect, remaining),
            # No socket-read timeout: the watchdog timer is the read deadline (first token, stall).
            # One would cost a timer armed and cancelled on every socket read (aiohttp's sock_read,
            # httpcore's per-read deadline): ~6 us a chunk, measured (bench/).
            read_timeout=None,
            total_timeout=remaining + TOTAL_TIMEOUT_MARGIN,
        )

    async def _attempt(self, attempt: int) -> tuple[str | None, dict[str, Any] | None]:
        """Run one attempt to its end; emits deltas. Raises UpstreamError on failure."""
        assert self._loop is not None
        loop = self._loop
        request = self._upstream_request()
        mode = "pass"
        if self._sent_len:
            mode = "continue" if self.policy.on_partial == "continue" else "restart"
        joiner = _Joiner(self, mode) if mode != "pass" else None

        self._attempt_started = self._last_chunk = loop.time()
        self._got_chunk = False
        self._expired = None
        stream = None
        try:
            async with asyncio.timeout(None) as timeout:
                self._attempt_timeout = timeout
                self._on_timer()  # arms the deadline check for this attempt
                stream = await self.upstream.open(request)
                stats = self.stats
                async for text in stream:
                    now = loop.time()
                    if self._got_chunk:
                        if now - self._last_chunk > stats.longest_gap:
                            stats.longest_gap = now - self._last_chunk
                        self._last_chunk = now
                    else:
                        # From now on the (usually shorter) stall deadline applies: re-arm once.
                        self._got_chunk = True
                        self._last_chunk = now
                        self._on_timer()
                    if joiner is None:
                        self._emit_text(text)
                    else:
                        joiner.feed(text)
                if joiner is not None:
                    joiner.end()
                return stream.finish_reason, stream.usage
        except TimeoutError:
            if self._expired == "stall":
                raise StallTimeout(f"no chunk for {self.policy.stall}s") from None
            if self._expired == "first_token":
                raise FirstTokenTimeout(f"no first chunk within {self.policy.first_token}s") from None
            if self._expired == "deadline":
                raise UpstreamTimeout("deadline") from None
            raise
        finally:
            self._attempt_timeout = None
            if stream is not None:
                await stream.aclose()


class EventsDropped(Exception):
    """The asked-for events were persisted and dropped from memory; ``first_seq - 1`` is the last dropped."""

    def __init__(self, log_base: int) -> None:
        super().__init__(f"events up to seq {log_base} are no longer in memory")
        self.log_base = log_base


class Subscription:
    """One reader's cursor into a :class:`ChatStream`'s events. Iterate it; :meth:`close` when done."""

    __slots__ = ("_waiter", "client", "keepalive", "next_seq", "stream")

    def __init__(self, stream: ChatStream, after: int, client: bool) -> None:
        self.stream = stream
        self.next_seq = after + 1
        self.client = client
        self.keepalive = False
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        stream = self.stream
        while True:
            index = self.next_seq - stream._log_base - 1
            if index < len(stream._log):
                self.next_seq += 1
                self.keepalive = False  # a real event makes a pending keepalive moot
                return stream._log[index]
            if self.keepalive:
                self.keepalive = False
                return KEEPALIVE
            if stream._finished:
                raise StopAsyncIteration
            assert stream._loop is not None
            self._waiter = stream._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def pending(self) -> list[Event]:
        """Take every event available now without waiting (for batching readers)."""
        stream = self.stream
        events = stream._log[self.next_seq - stream._log_base - 1 :]
        self.next_seq += len(events)
        return events

    def close(self) -> None:
        """Stop reading. The last client leaving starts the stream's grace period."""
        self.stream._detach(self)


class _Diverged(Exception):
    """Internal: a restart diverged and the transport cannot express ``reset``."""


class _Joiner:
    """Joins a retry attempt's text onto what the consumer already has (restart / continue)."""

    __slots__ = ("held", "joined", "matched", "mode", "prefix", "stream")

    # A continuation's overlap is looked for in the first this-many characters.
    OVERLAP_WINDOW = 64

    def __init__(self, stream: ChatStream, mode: str) -> None:
        self.stream = stream
        self.mode = mode
        self.prefix = "".join(stream._sent)
        self.matched = 0  # restart: characters of prefix the new attempt reproduced
        self.held: list[str] = []  # continue: text held until the overlap is known
        self.joined = False  # past the join: plain pass-through

    def feed(self, text: str) -> None:
        if self.joined:
            self.stream._emit_text(text)
        elif self.mode == "restart":
            self._feed_restart(text)
        else:
            self.held.append(text)
            if sum(map(len, self.held)) >= min(self.OVERLAP_WINDOW, len(self.prefix)):
                self._join_continuation()

    def end(self) -> None:
        if self.joined:
            return
        if self.mode == "restart":
            # The new answer stopped inside the old one: it is shorter, so it diverged.
            self._diverge(self.prefix[: self.matched])
        else:
            self._join_continuation()

    def _feed_restart(self, text: str) -> None:
        prefix, matched = self.prefix, self.matched
        rest = len(prefix) - matched
        if len(text) <= rest:
            if prefix.startswith(text, matched):
                self.matched = matched + len(text)
                if self.matched == len(prefix):
                    self.joined = True
                return
        elif prefix.startswith(text[:rest], matched):
            self.joined = True
            self.stream._emit_text(text[rest:])
            return
        self._diverge(prefix[:matched] + text)

    def _diverge(self, new_text: str) -> None:
        stream = self.stream
        if not stream.allow_reset:
            raise _Diverged()
        stream._emit("reset", {"reason": "diverged"})
        stream._sent = []
        stream._sent_len = 0
        self.joined = True
        if new_text:
            stream._emit_text(new_text)

    def _join_continuation(self) -> None:
        self.joined = True
        text = "".join(self.held)
        self.held = []
        text = text[_overlap(self.prefix, text) :]
        if text:
            self.stream._emit_text(text)


def _overlap(before: str, after: str) -> int:
    """Length of the longest start of ``after`` that ``before`` ends with, at a word boundary.

    Models asked to continue often repeat the last word or two; a one-letter coincidence
    ("th" + "he ...") must not eat text, so the overlap has to start where a word starts in
    ``before`` and be at least two characters long.
    """
    for size in range(min(len(before), len(after)), 1, -1):
        if before.endswith(after[:size]):
            start = len(before) - size
            if start == 0 or before[start - 1].isspace() or after[0].isspace():
                return size
    return 0


def _final_code(exc: UpstreamError) -> str:
    """The ``error`` event code for a failure that ends the stream (SPEC 6.1)."""
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, UpstreamTimeout):
        return "upstream_timeout"
    if isinstance(exc, UpstreamConnectError):
        return "upstream_unavailable"
    if isinstance(exc, UpstreamStatusError) and not exc.retryable:
        # 401/403 are chatproxy's own credentials: the user cannot fix that.
        if exc.status in (401, 403):
            logger.error("upstream refused chatproxy's credentials (HTTP %s): check UPSTREAM.API_KEY", exc.status)
            return "upstream_unavailable"
        return "bad_request"
    return "upstream_unavailable"
