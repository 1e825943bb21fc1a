"""The SSE bodies (native and OpenAI-compatible): one write per batch of events that are ready
together, bytes unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from chatproxy import sse
from chatproxy.core import ChatStream, Event, Subscription
from tests.scripted import ScriptedUpstream, say
from tests.test_core_unit import REQUEST, P
from tests.vclock import on_virtual_clock

Wire = Callable[[Subscription], tuple[AsyncIterator[bytes], Callable[[Event], bytes]]]


def native(reader: Subscription) -> tuple[AsyncIterator[bytes], Callable[[Event], bytes]]:
    return sse.live_body(reader, sse.encode, sse.OPEN), sse.encode


def openai(reader: Subscription) -> tuple[AsyncIterator[bytes], Callable[[Event], bytes]]:
    from chatproxy.openai_views import _Wire

    wire = _Wire(reader, include_usage=True)
    return wire.chunks(), wire._encode


async def writes_of(*texts: str, gap: float, first: float, wire: Wire = native) -> tuple[list[bytes], list[bytes]]:
    """The body's writes, and each event's own encoding (the same stream read by a second reader
    through a wire of its own)."""
    stream = ChatStream(ScriptedUpstream([say(*texts, gap=gap, first=first)]), REQUEST, P)
    body, _ = wire(stream.subscribe())
    witness = stream.subscribe()
    _, encode = wire(witness)
    writes = [chunk async for chunk in body]
    encoded = [encode(event) async for event in witness]
    witness.close()
    await stream.aclose()
    return writes, encoded


@on_virtual_clock
async def test_events_ready_together_leave_in_one_write() -> None:
    # The upstream's three chunks arrive in one read: the pump emits three deltas and the done
    # event before the reader runs again.
    writes, encoded = await writes_of("Hel", "lo", " world", gap=0.0, first=0.5)
    assert writes[0] == sse.OPEN
    assert writes[1:] == [encoded[0], b"".join(encoded[1:])]  # start alone; deltas + done in one write


@on_virtual_clock
async def test_events_apart_in_time_leave_one_by_one() -> None:
    writes, encoded = await writes_of("Hel", "lo", " world", gap=0.2, first=0.5)
    assert writes[1:-1] == encoded[:-2] and writes[-1] == b"".join(encoded[-2:])  # the last delta and done together


@on_virtual_clock
async def test_openai_chunks_ready_together_leave_in_one_write() -> None:
    writes, encoded = await writes_of("Hel", "lo", " world", gap=0.0, first=0.5, wire=openai)
    assert writes[0] == sse.OPEN_COMMENT
    assert writes[1:] == [encoded[0], b"".join(encoded[1:])]
    assert writes[-1].endswith(b"data: [DONE]\n\n") and b'"usage"' in writes[-1]


@on_virtual_clock
async def test_openai_chunks_apart_in_time_leave_one_by_one() -> None:
    writes, encoded = await writes_of("Hel", "lo", " world", gap=0.2, first=0.5, wire=openai)
    assert writes[1:-1] == encoded[:-2] and writes[-1] == b"".join(encoded[-2:])
