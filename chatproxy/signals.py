"""chatproxy's signals, all in one place. Connect with ``@receiver(stream_finished)`` as usual.

Every signal is sent with ``sender=ChatStream`` (the class) and these keyword arguments:

``stream_started(stream, user)``
    A stream was accepted and its first attempt is starting. ``stream`` is the
    :class:`~chatproxy.core.ChatStream` (``stream.stream_id``, ``stream.request.model``,
    ``stream.policy``: the resolved timeouts, ``stream.policy.profile``: the profile's name);
    ``user`` is the requesting user (``AnonymousUser`` or ``None`` when there is none).

``stream_retry(stream, attempt, reason, delay)``
    An attempt failed and attempt number ``attempt`` (2, 3, ...) starts after ``delay`` seconds
    (on the same target, or on the next fallback target: the ``retry`` event says which).
    ``reason`` is the ``retry`` event's reason: ``connect``, ``first_token``, ``stall``,
    ``upstream_error``, ``rate_limited`` or ``disconnected``.

``stream_finished(stream, user, stats)``
    The stream ended (``done`` or ``error``). ``stats`` is its
    :class:`~chatproxy.core.StreamStats`: ``attempts``, ``retry_reasons`` (list),
    ``time_to_first_token`` (seconds or None), ``longest_gap``, ``chars_sent``, ``outcome``
    (``"done"`` or the error code), ``duration``, ``model`` (the model that answered, after a
    fallback the fallback's; or the one tried last), ``target`` (its ``"upstream:model"``),
    ``abandoned`` and ``circuits_opened`` (lists of ``"upstream:model"``: the targets given up for
    the next one, the circuits this stream opened). A :class:`~chatproxy.models.StreamRecord` is
    written for it separately, whether or not anyone listens.

Delivery. The signals are sent from the event loop, right after the moment they describe, in a
task of their own (:meth:`~django.dispatch.Signal.asend_robust`), so a receiver never delays or
breaks a stream: synchronous receivers run in a worker thread (they may use the ORM), async
receivers on the loop. A receiver's exception is logged (logger ``django.dispatch``) and
ignored. Signals of one stream are dispatched in order. When nobody listens, sending costs one
dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from django.dispatch import Signal

from chatproxy.core import ChatStream

logger = logging.getLogger("chatproxy.signals")

stream_started = Signal()
stream_retry = Signal()
stream_finished = Signal()

# Strong references to dispatch tasks until they finish (the loop keeps only weak ones).
_tasks: set[asyncio.Task[Any]] = set()


def send(signal: Signal, stream: ChatStream, **kwargs: Any) -> None:
    """Dispatch ``signal`` for ``stream`` in its own task (see the module docstring). Never raises."""
    try:
        if not signal.has_listeners(ChatStream):
            return
        # A fresh context: the dispatch may outlive the request that started the stream.
        task = asyncio.get_running_loop().create_task(
            signal.asend_robust(sender=ChatStream, stream=stream, **kwargs), context=contextvars.Context()
        )
    except Exception:
        logger.exception("could not dispatch a chatproxy signal for stream %s", stream.stream_id)
        return
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
