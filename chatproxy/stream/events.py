"""The event log of one stream and its readers.

Events get ``seq`` 1, 2, 3 ... in the order they are emitted and stay in memory until every reader
has them and, for a persistent stream, the event store has them too. Keepalives are not logged:
each client reader has a flag that makes its next read return :data:`KEEPALIVE` if no real event
came first. When the last client reader leaves before the end, the log waits ``grace`` seconds for
a new one, then calls ``abandoned`` (the stream cancels itself).

A client reader that falls :data:`MAX_CLIENT_LAG` events behind the newest (its client stopped
reading while the server waits for it to: uvicorn's backpressure) is cut off: it is detached, so
memory no longer keeps events for it, and its iteration ends at its next read. That client only:
the stream and its other readers go on (and the client may resume with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

# Memory holds at most about this many events beyond what every reader and the store have.
_TRIM_AT = 256
_NO_PERSISTENCE = 1 << 62  # "everything is persisted": readers alone decide what memory keeps
#: Events a client reader may fall behind the newest before it is cut off (see the module docstring).
MAX_CLIENT_LAG = 4096
_CUT = 1 << 62  # a cut reader's next_seq: beyond every event, so its next read takes the slow path

R = TypeVar("R", bound="Reader")


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


class EventsDropped(Exception):
    """The asked-for events were persisted and dropped from memory; ``log_base`` is the last dropped seq."""

    def __init__(self, log_base: int) -> None:
        super().__init__(f"events up to seq {log_base} are no longer in memory")
        self.log_base = log_base


class EventLog:
    """The events with ``seq > base`` in order (``events``), and the readers they go to.

    ``loop`` is given by :meth:`start`; readers can only attach after it. ``last_emit`` is the loop
    time anything (a keepalive included) last went out, which the watchdog's keepalive timing reads.
    """

    __slots__ = ("_abandoned", "_answered_waiter", "_clients", "_grace", "_grace_timer", "_persisted", "_readers",
                 "answered", "base", "events", "finished", "last_emit", "loop", "seq")

    loop: asyncio.AbstractEventLoop

    def __init__(self, *, grace: float, persistent: bool, abandoned: Callable[[], None]) -> None:
        self.events: list[Event] = []
        self.base = 0
        self.seq = 0
        self.finished = False  # the terminal event was emitted
        self.answered = False  # an upstream answered with its headers (see answered_or_finished)
        self._answered_waiter: asyncio.Future[None] | None = None
        self.last_emit = 0.0
        # Events up to this seq are safe elsewhere (an event store) and may be dropped from memory.
        self._persisted = 0 if persistent else _NO_PERSISTENCE
        self._readers: set[Reader] = set()
        self._clients = 0  # readers that are clients (not the event store)
        self._grace = grace
        self._grace_timer: asyncio.TimerHandle | None = None
        self._abandoned = abandoned

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.last_emit = loop.time()

    # ------------------------------------------------------------------ writing

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Log the next event and wake every reader."""
        self.seq += 1
        events = self.events
        events.append(Event(self.seq, name, data))
        self.last_emit = self.loop.time()
        for reader in self._readers:
            reader.wake()
        if len(events) > _TRIM_AT:
            self._trim()

    def keepalive(self) -> None:
        """Have every client reader's next read return :data:`KEEPALIVE` unless an event comes first."""
        self.last_emit = self.loop.time()
        for reader in self._readers:
            if reader.client:
                reader.keepalive = True
                reader.wake()

    def finish(self, name: str, data: dict[str, Any]) -> bool:
        """Emit the terminal event (``done`` or ``error``) unless there was one; True if this was it."""
        if self.finished:
            return False
        self.finished = True
        self._cancel_grace()
        self.emit(name, data)
        self._wake_answered()
        return True

    def mark_answered(self) -> None:
        """An attempt's upstream sent its response headers (once per stream is what matters)."""
        if not self.answered:
            self.answered = True
            self._wake_answered()

    async def answered_or_finished(self, within: float) -> None:
        """Wait until an upstream answered its headers or the stream ended, at most ``within`` s."""
        if self.answered or self.finished:
            return
        if self._answered_waiter is None:
            self._answered_waiter = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._answered_waiter), within)
        except TimeoutError:
            pass

    def _wake_answered(self) -> None:
        waiter = self._answered_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ reading

    def after(self, seq: int) -> list[Event]:
        """The logged events with ``seq > after`` still in memory."""
        return self.events[max(0, seq - self.base) :]

    def attach(self, reader: R) -> R:
        """Start delivering to ``reader``; raises :class:`EventsDropped` if it wants events gone from memory."""
        if reader.next_seq - 1 < self.base:
            raise EventsDropped(self.base)
        self._readers.add(reader)
        if reader.client:
            self._clients += 1
            self._cancel_grace()
        return reader

    def detach(self, reader: Reader) -> None:
        if reader not in self._readers:
            return
        self._readers.discard(reader)
        if not reader.client:
            return
        self._clients -= 1
        if self._clients or self.finished:
            return
        if self._grace > 0:
            self._grace_timer = self.loop.call_later(self._grace, self._grace_expired)
        else:
            self._abandoned()

    def mark_persisted(self, seq: int) -> None:
        """Events up to ``seq`` are in the store; memory may drop them once every reader has them."""
        self._persisted = max(self._persisted, seq)
        self._trim()

    def _trim(self) -> None:
        if not self._readers:
            return  # nobody has read anything yet
        keep_from = self._persisted
        for reader in list(self._readers):
            if reader.client and self.seq - reader.next_seq >= MAX_CLIENT_LAG:
                self._cut(reader)
                continue
            keep_from = min(keep_from, reader.next_seq - 1)
        drop = keep_from - self.base
        if drop > 0:
            del self.events[:drop]
            self.base += drop

    def _cut(self, reader: Reader) -> None:
        """Stop keeping events for a client reader that fell too far behind; it ends at its next read."""
        reader.next_seq = _CUT
        self.detach(reader)
        reader.wake()

    def _grace_expired(self) -> None:
        self._grace_timer = None
        if not self._clients:
            self._abandoned()

    def _cancel_grace(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None


class Reader:
    """One reader's cursor into an :class:`EventLog`. Iterate it; :meth:`close` when done.

    Iteration ends after the terminal event. ``client`` readers also get keepalives; the event store
    is not a client (its leaving does not start the grace period).
    """

    __slots__ = ("_waiter", "client", "keepalive", "log", "next_seq")

    def __init__(self, log: EventLog, after: int, client: bool) -> None:
        self.log = log
        self.next_seq = after + 1
        self.client = client
        self.keepalive = False
        self._waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> Event:
        log = self.log
        while True:
            index = self.next_seq - log.base - 1
            if index < len(log.events):
                self.next_seq += 1
                self.keepalive = False  # a real event makes a pending keepalive moot
                return log.events[index]
            if self.keepalive:
                self.keepalive = False
                return KEEPALIVE
            if log.finished or self.next_seq == _CUT:
                raise StopAsyncIteration
            self._waiter = log.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def pending(self) -> list[Event]:
        """Take every event available now without waiting (for batching readers)."""
        log = self.log
        events = log.events[self.next_seq - log.base - 1 :]
        if events:
            self.next_seq += len(events)
            self.keepalive = False  # as in iteration: a real event makes a pending keepalive moot
        return events

    def close(self) -> None:
        """Stop reading. The last client leaving starts the log's grace period."""
        self.log.detach(self)
