"""Answers in flight when the server stops: they finish on the connection they started on.

A stopping worker should let the answers it is sending end where their clients read them (the
OpenAI-compatible answers cannot be resumed anywhere else) and take no new ones. uvicorn does the
first by itself: it stops listening and waits for the open connections (``--timeout-graceful-shutdown``
bounds that), and only then sends the lifespan shutdown. Daphne, told to stop, cancels every
application instance at once from a reactor "before shutdown" trigger, and closes the connections
when the reactor's before-phase triggers are all done.

:func:`serve` runs one stream-opening request (the native SSE view, the OpenAI-compatible chat
completions and Responses views: :data:`chatproxy.asgi.DIRECT_ROUTES`) in a task of its own. A
cancellation of the request that comes while the server is stopping (:func:`begin` was called) and
its client is still connected is the server's shutdown: the request goes on to its end, and
:func:`finish` (run by :func:`chatproxy.service.shut_down`, which keeps Daphne's before phase
open) waits for it, at most ``RESUME.DRAIN`` seconds, then cancels what is left. Every other
cancellation is obeyed at once, as before: one while the server is not stopping (Daphne's
``application_close_timeout`` after a disconnect; uvicorn's graceful-shutdown timeout, which runs
out before its lifespan shutdown), or once the client has gone (its ``http.disconnect`` was
received). A client that leaves mid-answer needs no cancellation at all: Django's handler stops
the response when it reads ``http.disconnect``, and the stream closes its upstream then.

Under Daphne :func:`begin` runs inside the reactor's shutdown trigger, in the same pass as
Daphne's own cancelling one, before any cancelled request runs again (a cancellation is delivered
when the task next runs), so every request sees the server stopping by then. While it is stopping
:func:`stopping` is true and the stream-opening requests that still arrive (on connections already
open: the shutdown trigger also closes Daphne's listening ports) are refused with ``503`` by the caller.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds :func:`finish` gives the requests it cancels (``RESUME.DRAIN`` is over) to end.
CANCEL_WAIT = 1.0


@dataclass(eq=False)
class _Loop:
    """One event loop's state: whether its server is stopping, and its requests in flight."""

    stopping: bool = False
    running: set[asyncio.Task[None]] = field(default_factory=set)


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()


def _state(loop: asyncio.AbstractEventLoop | None = None) -> _Loop:
    loop = loop or asyncio.get_running_loop()
    state = _loops.get(loop)
    if state is None:
        state = _loops[loop] = _Loop()
    return state


def begin(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """The server running ``loop`` (default: the running one) has begun to stop."""
    _state(loop).stopping = True


def stopping() -> bool:
    """Whether the server running this loop is stopping: take no new long work."""
    return _state().stopping


def in_flight() -> int:
    """How many requests :func:`serve` runs on this loop now."""
    return len(_state().running)


async def serve(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """``app(scope, receive, send)``, finished rather than cut by the server's shutdown (see the module)."""
    state = _state()
    gone = False

    async def watched() -> Message:
        nonlocal gone
        message = await receive()
        if message["type"] == "http.disconnect":
            gone = True
        return message

    async def run() -> None:
        await app(scope, watched, send)

    task = asyncio.get_running_loop().create_task(run())
    state.running.add(task)
    task.add_done_callback(state.running.discard)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if state.stopping and not gone and not task.done():
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                continue  # the server's shutdown: finish() waits for the request (RESUME.DRAIN)
            task.cancel()
            await task  # its own end: a CancelledError, or what it raised while ending
            raise


async def finish(seconds: float) -> tuple[int, int]:
    """Wait (at most ``seconds``) until this loop's requests in flight have ended, then cancel those
    still running; returns how many were running at the start and how many were cancelled."""
    running = set(_state().running)
    if not running:
        return 0, 0
    _, late = await asyncio.wait(running, timeout=seconds) if seconds > 0 else (set(), running)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=CANCEL_WAIT)
    return len(running), len(late)
