"""An in-memory upstream that plays scripted attempts, for core tests on a virtual clock.

Each call of :meth:`ScriptedUpstream.open` plays the next :class:`Attempt` of its script: wait for
the headers, maybe fail like a real adapter (a status error with Retry-After, a connect error), then
yield text chunks after their delays and end normally, with a mid-stream error, or by going silent
for good. Every request and every stream is kept, with loop times, so tests can check what the
core asked for and that it closed each stream it opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatproxy.errors import UpstreamError
from chatproxy.upstream.base import BodyStream, UpstreamRequest


@dataclass(frozen=True)
class Attempt:
    """What one upstream attempt does, in order."""

    #: (delay before the chunk, text) pairs.
    chunks: Sequence[tuple[float, str]] = ()
    #: Seconds before ``open()`` returns (or raises ``open_error``).
    headers_delay: float = 0.0
    #: Raised by ``open()``: an HTTP error status, a connect failure.
    open_error: UpstreamError | None = None
    #: Raised after the chunks (a disconnect, an in-stream error), ``end_delay`` seconds after the last.
    error: UpstreamError | None = None
    end_delay: float = 0.0
    #: After the chunks, never send anything again (a stalled connection).
    hang: bool = False
    finish_reason: str | None = "stop"
    usage: dict[str, Any] | None = None


def say(*texts: str, gap: float = 0.0, first: float | None = None, **outcome: Any) -> Attempt:
    """An attempt sending ``texts``: the first after ``first`` seconds (default ``gap``), then one every ``gap``."""
    delays = [gap if first is None else first, *[gap] * (len(texts) - 1)]
    return Attempt(chunks=list(zip(delays, texts, strict=True)), **outcome)


def refuse(error: UpstreamError, after: float = 0.0) -> Attempt:
    """An attempt whose ``open()`` fails with ``error`` after ``after`` seconds."""
    return Attempt(headers_delay=after, open_error=error)


@dataclass
class Opened:
    """One call of ``open()``: the request and what became of it (loop times)."""

    request: UpstreamRequest
    at: float
    stream: ScriptedStream | None = None


class ScriptedStream(BodyStream):
    __slots__ = ("attempt", "closed_at", "loop")

    def __init__(self, attempt: Attempt, loop: asyncio.AbstractEventLoop) -> None:
        self.attempt = attempt
        self.loop = loop
        self.closed_at: float | None = None
        super().__init__()

    async def _iterate(self) -> AsyncGenerator[str, None]:
        attempt = self.attempt
        for delay, text in attempt.chunks:
            if delay:
                await asyncio.sleep(delay)
            yield text
        if attempt.hang:
            await self.loop.create_future()
        if attempt.error is not None:
            if attempt.end_delay:
                await asyncio.sleep(attempt.end_delay)
            raise attempt.error
        self.finish_reason = attempt.finish_reason
        self.usage = attempt.usage

    async def _close_response(self) -> None:
        self.closed_at = self.loop.time()


@dataclass
class ScriptedUpstream:
    """Plays ``script`` one attempt per ``open()``; an exhausted script is a test error."""

    script: list[Attempt]
    name: str = "scripted"
    opened: list[Opened] = field(default_factory=list)
    closed: bool = False

    async def open(self, request: UpstreamRequest) -> ScriptedStream:
        loop = asyncio.get_running_loop()
        if len(self.opened) >= len(self.script):
            raise AssertionError(f"open() #{len(self.opened) + 1} but the script has {len(self.script)} attempts")
        attempt = self.script[len(self.opened)]
        opened = Opened(request, loop.time())
        self.opened.append(opened)
        if attempt.headers_delay:
            await asyncio.sleep(attempt.headers_delay)
        if attempt.open_error is not None:
            raise attempt.open_error
        opened.stream = ScriptedStream(attempt, loop)
        return opened.stream

    def unclosed(self) -> list[int]:
        """Indexes of the opened streams nobody closed (should be empty once a stream ended)."""
        return [i for i, o in enumerate(self.opened) if o.stream is not None and o.stream.closed_at is None]

    async def aclose(self) -> None:
        self.closed = True
