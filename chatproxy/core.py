"""The resilient stream: one answer, many attempts, events out.

Plain asyncio: no Django, no SDK, no HTTP here. Give :class:`ChatStream` an
:class:`~chatproxy.upstream.base.Upstream`, a :class:`ChatRequest` and a
:class:`~chatproxy.conf.Policy`; iterate it to get :class:`Event` values in order:

    start -> (delta | tool_call | reasoning | refusal | retry | reset | keepalive)* -> done | error

Exactly one ``done`` or ``error`` ends every stream; every event but ``keepalive`` carries a
``seq`` that starts at 1 and grows by one.

How it works. ``start()`` launches one *pump* task per stream. The pump runs the attempts: it
reads the upstream directly and appends events to a log that readers drain, so a slow or departed
reader never stalls the upstream read, and the upstream read never waits on a reader. The parts,
each in :mod:`chatproxy.stream`:

* the event log and its readers (:mod:`~chatproxy.stream.events`): numbering, fan-out, keepalive
  flags, memory trimming, the grace period when the last client leaves;
* the watchdog (:mod:`~chatproxy.stream.watchdog`): one lazy timer per stream for the first-token,
  stall and overall deadlines and the keepalives; nothing is armed per chunk;
* the answer sent so far (:mod:`~chatproxy.stream.answer`) and the joiner that fits a retry's text
  onto it (:mod:`~chatproxy.stream.joiner`);
* the retry plan (:mod:`~chatproxy.stream.retry`): ``Retry(delay)`` or ``GiveUp(code)``;
* the attempt runner (:mod:`~chatproxy.stream.attempts`), which plays a *target* (upstream, request,
  policy) until it answers or the plan gives up;
* the fallbacks (:mod:`~chatproxy.stream.targets`): the request's own target, then each fallback
  target in turn on the same runner, under the same deadline, skipping those whose circuit
  (an optional :class:`~chatproxy.stream.targets.Breaker`) is open.

Beyond text. An adapter yields a choice-0 text delta as a plain ``str`` (the hot path) and any
other chunk as its ``choices`` list; the answer (:mod:`~chatproxy.stream.answer`) cuts those into
*units* on *channels* -- choice ``c``'s content, reasoning, refusal, tool call ``i``'s head (id and
name) and its argument pieces -- and sends each as one event: ``delta`` ``{"text"}``, ``reasoning``
``{"text", "field"}``, ``refusal`` ``{"text"}``, ``tool_call`` ``{"index", "id", "name",
"arguments"}`` (``id``/``name`` on the call's first event only, ``arguments`` a piece to append),
with ``"choice": c`` for choices other than 0 and ``"logprobs"`` as the upstream gave them. A
transport rebuilds the upstream's wire form from them one for one (OpenAI chunks, or another API's
items); ``done`` carries ``finish_reason`` (``stop``, ``length``, ``tool_calls``,
``content_filter``) and ``usage`` as reported. Every unit is progress for the first-token and
stall deadlines. Chunks without a unit (role, finish, usage) never end or delay anything.
``answered_or_finished()`` lets a transport hold its status line until an upstream answered.

Partial output (``policy.on_partial``) when an attempt fails after deltas were emitted:

* ``restart``: a new attempt from scratch. Its text is held back while it equals what was already
  emitted (unit by unit for a structured answer: a tool call is matched again from its head,
  never spliced); once it goes past that, streaming just continues (no ``reset``). If it diverges, a
  ``reset`` is emitted followed by the new text so far (or, with ``allow_reset=False``, the stream
  ends with an error since the transport cannot express a reset).
* ``continue``: the partial text is sent back as a trailing assistant message (``"prefix": True``)
  so the upstream continues it; an overlap at the join is removed. Only for a plain-text answer:
  after a tool call, reasoning or a refusal was sent, the stream restarts instead.
* ``fail``: end with an error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from chatproxy.codes import ErrorCode
from chatproxy.conf import Policy
from chatproxy.stream import targets as fallbacks
from chatproxy.stream.answer import Answer
from chatproxy.stream.attempts import TOTAL_TIMEOUT_MARGIN, AttemptRunner, Done
from chatproxy.stream.events import KEEPALIVE, Event, EventLog, EventsDropped, Reader
from chatproxy.stream.retry import GiveUp
from chatproxy.stream.targets import Breaker
from chatproxy.stream.values import ChatRequest, StreamStats, Target
from chatproxy.stream.watchdog import Watchdog
from chatproxy.upstream.base import Upstream

__all__ = [
    "KEEPALIVE",
    "TOTAL_TIMEOUT_MARGIN",
    "ChatRequest",
    "ChatStream",
    "Event",
    "EventsDropped",
    "StreamStats",
    "Subscription",
    "Target",
]

logger = logging.getLogger("chatproxy.core")


class ChatStream:
    """One resilient streamed answer. See the module docstring.

    ``allow_reset=False`` is for transports that cannot express ``reset`` (OpenAI-compatible):
    a diverging restart then ends the stream with an error instead.
    ``on_finish`` is called once with the stream when it ends (records, signals); exceptions
    from it are logged and never break the stream. ``on_retry(stream, reason, attempt, delay)`` is
    called as each ``retry`` event is emitted (signals); it must not raise. ``rng`` is the backoff's
    jitter source (values in [0, 1)).

    Readers: iterating the stream itself reads through one default subscription; more readers
    (a resumed client, an event store) call :meth:`subscribe`. When the last *client*
    subscription closes before the end, generation goes on for ``grace`` seconds waiting for a
    new client, then the stream is cancelled (``grace=0``: at once). ``persistent=True`` keeps
    every event in memory until :meth:`mark_persisted` says an event store has it.

    ``fallbacks`` are the targets tried, in order, when the request's own one (``upstream``,
    ``request``, ``policy``) fails; ``breaker`` keeps their circuits (none: every target is tried).
    ``start`` names the first target tried (its model and profile), ``done`` the one that answered.
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
        fallbacks: Sequence[Target] = (),
        breaker: Breaker | None = None,
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.policy = policy
        self.targets: tuple[Target, ...] = (Target(upstream, request, policy), *fallbacks)
        self._breaker = breaker
        self.stream_id = stream_id or uuid.uuid4().hex
        self.allow_reset = allow_reset
        self.stats = StreamStats()
        self._on_finish = on_finish
        self._on_retry = on_retry
        self._rng = rng
        self._log = EventLog(grace=grace, persistent=persistent, abandoned=self.cancel)
        self._default: Subscription | None = None
        self._pump: asyncio.Task[None] | None = None
        self._running = False  # the pump began: a task cancelled before it runs never sees the cancellation
        self._cancel_requested = False

    # ------------------------------------------------------------------ consumer side

    def start(self) -> ChatStream:
        """Launch the pump (idempotent). Must be called inside the running loop."""
        if self._pump is None:
            loop = asyncio.get_running_loop()
            self._log.start(loop)
            self._pump = loop.create_task(self._run(), name=f"chatproxy-stream-{self.stream_id}")
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
        return self._log.attach(Subscription(self, after, client))

    @property
    def last_seq(self) -> int:
        return self._log.seq

    def events_after(self, after: int) -> list[Event]:
        """The logged events with ``seq > after`` still in memory."""
        return self._log.after(after)

    def mark_persisted(self, seq: int) -> None:
        """Events up to ``seq`` are in the store; memory may drop them once every reader has them."""
        self._log.mark_persisted(seq)

    @property
    def finished(self) -> bool:
        return self._log.finished

    async def answered_or_finished(self, within: float) -> None:
        """Wait (at most ``within`` seconds) until an upstream answered with its response headers
        or the stream ended: a transport that must choose its HTTP status holds it until then."""
        self.start()
        await self._log.answered_or_finished(within)

    def cancel(self) -> None:
        """Stop generating: the stream ends with ``error`` code ``cancelled``."""
        if self._pump is not None and not self._pump.done():
            self._cancel_requested = True
            if self._running:
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

    # ------------------------------------------------------------------ the pump

    async def _run(self) -> None:
        self._running = True
        log = self._log
        loop = log.loop
        policy = self.policy
        started_at = loop.time()
        watchdog = Watchdog(loop, log, keepalive=policy.keepalive, deadline_at=started_at + policy.deadline)
        answer = Answer(log, self.stats, started_at)
        runner = AttemptRunner(loop, log, answer, watchdog, self.stats, rng=self._rng, allow_reset=self.allow_reset,
                               on_retry=self._retried if self._on_retry is not None else None)
        watchdog.start()
        try:
            if self._cancel_requested:  # before the pump ran (the last client left at once)
                outcome: Done | GiveUp = GiveUp(ErrorCode.CANCELLED)
            else:
                outcome = await fallbacks.answer(runner, self.targets, self.stats, breaker=self._breaker,
                                                 first=self._started)
            if isinstance(outcome, Done):
                self._finish("done", {"finish_reason": outcome.finish_reason, "attempts": outcome.attempts,
                                      "usage": outcome.usage, "model": self.stats.model})
            else:
                self._finish("error", {"code": outcome.code})
        except asyncio.CancelledError:
            self._finish("error", {"code": ErrorCode.CANCELLED})
            if not self._cancel_requested:
                raise
        except Exception:
            logger.exception("chatproxy stream %s failed unexpectedly", self.stream_id)
            self._finish("error", {"code": ErrorCode.INTERNAL})
        finally:
            watchdog.stop()
            self.stats.duration = loop.time() - started_at
            self.stats.chars_sent = answer.length
            if self._on_finish is not None:
                try:
                    self._on_finish(self)
                except Exception:
                    logger.exception("chatproxy on_finish hook failed for stream %s", self.stream_id)

    def _started(self, target: Target) -> None:
        """The first attempt goes to ``target``: announce the stream (``start``)."""
        if self._log.seq == 0:
            self.stats.model, self.stats.target = target.request.model, target.key
            self._log.emit("start", {"stream_id": self.stream_id, "model": target.request.model,
                                     "profile": target.policy.profile})

    def _finish(self, name: str, data: dict[str, Any]) -> None:
        self._started(self.targets[0])  # a stream that ended before its first attempt still starts
        if not self._log.finished:
            self.stats.outcome = "done" if name == "done" else data["code"]
            self._log.finish(name, data)

    def _retried(self, reason: str, attempt: int, delay: float) -> None:
        assert self._on_retry is not None
        self._on_retry(self, reason, attempt, delay)


class Subscription(Reader):
    """One reader's cursor into a :class:`ChatStream`'s events (``stream``). Iterate it; :meth:`close` when done."""

    __slots__ = ("stream",)

    def __init__(self, stream: ChatStream, after: int, client: bool) -> None:
        super().__init__(stream._log, after, client)
        self.stream = stream
