"""Glue between Django settings and the stream core: the shared upstream and new streams.

Adapters hold connection pools bound to one event loop, so one adapter is kept per running loop
(Daphne and uvicorn run one loop per process; tests may run several in turn). The cache is
dropped when ``CHATPROXY`` changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from typing import Any

from chatproxy import limits, profiles, records, signals
from chatproxy.codes import ErrorCode
from chatproxy.conf import get_config, upstream_api_key
from chatproxy.core import ChatRequest, ChatStream, Subscription
from chatproxy.errors import ConfigurationError
from chatproxy.upstream import build_upstream
from chatproxy.upstream.base import Upstream

logger = logging.getLogger("chatproxy.service")

class StreamNotStarted(Exception):
    """The stream could not start for a reason on chatproxy's side (the upstream cannot be built
    from the settings). Logged with the cause where it is raised; the client gets ``code`` and its
    friendly message only."""

    code = ErrorCode.INTERNAL


_upstreams: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Upstream] = weakref.WeakKeyDictionary()


def get_upstream() -> Upstream:
    """The upstream adapter for the running loop, built from ``CHATPROXY["UPSTREAM"]``."""
    loop = asyncio.get_running_loop()
    upstream = _upstreams.get(loop)
    if upstream is None:
        conf = get_config()["UPSTREAM"]
        upstream = build_upstream(
            sdk=conf["SDK"],
            http_client=conf["HTTP_CLIENT"],
            base_url=conf["BASE_URL"],
            api_key=upstream_api_key(),
        )
        _upstreams[loop] = upstream
    return upstream


def forget_upstreams(**kwargs: Any) -> None:
    """Drop cached adapters (``setting_changed`` receiver). Their pools close with their loop."""
    if kwargs.get("setting") in (None, "CHATPROXY"):
        _upstreams.clear()


async def open_stream(
    request: ChatRequest,
    *,
    user: Any = None,
    allow_reset: bool = True,
    resumable: bool = False,
    background: bool = False,
    options: dict[str, Any] | None = None,
    who: str | None = None,
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
        stream = ChatStream(
            upstream, request, policy, allow_reset=allow_reset, grace=grace, persistent=resumable,
            on_finish=functools.partial(_finished, user, slot), on_retry=_retried,
        )
    except BaseException:
        slot.release()
        raise
    reader = stream.subscribe()  # before any event exists, so the first client sees them all
    signals.send(signals.stream_started, stream, user=user)
    if resumable:
        from chatproxy import resume

        await resume.track(stream, user)
    return reader


def _retried(stream: ChatStream, reason: str, attempt: int, delay: float) -> None:
    signals.send(signals.stream_retry, stream, attempt=attempt, reason=reason, delay=delay)


def _finished(user: Any, slot: limits.Slot, stream: ChatStream) -> None:
    # In the stream's pump task, after its last event: free the slot, queue the record, dispatch the signal.
    slot.release()
    records.record_stream(stream, user)
    signals.send(signals.stream_finished, stream, user=user, stats=stream.stats)
