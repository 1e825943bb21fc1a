"""Glue between Django settings and the stream core: the shared upstreams, fallback targets, new streams.

Adapters hold connection pools bound to one event loop, so one adapter is kept per running loop
(Daphne and uvicorn run one loop per process; tests may run several in turn). The cache is
dropped when ``CHATPROXY`` changes.

When the server stops, :func:`shut_down` first lets the answers in flight finish (:func:`drain`,
at most ``RESUME.DRAIN`` seconds in all): the responses being sent, on their own connections
(:mod:`chatproxy.inflight`), and the resumable streams still running (a client cut off anyway
resumes on another worker from the journal); then it closes the adapter's sessions
(:func:`close_upstreams`). It runs through the ASGI lifespan protocol where the server speaks it
(uvicorn, Hypercorn: route ``"lifespan"`` to :class:`chatproxy.asgi.Lifespan`; uvicorn first waits
for open connections itself), and under Daphne, which does not, through a Twisted reactor
"before shutdown" trigger (:func:`hook_reactor_shutdown`): it tells :mod:`chatproxy.inflight` that
the server is stopping, stops listening for new connections, and the reactor closes the open
connections and stops only once :func:`shut_down` is done. Left open, aiohttp reports each session
as an ``Unclosed client session`` (and its connector fails in ``__del__``) while the interpreter exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import weakref
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from chatproxy import circuit, fallbacks, inflight, limits, profiles, records, signals
from chatproxy.codes import ErrorCode
from chatproxy.conf import Policy, get_config, upstream_settings
from chatproxy.core import ChatRequest, ChatStream, Subscription, Target
from chatproxy.errors import ConfigurationError
from chatproxy.stream.values import DEFAULT_UPSTREAM
from chatproxy.upstream import build_named_upstream, build_upstream
from chatproxy.upstream.base import Upstream

logger = logging.getLogger("chatproxy.service")

class StreamNotStarted(Exception):
    """The stream could not start for a reason on chatproxy's side (the upstream cannot be built
    from the settings). Logged with the cause where it is raised; the client gets ``code`` and its
    friendly message only."""

    code = ErrorCode.INTERNAL


_upstreams: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Upstream]] = weakref.WeakKeyDictionary()


def get_upstream(name: str = DEFAULT_UPSTREAM) -> Upstream:
    """The adapter for the running loop of the upstream ``name``: ``CHATPROXY["UPSTREAM"]`` for
    ``"default"``, else that entry of ``CHATPROXY["UPSTREAMS"]`` (KeyError if there is none).
    Raises :class:`~chatproxy.errors.ConfigurationError` when its settings cannot work."""
    loop = asyncio.get_running_loop()
    adapters = _upstreams.get(loop)
    if adapters is None:
        adapters = _upstreams[loop] = {}
        hook_reactor_shutdown(loop)
    upstream = adapters.get(name)
    if upstream is None:
        conf = upstream_settings(name)
        if name == DEFAULT_UPSTREAM:
            upstream = build_upstream(sdk=conf["SDK"], http_client=conf["HTTP_CLIENT"], base_url=conf["BASE_URL"],
                                      api_key=conf["API_KEY"])
        else:
            upstream = build_named_upstream(name, conf)
        adapters[name] = upstream
    return upstream


async def drain(seconds: float) -> int:
    """Wait (at most ``seconds`` in all) until this loop's responses in flight have been sent
    (:func:`chatproxy.inflight.finish`, which then cancels the late ones) and its resumable streams
    have ended and been written out; returns how many responses and streams were running."""
    from chatproxy import resume

    journal = resume.journal()
    responses, streams = inflight.in_flight(), len(journal.tracked)
    if not (responses or streams):
        return 0
    logger.warning("chatproxy: stopping; letting %d response(s) and %d resumable stream(s) finish "
                   "(RESUME.DRAIN %.0f s)", responses, streams, seconds)
    deadline = asyncio.get_running_loop().time() + seconds
    _, cut = await inflight.finish(seconds)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await journal.idle()
    if cut or journal.tracked:
        logger.warning("chatproxy: %d response(s) and %d stream(s) still running after RESUME.DRAIN; "
                       "stopping them", cut, len(journal.tracked))
    return responses + streams


async def shut_down() -> None:
    """At server shutdown: :func:`drain` the answers in flight, then :func:`close_upstreams`."""
    inflight.begin()
    await drain(float(get_config()["RESUME"].get("DRAIN", 0.0)))
    await close_upstreams()


async def close_upstreams() -> None:
    """Close the running loop's upstream adapters (their HTTP sessions and pools); at server shutdown.

    The next stream on this loop, if any, builds new ones. Never raises: the server is stopping.
    """
    adapters = _upstreams.pop(asyncio.get_running_loop(), None) or {}
    for upstream in adapters.values():
        try:
            await upstream.aclose()
        except Exception:
            logger.warning("chatproxy could not close the upstream %s cleanly", upstream.name, exc_info=True)


_reactor_hooked: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def hook_reactor_shutdown(loop: asyncio.AbstractEventLoop) -> None:
    """Under Daphne (a Twisted reactor running ``loop``): at the reactor's shutdown, tell
    :mod:`chatproxy.inflight` the server is stopping (at once, in the trigger itself) and run
    :func:`shut_down` before the reactor closes the connections and stops the loop. Once per loop;
    nothing elsewhere: lifespan servers use :class:`chatproxy.asgi.Lifespan`."""
    if loop in _reactor_hooked:
        return
    module = sys.modules.get("twisted.internet.reactor")
    if module is None:
        return
    reactor: Any = module
    if not (getattr(reactor, "running", False) and getattr(reactor, "_asyncioEventloop", None) is loop):
        return
    from twisted.internet import defer

    def stop() -> Any:
        inflight.begin(loop)
        _stop_listening(reactor)
        return defer.Deferred.fromFuture(loop.create_task(shut_down()))

    with contextlib.suppress(Exception):  # a reactor that is already shutting down takes no trigger
        reactor.addSystemEventTrigger("before", "shutdown", stop)
        _reactor_hooked.add(loop)


def _stop_listening(reactor: Any) -> None:
    """Close the reactor's listening ports (Daphne's) as the drain begins, as uvicorn does: the
    reactor would close them only once the drain is over. A new connection is then refused (a
    proxy sends it to another worker), or waits for another process that listens on the same
    socket (one passed in with ``--fd``, systemd socket activation)."""
    from twisted.internet.interfaces import IListeningPort

    for reader in reactor.getReaders():
        if IListeningPort.providedBy(reader):
            try:
                reader.stopListening()
            except Exception:  # the server is stopping anyway: its listening port closes with the reactor
                logger.warning("chatproxy could not stop listening on %r", reader, exc_info=True)


def forget_upstreams(**kwargs: Any) -> None:
    """Drop cached adapters (``setting_changed`` receiver). Their pools close with their loop."""
    if kwargs.get("setting") in (None, "CHATPROXY"):
        _upstreams.clear()
        _left_out.clear()


#: Fallback targets already reported as left out (their upstream cannot be built).
_left_out: set[str] = set()


def fallback_targets(request: ChatRequest, policy: Policy, options: dict[str, Any] | None) -> list[Target]:
    """The fallback targets of ``request`` (:func:`chatproxy.fallbacks.chain`), each with the
    policy of its own model's profile. One whose upstream cannot be built is left out (and logged
    once; system check ``chatproxy.E013`` says why first)."""
    targets = []
    for name in fallbacks.chain(request.model, policy):
        try:
            upstream = get_upstream(name.upstream)
            extra_body = request.extra_body if name.upstream == DEFAULT_UPSTREAM else (
                upstream_settings(name.upstream)["EXTRA_BODY"] or {})
        except ConfigurationError as exc:
            if name.label not in _left_out:  # once per process: the system checks say it at start-up too
                _left_out.add(name.label)
                logger.error("fallback target %s is left out: %s", name.label, exc)
            continue
        targets.append(Target(upstream, replace(request, model=name.model, extra_body=extra_body),
                              profiles.resolve_policy(name.model, options), name.upstream, name.label))
    return targets


async def open_stream(
    request: ChatRequest,
    *,
    user: Any = None,
    allow_reset: bool = True,
    resumable: bool = False,
    background: bool = False,
    options: dict[str, Any] | None = None,
    who: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Subscription:
    """Start a :class:`ChatStream` for ``user``'s ``request``; returns its first client's reader.

    The reader exists before any event does, so it sees them all (``reader.stream`` is the
    stream; closing the reader is how the client leaves).

    ``resumable``: its events are journaled (``RESUME.CACHE``) so the owner can replay them from
    any worker, and when its last client leaves it keeps generating for ``RESUME.GRACE`` seconds
    waiting for a resume. Otherwise the stream stops as soon as its client leaves.
    ``background`` (with ``resumable``): it keeps generating to its end whether or not a client
    reads it (its ``DEADLINE`` still bounds it).

    ``who`` is the identity string the stream counts against (:func:`chatproxy.limits.identity_of`;
    default: ``user``'s identity). Raises :class:`chatproxy.limits.LimitExceeded` (answer 429) before
    anything starts when a limit is reached; the lease taken is given back when the stream ends.
    Raises :class:`StreamNotStarted` when the settings name an upstream that cannot be built.
    ``meta``: more of what a resume must know that the events do not say (kept in the journal's
    meta of a resumable stream, read back by :func:`chatproxy.resume.stream_meta`).
    """
    await profiles.arefresh()  # at most one cache read; a query only after a profile changed
    policy = profiles.resolve_policy(request.model, options)
    grace = float(get_config()["RESUME"]["GRACE"]) if resumable else 0.0
    if background and resumable:
        grace = max(grace, policy.deadline)  # the deadline ends the stream before the grace would
    slot = await limits.aadmit(who or limits.identity(user, None), policy.deadline + grace + limits.SLOT_MARGIN)
    try:
        try:
            upstream = get_upstream()
        except ConfigurationError as exc:
            logger.error("chatproxy cannot build its upstream: %s", exc)
            raise StreamNotStarted from exc
        targets = fallback_targets(request, policy, options)
        stream = ChatStream(
            upstream, request, policy, allow_reset=allow_reset, grace=grace, persistent=resumable,
            on_finish=functools.partial(_finished, user, slot), on_retry=_retried,
            fallbacks=targets, breaker=circuit.get_breaker() if targets else None,
        )
    except BaseException:
        slot.release()
        raise
    reader = stream.subscribe()  # before any event exists, so the first client sees them all
    signals.send(signals.stream_started, stream, user=user)
    if resumable:
        from chatproxy import resume

        await resume.track(stream, user, meta)
    return reader


def _retried(stream: ChatStream, reason: str, attempt: int, delay: float) -> None:
    signals.send(signals.stream_retry, stream, attempt=attempt, reason=reason, delay=delay)


def _finished(user: Any, slot: limits.Slot, stream: ChatStream) -> None:
    # In the stream's pump task, after its last event: free the slot, queue the record, dispatch the signal.
    slot.release()
    records.record_stream(stream, user)
    signals.send(signals.stream_finished, stream, user=user, stats=stream.stats)
