"""Resumable streams: an event log any worker can replay, and live events across workers.

Writing. Each resumable stream is *tracked* by this process's :class:`Journal`: one task per
process (not per stream, not per chunk) that every ``FLUSH_INTERVAL`` takes the new events of
the tracked streams that are due -- a stream some other worker is resuming (listening to) or one
that has finished every time, any other one every ``QUIET_FLUSH_INTERVAL`` -- and writes them to
the Django cache ``RESUME.CACHE`` in a single ``set_many`` (one thread hop and, with Redis, one
round trip for all streams -- one ``SET ... EX`` per key with Django's ``RedisCache``, see
:func:`chatproxy.cachecalls.set_many`; no hop for an in-process cache), with ``TTL``. A batch is stored as
one JSON byte string, which costs the cache next to nothing to pickle. Keys, for stream ``S``::

    chatproxy:s:S          meta: owner, model, keepalive, created and deadline (epoch); rewritten every TTL/4
    chatproxy:s:S:N        batch N (0, 1, 2, ...): JSON [[seq, name, data], ...]
    chatproxy:s:S:listen   set by a resuming worker: publish S's batches on the channel layer
    chatproxy:s:S:cancel   set by a cancelling worker: stop S

Every ``CONTROL_INTERVAL`` the journal reads the listen/cancel flags of all its streams in one
``get_many``. Batches of streams someone listens to are also sent to the Channels group
``chatproxy.s.S`` so a client resumed on another worker gets them live; while the flag is set, the
stream counts that client as its own (no grace period runs), and the resuming worker deletes the
flag when its client leaves.

While the cache is unreachable (Redis down) the journal keeps each stream's unwritten batches
(and the events themselves stay in the stream's memory, which only drops what the store has) and
retries every :data:`RETRY_INTERVAL`; once the cache answers again everything kept is written in
order, the metas included (a restarted Redis may have lost them). Meanwhile :func:`open_replay`
and :func:`cancel` raise :class:`JournalUnavailable` (answered 503) unless the stream runs in this
process, and a replay already under way waits for the store. The outage is logged once
(:mod:`chatproxy.outage`), not per flush.

Reading. :func:`replay` yields the events after a given seq, then live ones until the end:
from the stream itself when it runs in this process (no latency), else from the store plus the
channel layer, re-reading the store whenever a seq gap shows a batch was missed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatproxy import cachecalls, outage
from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config
from chatproxy.core import KEEPALIVE, ChatStream, Event, EventsDropped, Subscription

logger = logging.getLogger("chatproxy.resume")

FLUSH_INTERVAL = 0.1  # seconds between journal runs (also the cross-worker live latency)
# A stream nobody resumes elsewhere is written at most this often (it ends sooner, once finished).
# Its client reads memory, not the store: a longer interval means fewer, larger cache writes.
QUIET_FLUSH_INTERVAL = 0.5
CONTROL_INTERVAL = 0.5  # seconds between reads of listen/cancel flags
RETRY_INTERVAL = 0.5  # seconds between two writes of the journal while the cache is unreachable
#: ``Retry-After`` (seconds) of a resume or cancel refused while the cache is unreachable.
UNAVAILABLE_RETRY_AFTER = 2
TERMINAL = ("done", "error")


class StreamNotFound(Exception):
    """Unknown, expired, or someone else's stream (the same answer, so ids leak nothing)."""


class JournalUnavailable(Exception):
    """The store (``RESUME.CACHE``) is unreachable and the stream does not run here: answer 503."""

    message = "Resuming is briefly unavailable. Please try again in a moment."
    retry_after = UNAVAILABLE_RETRY_AFTER


def meta_key(stream_id: str) -> str:
    return f"chatproxy:s:{stream_id}"


def batch_key(stream_id: str, index: int) -> str:
    return f"chatproxy:s:{stream_id}:{index}"


def flag_key(stream_id: str, flag: str) -> str:
    return f"chatproxy:s:{stream_id}:{flag}"


def group_name(stream_id: str) -> str:
    return f"chatproxy.s.{stream_id}"


def owner_of(user: Any) -> str:
    """Who may resume or cancel: the user's pk, or "anon" (the 128-bit stream id is the secret)."""
    if user is not None and getattr(user, "is_authenticated", False):
        return f"u:{user.pk}"
    return "anon"


def _cache() -> Any:
    return cachecalls.cache(get_config()["RESUME"]["CACHE"])


def _outage() -> outage.Outage:
    return outage.of_cache(get_config()["RESUME"]["CACHE"])


def _ttl() -> int:
    return int(get_config()["RESUME"]["TTL"])


def _encode(events: list[Event]) -> bytes:
    return orjson.dumps([[e.seq, e.name, e.data] for e in events])


def _decode(batch: bytes) -> list[Event]:
    return [Event(seq, name, data) for seq, name, data in orjson.loads(batch)]


def _channel_layer() -> Any:
    try:
        from channels.layers import get_channel_layer

        return get_channel_layer()
    except Exception:  # no CHANNEL_LAYERS configured: single-process only
        return None


@dataclass(eq=False)
class _Tracked:
    stream: ChatStream
    reader: Subscription
    meta: dict[str, Any]
    batches: int = 0
    listened: bool = False
    unsent: dict[str, Any] = field(default_factory=dict)  # writes of this stream not yet in the store
    unsent_seq: int = 0  # the last seq in ``unsent``
    # While another worker relays the stream to a client, this client reader stands for that one
    # here, so the grace period does not stop the stream under it (advanced by every flush).
    relayed: Subscription | None = None
    meta_written: float = 0.0  # monotonic time of the last meta write
    flushed_at: float = 0.0  # monotonic time of the last batch write


class _InProcessExpiry:
    """The journal's keys in an in-process cache, deleted once their TTL has passed.

    Django's ``LocMemCache`` drops an expired entry only when that key is read again or when the
    cache is full (``MAX_ENTRIES``, then in LRU order, live streams' events included): left to it, the
    journal's batches of finished streams would pile up to ``MAX_ENTRIES`` and the process grow with
    them. Each write is noted with its expiry (the latest one per key: a rewritten meta lives on);
    :meth:`sweep` deletes what is due, a deque head check when nothing is.
    """

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._queue: collections.deque[tuple[float, list[str]]] = collections.deque()

    def wrote(self, keys: list[str], ttl: float) -> None:
        due = time.time() + ttl
        for key in keys:
            self._due[key] = due
        self._queue.append((due, keys))

    def sweep(self, cache: Any) -> None:
        now = time.time()
        queue, latest = self._queue, self._due
        expired: list[str] = []
        while queue and queue[0][0] <= now:
            due, keys = queue.popleft()
            for key in keys:
                if latest.get(key) == due:
                    del latest[key]
                    expired.append(key)
        if expired:
            cache.delete_many(expired)


class Journal:
    """This process's writer of stream events to the store (one per event loop)."""

    def __init__(self) -> None:
        self.tracked: dict[str, _Tracked] = {}
        self._task: asyncio.Task[None] | None = None
        self._next_control = 0.0
        self.expiry = _InProcessExpiry()

    def track(self, stream: ChatStream, owner: str, extra: Mapping[str, Any] | None = None) -> None:
        meta = {
            **(extra or {}),
            "owner": owner,
            "model": stream.request.model,
            "keepalive": stream.policy.keepalive,
            "created": time.time(),
            "deadline": time.time() + stream.policy.deadline + 5.0,
        }
        reader = stream.subscribe(client=False)
        self.tracked[stream.stream_id] = _Tracked(stream, reader, meta, meta_written=time.monotonic())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="chatproxy-journal")

    async def idle(self) -> None:
        """Return once no stream is tracked any more: every one ended and was written out."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    def local_meta(self, stream_id: str) -> dict[str, Any] | None:
        """The meta of a stream this process tracks (what :func:`stream_meta` reads from the store)."""
        tracked = self.tracked.get(stream_id)
        return tracked.meta if tracked is not None else None

    def local(self, stream_id: str) -> ChatStream | None:
        tracked = self.tracked.get(stream_id)
        return tracked.stream if tracked is not None else None

    async def _run(self) -> None:
        pause = FLUSH_INTERVAL
        try:
            while self.tracked:
                await asyncio.sleep(pause)
                try:
                    await self.flush()
                except Exception as exc:  # the cache is unreachable: kept, retried (see the module)
                    _outage().failed(exc)
                    self._outlived()
                    pause = RETRY_INTERVAL
                else:
                    _outage().ok()
                    pause = FLUSH_INTERVAL
        finally:
            self._task = None

    async def flush(self) -> None:
        now = time.monotonic()
        if now >= self._next_control:
            self._next_control = now + CONTROL_INTERVAL
            await self._read_flags()
        ttl = _ttl()
        refresh_before = now - ttl / 4  # the meta must outlive a stream longer than TTL
        writes: dict[str, Any] = {}
        published: list[tuple[_Tracked, bytes]] = []
        ended: list[_Tracked] = []
        quiet_before = now - QUIET_FLUSH_INTERVAL
        writers: list[_Tracked] = []
        for tracked in list(self.tracked.values()):
            finished = tracked.stream.finished
            if not (tracked.listened or finished or tracked.flushed_at <= quiet_before or tracked.unsent):
                continue
            events = tracked.reader.pending()
            stream_id = tracked.stream.stream_id
            if tracked.meta_written < refresh_before:
                tracked.unsent[meta_key(stream_id)] = tracked.meta
                tracked.meta_written = now
            if tracked.relayed is not None:
                tracked.relayed.pending()  # keeps nothing in memory for it
            if events:
                tracked.flushed_at = now
                batch = _encode(events)
                tracked.unsent[batch_key(stream_id, tracked.batches)] = batch
                tracked.unsent_seq = events[-1].seq
                tracked.batches += 1
                published.append((tracked, batch))
            if tracked.unsent:
                writes.update(tracked.unsent)
                writers.append(tracked)
            elif finished:
                ended.append(tracked)
        cache = _cache()
        if cachecalls.in_process(cache):
            self.expiry.sweep(cache)
        if writes:
            await cachecalls.run(cache, cachecalls.set_many, cache, writes, ttl)  # raises while the cache is down
            if cachecalls.in_process(cache):
                self.expiry.wrote(list(writes), ttl)
            for tracked in writers:
                tracked.unsent.clear()
                tracked.stream.mark_persisted(tracked.unsent_seq)
        layer = _channel_layer() if any(t.listened for t, _ in published) else None
        for tracked, batch in published:
            if layer is not None and tracked.listened:
                message = {"type": "chatproxy.events", "batch": batch}
                await layer.group_send(group_name(tracked.stream.stream_id), message)
        for tracked in ended:
            tracked.reader.close()
            if tracked.relayed is not None:
                tracked.relayed.close()
            del self.tracked[tracked.stream.stream_id]

    def _outlived(self) -> None:
        """After a failed write: every meta is written again once the store is back (a restarted
        Redis may have lost them), and a finished stream whose events would have expired from the
        store by now is forgotten (so a long outage cannot make the journal grow without end)."""
        expired_before = time.time() - _ttl()
        for stream_id, tracked in list(self.tracked.items()):
            tracked.meta_written = -math.inf
            if tracked.stream.finished and tracked.meta["deadline"] < expired_before:
                tracked.reader.close()
                del self.tracked[stream_id]

    async def _read_flags(self) -> None:
        cache = _cache()
        if cachecalls.in_process(cache):
            return  # no other process sees this cache: cancels here go to the stream directly
        keys = []
        for stream_id in self.tracked:
            keys += [flag_key(stream_id, "listen"), flag_key(stream_id, "cancel")]
        if not keys:
            return
        flags = await cachecalls.run(cache, cache.get_many, keys)
        for stream_id, tracked in self.tracked.items():
            tracked.listened = listened = flag_key(stream_id, "listen") in flags
            if listened and tracked.relayed is None and not tracked.stream.finished:
                tracked.relayed = tracked.stream.subscribe(tracked.stream.last_seq)
            elif not listened and tracked.relayed is not None:
                tracked.relayed.close()  # the relaying client left: the grace period starts
                tracked.relayed = None
            if flag_key(stream_id, "cancel") in flags:
                tracked.stream.cancel()


_journals: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Journal] = weakref.WeakKeyDictionary()


def journal() -> Journal:
    loop = asyncio.get_running_loop()
    found = _journals.get(loop)
    if found is None:
        found = _journals[loop] = Journal()
    return found


async def track(stream: ChatStream, user: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Make ``stream`` resumable: its meta (with ``extra``'s entries) is written now, its events as they come."""
    j = journal()
    j.track(stream, owner_of(user), extra)
    cache = _cache()
    tracked = j.tracked[stream.stream_id]
    try:
        _outage().check()
        await cachecalls.run(cache, cache.set, meta_key(stream.stream_id), tracked.meta, _ttl())
    except Exception as exc:  # the cache is unreachable: the stream runs, its meta is written once it is back
        _outage().failed(exc)
        tracked.meta_written = -math.inf
    else:
        _outage().ok()
        if cachecalls.in_process(cache):
            j.expiry.wrote([meta_key(stream.stream_id)], _ttl())


async def _cache_call(func: Any, *args: Any) -> Any:
    """``func(*args)`` on the store; raises :class:`JournalUnavailable` while it is unreachable."""
    try:
        _outage().check()
        result = await cachecalls.run(_cache(), func, *args)
    except Exception as exc:
        _outage().failed(exc)
        raise JournalUnavailable() from exc
    _outage().ok()
    return result


async def stream_meta(stream_id: str, user: Any) -> dict[str, Any]:
    """The meta of ``user``'s stream (``model``, ``created`` ...). Raises StreamNotFound."""
    return await _meta_for(stream_id, user)


async def _meta_for(stream_id: str, user: Any) -> dict[str, Any]:
    """The meta of ``user``'s stream; raises StreamNotFound, or JournalUnavailable while the store is
    unreachable (a stream running in this process is answered from memory then)."""
    if not (stream_id.isascii() and stream_id.isalnum()) or len(stream_id) > 64:
        raise StreamNotFound(stream_id)
    cache = _cache()
    try:
        meta: dict[str, Any] | None = await _cache_call(cache.get, meta_key(stream_id))
    except JournalUnavailable:
        tracked = journal().tracked.get(stream_id)
        if tracked is None:
            raise
        meta = tracked.meta
    if meta is None or meta.get("owner") != owner_of(user):
        raise StreamNotFound(stream_id)
    return dict(meta)


async def cancel(stream_id: str, user: Any) -> None:
    """Stop a stream of ``user``'s, wherever it runs. Raises StreamNotFound."""
    await _meta_for(stream_id, user)
    local = journal().local(stream_id)
    if local is not None:
        local.cancel()
    else:
        await _cache_call(_cache().set, flag_key(stream_id, "cancel"), 1, _ttl())


async def _stored_events(stream_id: str, after: int, first_batch: int = 0) -> tuple[list[Event], int]:
    """Events with seq > after from the store (batches ``first_batch``, ``first_batch + 1``, ...
    up to the first one missing), and the index of that missing batch."""
    cache = _cache()
    events: list[Event] = []
    index, step = first_batch, 8
    while True:
        keys = [batch_key(stream_id, i) for i in range(index, index + step)]
        found = await cachecalls.run(cache, cache.get_many, keys)
        for key in keys:
            batch = found.get(key)
            if batch is None:
                return events, index
            events += [e for e in _decode(batch) if e.seq > after]
            index += 1
        step = min(step * 4, 512)


async def events_so_far(stream_id: str, user: Any) -> list[Event]:
    """The events ``user``'s stream has emitted by now, without waiting. Raises StreamNotFound, or
    JournalUnavailable while the store is unreachable.

    A stream running in this process is read from memory (what memory dropped is in the store); one
    elsewhere from the store, which lags its live events by at most ``QUIET_FLUSH_INTERVAL``.
    """
    await _meta_for(stream_id, user)
    local = journal().local(stream_id)
    memory = local.events_after(0) if local is not None else []
    if memory and memory[0].seq == 1:
        return memory
    try:
        stored, _ = await _stored_events(stream_id, 0)
    except Exception as exc:
        _outage().failed(exc)
        raise JournalUnavailable() from exc
    if memory:
        stored = [e for e in stored if e.seq < memory[0].seq] + memory
    return stored


async def open_replay(stream_id: str, user: Any, after: int) -> AsyncIterator[Event]:
    """The events of ``user``'s stream after seq ``after``, then live ones (and keepalives).

    Raises :class:`StreamNotFound` here, before any event, for an unknown, expired or foreign id.
    """
    meta = await _meta_for(stream_id, user)
    local = journal().local(stream_id)
    if local is not None:
        return await _open_local(local, stream_id, after)
    return _replay_remote(stream_id, after, meta)


async def _open_local(stream: ChatStream, stream_id: str, after: int) -> AsyncIterator[Event]:
    """The replay of a stream of this process: what memory no longer holds is read from the store
    now, before any event (so an unreachable store is a JournalUnavailable, not a cut stream)."""
    stored: list[Event] = []
    try:
        reader = stream.subscribe(after)
    except EventsDropped as dropped:
        # Subscribe at once (no await in between, so this cannot fail): the subscription keeps the
        # events after log_base in memory while the older ones, already stored, are read back.
        reader = stream.subscribe(dropped.log_base)
        try:
            found, _ = await _stored_events(stream_id, after)
        except Exception as exc:
            reader.close()
            _outage().failed(exc)
            raise JournalUnavailable() from exc
        stored = [event for event in found if event.seq <= dropped.log_base]
    return _replay_local(stored, reader)


async def _replay_local(stored: list[Event], reader: Subscription) -> AsyncIterator[Event]:
    try:
        for event in stored:
            yield event
        async for event in reader:
            yield event
    finally:
        reader.close()


async def _next_events(
    layer: Any, channel: str | None, poll: float, stream_id: str, last: int, batches: int
) -> tuple[list[Event], int]:
    """The events after ``last`` that came live (within ``poll`` seconds) or, on a gap or none, from the
    store; and the index of the first batch not yet read from the store."""
    batch = None
    if channel is not None:
        with contextlib.suppress(TimeoutError):
            message = await asyncio.wait_for(layer.receive(channel), poll)
            batch = message.get("batch")
    else:
        await asyncio.sleep(FLUSH_INTERVAL)
    events = _decode(batch) if batch else []
    if not events or events[0].seq > last + 1:
        # Nothing live, or a gap: the store has whatever was written meanwhile.
        stored, batches = await _stored_events(stream_id, last, max(0, batches - 1))
        newest = stored[-1].seq if stored else last
        events = stored + [e for e in events if e.seq > newest]
    return events, batches


async def _replay_remote(stream_id: str, after: int, meta: dict[str, Any]) -> AsyncIterator[Event]:
    cache = _cache()
    layer = _channel_layer()
    channel = await layer.new_channel() if layer is not None else None
    group = group_name(stream_id)
    if channel is not None:
        await layer.group_add(group, channel)
        await cachecalls.run(cache, cache.set, flag_key(stream_id, "listen"), 1, _ttl())
    last = after
    try:
        stored, batches = await _stored_events(stream_id, after)
        for event in stored:
            if event.seq > last:
                last = event.seq
                yield event
                if event.name in TERMINAL:
                    return
        loop = asyncio.get_running_loop()
        keepalive = float(meta.get("keepalive", 10.0))
        poll = min(keepalive, CONTROL_INTERVAL)
        quiet_since = loop.time()
        while time.time() < meta["deadline"]:
            try:
                events, batches = await _next_events(layer, channel, poll, stream_id, last, batches)
            except Exception as exc:  # the store or the layer is unreachable: wait for it, keep the client
                _outage().failed(exc)
                events = []
                await asyncio.sleep(RETRY_INTERVAL)
            else:
                _outage().ok()
            fresh = [e for e in events if e.seq > last]
            if not fresh:
                if loop.time() - quiet_since >= keepalive:
                    quiet_since = loop.time()
                    yield KEEPALIVE
                continue
            quiet_since = loop.time()
            for event in fresh:
                last = event.seq
                yield event
                if event.name in TERMINAL:
                    return
        yield Event(last + 1, "error", {"code": ErrorCode.UPSTREAM_UNAVAILABLE})
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await layer.group_discard(group, channel)
            with contextlib.suppress(Exception):
                # The origin stops counting this client (another relaying worker sets it again).
                await cachecalls.run(cache, cache.delete, flag_key(stream_id, "listen"))
