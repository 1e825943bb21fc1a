"""What one :class:`~chatproxy.core.ChatStream` produced, for the core's tests (unit and integration)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from chatproxy.conf import Policy
from chatproxy.core import KEEPALIVE, ChatRequest, ChatStream, Event
from chatproxy.upstream.base import Upstream


class Run:
    """The events of one stream, each with the loop time it reached the reader."""

    def __init__(self, timed: list[tuple[float, Event]], stream: ChatStream) -> None:
        self.timed = timed
        self.stream = stream
        self.events = [event for _, event in timed]
        self.names = [event.name for event in self.events]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    def times(self, name: str) -> list[float]:
        return [t for t, e in self.timed if e.name == name]

    def deltas(self) -> list[str]:
        return [e.data["text"] for e in self.named("delta") if e.data is not None]

    @property
    def text(self) -> str:
        """The answer as a client shows it (a reset discards what came before)."""
        parts: list[str] = []
        for event in self.events:
            if event.name == "reset":
                parts = []
            elif event.name == "delta" and event.data is not None:
                parts.append(event.data["text"])
        return "".join(parts)

    @property
    def last(self) -> Event:
        return self.events[-1]


def assert_well_formed(events: Sequence[Event]) -> None:
    """``start`` first, exactly one terminal event and it is last, seq 1, 2, 3 ...; keepalives unnumbered."""
    names = [e.name for e in events]
    assert names[0] == "start"
    assert [n for n in names if n in ("done", "error")] == [names[-1]], names
    assert [e.seq for e in events if e.name != "keepalive"] == list(range(1, len(names) - names.count("keepalive") + 1))
    assert all(e is KEEPALIVE for e in events if e.name == "keepalive")


async def play(upstream: Upstream, request: ChatRequest, policy: Policy, *, within: float | None = None,
               **kwargs: Any) -> Run:
    """Run a :class:`ChatStream` of ``request`` to its end on the running loop (within ``within``
    seconds if given), closed, its events checked by :func:`assert_well_formed`."""
    stream = ChatStream(upstream, request, policy, **kwargs).start()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        timed = [(loop.time(), event) async for event in stream]
    await stream.aclose()
    run = Run(timed, stream)
    assert_well_formed(run.events)
    return run
